"""Small SD3 and Flux model sets made in code, with random seeded weights: for tests and benchmarks.

Nothing is downloaded: tokenizers are written here too (CLIP's by controlrt.builtin, a T5
sentencepiece vocabulary in memory). ``scale`` widens every part (attention heads, text widths, VAE
channels) and deepens the transformers: 1 is the tests' set (seconds per image), 4 the benchmarks'
medium shapes (see benchmarks/vs_diffusers.py --arch sd3|flux).

SD3 (:func:`write_sd3`): a 16-channel VAE with factor 8 and a shift, a transformer with patch 2, two
CLIP encoders with projections (the prompt embedding is padded to the joint attention width) and a
T5 encoder, a flow-matching scheduler with shift 3. Its ControlNets: two InstantX-style
(force_zeros_for_pooled_projection: zero pooled projection, latents without the shift), one that
takes both, and one as SD3.5-Large's (no position embedding of its own: it borrows the
transformer's; no text: single-stream blocks without a context embedder), each with half as many
blocks as the transformer.

Flux (:func:`write_flux`): FLUX.1-dev's kinds: a transformer taking 2 x 2 packed latents (64
channels) with double- and single-stream blocks, the distilled guidance embedding and rotary
position ids, a CLIP encoder (its pooled output) and a T5 encoder, SD3's kind of VAE, a flow-matching
scheduler with dynamic shifting. Its ControlNets are InstantX-style (control images VAE-encoded and
packed), with fewer blocks than the transformer: two alike (summed block by block), and two with no
single-stream blocks and no guidance embedding, the second a ControlNet-Union (10 modes); and one
XLabs-style (an input hint block on the control image's pixels, patch 2, two double-stream blocks
that the transformer's blocks take in turn).
"""

from __future__ import annotations

from pathlib import Path

import torch

from controlrt.builtin import write_tokenizer

SIZE = 64  # the tests' image size in pixels (SD3's native size at scale 1: sample_size 8 latents)
SEQUENCE = 16  # CLIP tokens
SD3_NAMES = ("canny", "pose", "depth", "large")  # the SD3 ControlNets
SD3_ZEROS = (True, True, False, False)  # each one's force_zeros_for_pooled_projection
SD3_LARGE = (False, False, False, True)  # each one as SD3.5-Large's: use_pos_embed false, no text
FLUX_NAMES = ("canny", "depth", "blur", "union", "xlabs")  # the Flux ControlNets
FLUX_LAYERS = ((1, 2), (1, 2), (2, 0), (2, 0), (2, 0))  # each one's double- and single-stream blocks (x scale)
FLUX_GUIDANCE = (True, True, False, False, True)  # each one's guidance_embeds
FLUX_MODES = (None, None, None, 10, None)  # each one's num_mode: the fourth is a ControlNet-Union
FLUX_HINTS = (None, None, None, None, 16)  # each one's conditioning_embedding_channels: the last is XLabs-style
WORDS = ("a", "an", "the", "red", "blue", "green", "house", "tree", "sky", "cat", "dog", "square", "circle", "over")


def _vae(seed: int, scale: int, scaling: float, shift: float):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=tuple(c * scale for c in (8, 8, 16, 16)),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=16,
        norm_num_groups=4,
        layers_per_block=1,
        scaling_factor=scaling,
        shift_factor=shift,
        use_quant_conv=False,
        use_post_quant_conv=False,
        sample_size=SIZE * scale,
    )


def _t5(seed: int, scale: int, vocab: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=vocab,
        d_model=32 * scale,
        d_kv=8 * scale,
        d_ff=64 * scale,
        num_layers=scale,
        num_heads=4,
        dropout_rate=0.0,
    )
    return T5EncoderModel(config)


def _clip_config(vocab: int, width: int, projection: int = 0):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=width * 2,
        **({"projection_dim": projection} if projection else {}),
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=SEQUENCE,
        bos_token_id=vocab - 2,
        eos_token_id=vocab - 1,
        pad_token_id=vocab - 1,
    )


def weigh(module: torch.nn.Module, seed: int) -> None:
    """Give every all-zero parameter (ControlNet blocks, its input embedding) seeded values."""
    generator = torch.Generator("cpu").manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            if not param.any():
                fan_in = param[0].numel() if param.ndim > 1 else 20
                param.copy_(torch.randn(param.shape, generator=generator) / fan_in**0.5)


