"""The published shapes of SD3.5 and FLUX.1-dev, as diffusers configs; full-size random-weight sets.

Nothing is downloaded: the configs below are the published models' (their transformer, text
encoder and VAE configs, as diffusers and transformers name the fields), so that what controlrt
does with a full-size model can be counted on torch's meta device (benchmarks/transformer_sizes.py)
or run on seeded random weights (:func:`write_full_size`, the slow export test). Tokenizers are made
here as in :mod:`controlrt.smallsets`: they only have to give ids within the encoders' vocabularies.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768)
CLIP_G = dict(
    hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, projection_dim=1280
)
T5_XXL = dict(
    d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128, feed_forward_proj="gated-gelu"
)
VAE_16 = dict(
    latent_channels=16,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
SD35_MEDIUM = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    out_channels=16,
    pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)),
    qk_norm="rms_norm",
)
SD35_LARGE = {
    **SD35_MEDIUM,
    "num_layers": 38,
    "num_attention_heads": 38,
    "caption_projection_dim": 2432,
    "pos_embed_max_size": 192,
    "dual_attention_layers": (),
}
FLUX_DEV = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)


@dataclass(frozen=True)
class FullSize:
    """One model's shapes: its family, transformer config, a ControlNet's config (over the
    transformer's), and the VAE's scaling."""

    family: str
    transformer: dict[str, Any]
    controlnet: dict[str, Any]
    vae: dict[str, Any] = field(default_factory=dict)


MODELS = {
    "sd3.5-medium": FullSize(  # a ControlNet half as deep
        "sd3", SD35_MEDIUM, {"num_layers": 12}, {"scaling_factor": 1.5305, "shift_factor": 0.0609}
    ),
    "sd3.5-large": FullSize(  # stabilityai's SD3.5-Large ControlNets: no position embedding, no text
        "sd3",
        SD35_LARGE,
        {"num_layers": 19, "use_pos_embed": False, "joint_attention_dim": None, "pos_embed_type": None},
        {"scaling_factor": 1.5305, "shift_factor": 0.0609},
    ),
    "flux.1-dev": FullSize(  # InstantX-sized
        "flux", FLUX_DEV, {"num_layers": 5, "num_single_layers": 10}, {"scaling_factor": 0.3611, "shift_factor": 0.1159}
    ),
}


def model_classes(family: str):
    from diffusers import FluxControlNetModel, FluxTransformer2DModel, SD3ControlNetModel, SD3Transformer2DModel

    if family == "flux":
        return FluxTransformer2DModel, FluxControlNetModel
    return SD3Transformer2DModel, SD3ControlNetModel


def text_encoders(family: str) -> dict[str, tuple[str, dict[str, Any]]]:
    """component -> (transformers class, config) of the family's text encoders."""
    if family == "flux":
        return {"text_encoder": ("CLIPTextModel", CLIP_L), "text_encoder_2": ("T5EncoderModel", T5_XXL)}
    return {
        "text_encoder": ("CLIPTextModelWithProjection", CLIP_L),
        "text_encoder_2": ("CLIPTextModelWithProjection", CLIP_G),
        "text_encoder_3": ("T5EncoderModel", T5_XXL),
    }


def controlnet_config(model: FullSize) -> dict[str, Any]:
    """The ControlNet's config: the transformer's shared fields, then its own."""
    shared = {k: v for k, v in model.transformer.items() if k not in ("dual_attention_layers", "num_single_layers")}
    config = {**shared, **model.controlnet}
    if model.family == "flux":
        config["num_single_layers"] = model.controlnet.get("num_single_layers", 0)
    return config


def _tokenizer(encoder_class: str) -> str:
    return "T5Tokenizer" if encoder_class == "T5EncoderModel" else "CLIPTokenizer"


def model_index(family: str) -> dict[str, Any]:
    transformer, _ = model_classes(family)
    texts = text_encoders(family)
    return {
        "_class_name": "FluxPipeline" if family == "flux" else "StableDiffusion3Pipeline",
        "transformer": ["diffusers", transformer.__name__],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        **{name: ["transformers", cls] for name, (cls, _) in texts.items()},
        **{
            name.replace("text_encoder", "tokenizer"): [
                "transformers",
                "T5Tokenizer" if cls == "T5EncoderModel" else "CLIPTokenizer",
            ]
            for name, (cls, _) in texts.items()
        },
    }


def make_scheduler(family: str):
    from diffusers import FlowMatchEulerDiscreteScheduler

    if family == "flux":
        return FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
    return FlowMatchEulerDiscreteScheduler(shift=3.0)


def write_full_size(
    root: str | Path, name: str, seed: int = 0, dtype: str = "float16", weights: bool = True
) -> tuple[Path, Path]:
    """Write ``name``'s shapes with seeded random weights: ``root/base`` (a pipeline folder) and
    ``root/controlnet``. Weights are stored in ``dtype`` (16 bits, as the published files), one
    component in memory at a time (T5-XXL: 9.5 GB in 16 bits). Without ``weights``, the configs only,
    each weight file empty (for counting on the meta device). Returns (base, controlnet)."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, T5Config

    from controlrt.builtin import write_tokenizer
    from controlrt.smallsets import t5_tokenizer

    model = MODELS[name]
    root = Path(root)
    base = root / "base"
    base.mkdir(parents=True)
    (base / "model_index.json").write_text(json.dumps(model_index(model.family), indent=2))
    make_scheduler(model.family).save_pretrained(base / "scheduler")
    transformer_cls, controlnet_cls = model_classes(model.family)
    half = getattr(torch, dtype)

    def save(make, folder: Path, offset: int) -> None:
        if not weights:
            with torch.device("meta"):
                module = make()
            if hasattr(module, "save_config"):  # diffusers
                module.save_config(folder)
            else:
                module.config.save_pretrained(folder)
            (folder / "model.safetensors").write_bytes(b"")  # folder checks want a weight file
            return
        torch.manual_seed(seed + offset)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(half)  # made and initialised in 16 bits: never a 32-bit copy
        try:
            module = make()
        finally:
            torch.set_default_dtype(previous)
        module.save_pretrained(folder)
        del module

    save(lambda: transformer_cls(**model.transformer), base / "transformer", 0)
    save(lambda: AutoencoderKL(**VAE_16, **model.vae), base / "vae", 1)
    for k, (component, (cls, config)) in enumerate(text_encoders(model.family).items()):
        import transformers

        tokenizer = base / component.replace("text_encoder", "tokenizer")
        if cls == "T5EncoderModel":
            t5_tokenizer().save_pretrained(tokenizer)
            made = T5Config(**config)
        else:
            vocab = write_tokenizer(tokenizer, 200, 77)
            ids = dict(bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1)
            made = CLIPTextConfig(**config, **ids, max_position_embeddings=77)
        made.architectures = [cls]
        save(lambda cls=cls, made=made: getattr(transformers, cls)(made), base / component, 2 + k)

    def controlnet():
        from controlrt.smallsets import weigh

        made = controlnet_cls(**controlnet_config(model))
        if weights:
            weigh(made, seed + 20)  # its zero-initialised blocks, so that checks of its outputs can fail
        return made

    save(controlnet, root / "controlnet", 10)
    return base, root / "controlnet"
