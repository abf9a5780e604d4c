"""A small Flux model set made in code: pipeline folder and Flux ControlNets, random seeded weights.

Shapes are FLUX.1-dev's kinds at small widths: a 16-channel VAE with factor 8 and a shift, a
transformer taking 2 x 2 packed latents (64 channels) with double- and single-stream blocks, the
distilled guidance embedding and rotary position ids, a CLIP encoder (its pooled output) and a T5
encoder (32 wide), a flow-matching scheduler with dynamic shifting. The ControlNets are
InstantX-style (no input hint block: control images VAE-encoded and packed), with fewer blocks
than the transformer (diffusers' interval rule maps them onto its blocks): two alike (summed
block by block) and one with no single-stream blocks and no guidance embedding.
"""

from __future__ import annotations

from pathlib import Path

import torch
from sd3_files import _weigh, t5_tokenizer

from controlrt.builtin import write_tokenizer

SIZE = 64  # the native size in pixels: sample_size 8 latents
SEQUENCE = 16  # CLIP tokens
NAMES = ("canny", "depth", "blur")  # the ControlNets
LAYERS = ((1, 2), (1, 2), (2, 0))  # each one's double- and single-stream block counts
GUIDANCE = (True, True, False)  # each one's guidance_embeds


def build_flux(root: Path, seed: int = 0):
    """The diffusers modules: a FluxPipeline's components and the Flux ControlNets."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxControlNetModel, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

    vocab = write_tokenizer(root / "_tok", 200, SEQUENCE)
    tokenizer = CLIPTokenizer.from_pretrained(root / "_tok")
    dims = dict(
        patch_size=1,
        in_channels=64,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=16,
        axes_dims_rope=(2, 2, 4),
    )
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(num_layers=3, num_single_layers=4, guidance_embeds=True, **dims)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=16,
        norm_num_groups=4,
        layers_per_block=1,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
        sample_size=SIZE,
    )
    torch.manual_seed(seed + 2)
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=SEQUENCE,
            bos_token_id=vocab - 2,
            eos_token_id=vocab - 1,
            pad_token_id=vocab - 1,
        )
    )
    t5_tok = t5_tokenizer()
    torch.manual_seed(seed + 3)
    t5 = T5EncoderModel(
        T5Config(vocab_size=len(t5_tok), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, dropout_rate=0.0)
    )
    controlnets = []
    for k, ((doubles, singles), guidance) in enumerate(zip(LAYERS, GUIDANCE, strict=True)):
        torch.manual_seed(seed + 10 + k)
        controlnet = FluxControlNetModel(
            num_layers=doubles, num_single_layers=singles, guidance_embeds=guidance, **dims
        )
        _weigh(controlnet, seed + 20 + k)
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


def write_flux(root: Path, seed: int = 0) -> tuple[Path, list[Path]]:
    """Save the set: root/base (a FluxPipeline folder) and a folder per ControlNet."""
    from diffusers import FluxPipeline

    components, controlnets = build_flux(root, seed)
    FluxPipeline(**components).save_pretrained(root / "base")
    paths = []
    for name, controlnet in zip(NAMES, controlnets, strict=True):
        controlnet.save_pretrained(root / name)
        paths.append(root / name)
    return root / "base", paths