def t5_tokenizer():
    """A T5 tokenizer over a few words and the letters (sentencepiece unigram, made in memory)."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("▁" + w, -1.0 - i / 100) for i, w in enumerate(WORDS)]
    vocab += [(c, -8.0) for c in "abcdefghijklmnopqrstuvwxyz▁"]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def build_sd3(root: Path, seed: int = 0, scale: int = 1):
    """The diffusers modules: a StableDiffusion3Pipeline's components and the SD3 ControlNets."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3ControlNetModel, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    dirs = (root / "_tok1", root / "_tok2")
    vocab = write_tokenizer(dirs[0], 200, SEQUENCE)
    write_tokenizer(dirs[1], 200, SEQUENCE, pad_token="!")
    tokenizers = [CLIPTokenizer.from_pretrained(d) for d in dirs]
    dims = dict(
        patch_size=2,
        in_channels=16,
        attention_head_dim=8 * scale,
        num_attention_heads=2 * scale,
        joint_attention_dim=32 * scale,
        caption_projection_dim=16 * scale * scale,  # the blocks' width: heads x head size
        pooled_projection_dim=16 * scale,
        pos_embed_max_size=16 * scale,
    )
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=SIZE // 8, num_layers=4 * scale, out_channels=16, **dims)
    vae = _vae(seed + 1, scale, 1.5305, 0.0609)
    encoders = []
    for k, width in enumerate((8, 16)):
        torch.manual_seed(seed + 2 + k)
        encoders.append(CLIPTextModelWithProjection(_clip_config(vocab, width * scale, 8 * scale)))
    t5_tok = t5_tokenizer()
    t5 = _t5(seed + 4, scale, len(t5_tok))
    controlnets = []
    for k, (zeros, large) in enumerate(zip(SD3_ZEROS, SD3_LARGE, strict=True)):
        torch.manual_seed(seed + 10 + k)
        own = dict(use_pos_embed=False, joint_attention_dim=None, pos_embed_type=None) if large else {}
        controlnet = SD3ControlNetModel(
            sample_size=SIZE // 8,
            num_layers=2 * scale,
            force_zeros_for_pooled_projection=zeros,
            **{**dims, **own},
        )
        weigh(controlnet, seed + 20 + k)
        controlnets.append(controlnet)
    for module in (transformer, vae, *encoders, t5, *controlnets):
        module.eval()
    components = dict(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=encoders[0],
        tokenizer=tokenizers[0],
        text_encoder_2=encoders[1],
        tokenizer_2=tokenizers[1],
        text_encoder_3=t5,
        tokenizer_3=t5_tok,
    )
    return components, controlnets


def write_sd3(root: Path, seed: int = 0, scale: int = 1) -> tuple[Path, list[Path]]:
    """Save the set: root/base (a StableDiffusion3Pipeline folder) and a folder per ControlNet."""
    from diffusers import StableDiffusion3Pipeline

    components, controlnets = build_sd3(root, seed, scale)
    StableDiffusion3Pipeline(**components).save_pretrained(root / "base")
    return root / "base", _save(root, SD3_NAMES, controlnets)


def build_flux(root: Path, seed: int = 0, scale: int = 1):
    """The diffusers modules: a FluxPipeline's components and the Flux ControlNets."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxControlNetModel, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer

    vocab = write_tokenizer(root / "_tok", 200, SEQUENCE)
    tokenizer = CLIPTokenizer.from_pretrained(root / "_tok")
    head = 8 * scale
    dims = dict(
        patch_size=1,
        in_channels=64,
        attention_head_dim=head,
        num_attention_heads=2 * scale,
        joint_attention_dim=32 * scale,
        pooled_projection_dim=16 * scale,
        axes_dims_rope=(head // 4, head // 4, head // 2),
    )
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        num_layers=3 * scale, num_single_layers=4 * scale, guidance_embeds=True, **dims
    )
    vae = _vae(seed + 1, scale, 0.3611, 0.1159)
    torch.manual_seed(seed + 2)
    clip = CLIPTextModel(_clip_config(vocab, 16 * scale))
    t5_tok = t5_tokenizer()
    t5 = _t5(seed + 3, scale, len(t5_tok))
    controlnets = []
    kinds = zip(FLUX_LAYERS, FLUX_GUIDANCE, FLUX_MODES, FLUX_HINTS, strict=True)
    for k, ((doubles, singles), guidance, modes, hint) in enumerate(kinds):
        torch.manual_seed(seed + 10 + k)
        controlnet = FluxControlNetModel(
            num_layers=doubles * scale,
            num_single_layers=singles * scale,
            guidance_embeds=guidance,
            num_mode=modes,
            conditioning_embedding_channels=hint,
            **{**dims, "patch_size": 1 if hint is None else 2},  # XLabs': the hint's 16 channels packed 2 x 2
        )
        weigh(controlnet, seed + 20 + k)
        controlnets.append(controlnet)
    for module in (transformer, vae, clip, t5, *controlnets):
        module.eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=16,
        max_image_seq_len=256,
    )
    components = dict(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=clip,
        tokenizer=tokenizer,
        text_encoder_2=t5,
        tokenizer_2=t5_tok,
    )
    return components, controlnets


def write_flux(root: Path, seed: int = 0, scale: int = 1) -> tuple[Path, list[Path]]:
    """Save the set: root/base (a FluxPipeline folder) and a folder per ControlNet."""
    from diffusers import FluxPipeline

    components, controlnets = build_flux(root, seed, scale)
    FluxPipeline(**components).save_pretrained(root / "base")
    return root / "base", _save(root, FLUX_NAMES, controlnets)


def _save(root: Path, names, controlnets) -> list[Path]:
    paths = []
    for name, controlnet in zip(names, controlnets, strict=True):
        controlnet.save_pretrained(root / name)
        paths.append(root / name)
    return paths
