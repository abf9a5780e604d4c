"""A small SD3 model set made in code: pipeline folder and SD3 ControlNets, random seeded weights.

Shapes are SD3's kinds at small widths: a 16-channel VAE with factor 8 and a shift, a transformer
with patch 2, two CLIP encoders with projections (8 and 16 wide: the prompt embedding is padded to
the 32-wide joint attention) and a T5 encoder (32 wide), a flow-matching scheduler with shift 3.
The ControlNets: two InstantX-style (force_zeros_for_pooled_projection: zero pooled projection,
latents without the shift) and one that takes both, each with half as many blocks as the transformer
(diffusers' interval rule maps them onto its blocks).
"""

from __future__ import annotations

from pathlib import Path

import torch

from controlrt.builtin import write_tokenizer

SIZE = 64  # the native size in pixels: sample_size 8 latents
SEQUENCE = 16  # CLIP tokens
NAMES = ("canny", "pose", "depth")  # the ControlNets
ZEROS = (True, True, False)  # each one's force_zeros_for_pooled_projection
WORDS = ("a", "an", "the", "red", "blue", "green", "house", "tree", "sky", "cat", "dog", "square", "circle", "over")


def _weigh(module: torch.nn.Module, seed: int) -> None:
    """Give every all-zero parameter (ControlNet blocks, its input patch embedding) seeded values."""
    generator = torch.Generator("cpu").manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            if not param.any():
                fan_in = param[0].numel() if param.ndim > 1 else 20
                param.copy_(torch.randn(param.shape, generator=generator) / fan_in**0.5)


def t5_tokenizer():
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("▁" + w, -1.0 - i / 100) for i, w in enumerate(WORDS)]
    vocab += [(c, -8.0) for c in "abcdefghijklmnopqrstuvwxyz▁"]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def build_sd3(root: Path, seed: int = 0):
    """The diffusers modules: a StableDiffusion3Pipeline's components and the SD3 ControlNets."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3ControlNetModel,
        SD3Transformer2DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel

    dirs = (root / "_tok1", root / "_tok2")
    vocab = write_tokenizer(dirs[0], 200, SEQUENCE)
    write_tokenizer(dirs[1], 200, SEQUENCE, pad_token="!")
    tokenizers = [CLIPTokenizer.from_pretrained(d) for d in dirs]
    dims = dict(
        patch_size=2,
        in_channels=16,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=16,
        pooled_projection_dim=16,
        pos_embed_max_size=16,
    )
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=SIZE // 8, num_layers=4, out_channels=16, **dims)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=16,
        norm_num_groups=4,
        layers_per_block=1,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
        sample_size=SIZE,
    )
    encoders = []
    for k, width in enumerate((8, 16)):
        torch.manual_seed(seed + 2 + k)
        config = CLIPTextConfig(
            vocab_size=vocab,
            hidden_size=width,
            intermediate_size=width * 2,
            projection_dim=8,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=SEQUENCE,
            bos_token_id=vocab - 2,
            eos_token_id=vocab - 1,
            pad_token_id=vocab - 1,
        )
        encoders.append(CLIPTextModelWithProjection(config))
    t5_tok = t5_tokenizer()
    torch.manual_seed(seed + 4)
    t5 = T5EncoderModel(
        T5Config(vocab_size=len(t5_tok), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, dropout_rate=0.0)
    )
    controlnets = []
    for k, zeros in enumerate(ZEROS):
        torch.manual_seed(seed + 10 + k)
        controlnet = SD3ControlNetModel(
            sample_size=SIZE // 8, num_layers=2, force_zeros_for_pooled_projection=zeros, **dims
        )
        _weigh(controlnet, seed + 20 + k)
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


def write_sd3(root: Path, seed: int = 0) -> tuple[Path, list[Path]]:
    """Save the set: root/base (a StableDiffusion3Pipeline folder) and a folder per ControlNet."""
    from diffusers import StableDiffusion3Pipeline

    components, controlnets = build_sd3(root, seed)
    StableDiffusion3Pipeline(**components).save_pretrained(root / "base")
    paths = []
    for name, controlnet in zip(NAMES, controlnets, strict=True):
        controlnet.save_pretrained(root / name)
        paths.append(root / name)
    return root / "base", paths
