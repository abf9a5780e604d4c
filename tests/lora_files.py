"""Test helper: LoRA files made in code, in diffusers' format and in kohya's.

Adapters are peft LoRA layers with non-zero (seeded) weights on the UNet's attention, feed-forward
and transformer projections, resnet and sampler convolutions, and on every linear layer of the text
encoder, saved as diffusers saves
them (``pytorch_lora_weights.safetensors``, with the adapter metadata that keeps alpha != rank), or
renamed into kohya's layout (``lora_unet_*`` / ``lora_te_*`` with ``.alpha`` tensors).
"""

from __future__ import annotations

from pathlib import Path

import torch

# attention, feed-forward and transformer projections (linear, or 1x1 convolutions in SD1.5's
# proj_in/out), resnet 3x3 convolutions and time projections, down/upsampler convolutions (LoCon)
UNET_TARGETS = [
    *("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"),
    *("conv1", "conv2", "time_emb_proj", "conv_shortcut", "conv"),
]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def _adapted(module, targets, rank: int, alpha: float, seed: int):
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    torch.manual_seed(seed)
    module = inject_adapter_in_model(config, module)
    generator = torch.Generator("cpu").manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.15)
    metadata = {"r": rank, "lora_alpha": alpha, "target_modules": targets}
    return get_peft_model_state_dict(module), metadata


def write_diffusers_lora(base: Path, out: Path, seed: int, text: bool = True, rank: int = 4, alpha: float = 8.0):
    """A UNet (and text encoder) LoRA as diffusers' save_lora_weights writes it; returns the file."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    unet_layers, unet_meta = _adapted(unet, UNET_TARGETS, rank, alpha, seed)
    kwargs = {"unet_lora_layers": unet_layers, "unet_lora_adapter_metadata": unet_meta}
    if text:
        layers, meta = _adapted(CLIPTextModel.from_pretrained(base / "text_encoder"), TEXT_TARGETS, 2, 2.0, seed + 1)
        kwargs |= {"text_encoder_lora_layers": layers, "text_encoder_lora_adapter_metadata": meta}
    StableDiffusionPipeline.save_lora_weights(out, **kwargs)
    return out / "pytorch_lora_weights.safetensors"


def write_kohya_lora(base: Path, out: Path, seed: int, rank: int = 4, alpha: float = 2.0) -> Path:
    """The same kind of LoRA in kohya's names (``lora_unet_…``, ``lora_te_text_model_…``, ``.alpha``)."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    unet_layers, _ = _adapted(UNet2DConditionModel.from_pretrained(base / "unet"), UNET_TARGETS, rank, alpha, seed)
    text_layers, _ = _adapted(CLIPTextModel.from_pretrained(base / "text_encoder"), TEXT_TARGETS, rank, alpha, seed + 1)
    state = {}
    for prefix, layers in (("lora_unet_", unet_layers), ("lora_te_", text_layers)):
        for key, value in layers.items():
            path, kind = key.rsplit(".lora_", 1)
            if prefix == "lora_te_" and not path.startswith("text_model."):
                path = "text_model." + path
            name = prefix + path.replace(".", "_")
            state[f"{name}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = value.contiguous()
            state[f"{name}.alpha"] = torch.tensor(alpha)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, out)
    return out


def write_sdxl_lora(base: Path, out: Path, seed: int) -> Path:
    """An SDXL LoRA for the UNet and both text encoders, as StableDiffusionXLPipeline saves it."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    unet, unet_meta = _adapted(UNet2DConditionModel.from_pretrained(base / "unet"), UNET_TARGETS, 4, 8.0, seed)
    first, first_meta = _adapted(CLIPTextModel.from_pretrained(base / "text_encoder"), TEXT_TARGETS, 2, 2.0, seed + 1)
    second_model = CLIPTextModelWithProjection.from_pretrained(base / "text_encoder_2")
    second, second_meta = _adapted(second_model, TEXT_TARGETS, 2, 4.0, seed + 2)
    StableDiffusionXLPipeline.save_lora_weights(
        out,
        unet_lora_layers=unet,
        text_encoder_lora_layers=first,
        text_encoder_2_lora_layers=second,
        unet_lora_adapter_metadata=unet_meta,
        text_encoder_lora_adapter_metadata=first_meta,
        text_encoder_2_lora_adapter_metadata=second_meta,
    )
    return out / "pytorch_lora_weights.safetensors"


# SD3's and Flux's transformer blocks: joint attention (image and text projections), feed-forward
# layers, Flux's single-stream projections; the output projection
TRANSFORMER_TARGETS = [
    *("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"),
    *("ff.net.0.proj", "ff.net.2", "proj_mlp", "proj_out"),
]


def write_transformer_lora(base: Path, out: Path, seed: int, pipeline: str) -> Path:
    """A transformer and first-CLIP LoRA for an SD3 or Flux folder, as ``pipeline`` (the diffusers
    class: StableDiffusion3Pipeline, FluxPipeline) saves it; returns the file."""
    import json

    import diffusers
    import transformers

    index = json.loads((base / "model_index.json").read_text())
    denoiser = getattr(diffusers, index["transformer"][1]).from_pretrained(base / "transformer")
    layers, meta = _adapted(denoiser, TRANSFORMER_TARGETS, 4, 8.0, seed)
    clip = getattr(transformers, index["text_encoder"][1]).from_pretrained(base / "text_encoder")
    text, text_meta = _adapted(clip, TEXT_TARGETS, 2, 2.0, seed + 1)
    getattr(diffusers, pipeline).save_lora_weights(
        out,
        transformer_lora_layers=layers,
        text_encoder_lora_layers=text,
        transformer_lora_adapter_metadata=meta,
        text_encoder_lora_adapter_metadata=text_meta,
    )
    return out / "pytorch_lora_weights.safetensors"
