"""Full-size SD3.5 and Flux graphs on the meta device: parameters and bytes per graph, nothing loaded.

    python benchmarks/transformer_sizes.py            # a table; --json FILE writes it too

What an export of the full-size models needs, without their weights (nothing is downloaded): each
graph's module is made from its published config on torch's meta device, through the family's own
module factory (so the count is of what controlrt exports: the ControlNet graphs of SD3.5-Large hold
the transformer's position embedding), and its parameters and buffers counted. Printed per graph:
parameters, fp32 and 16-bit bytes, and the export's expected peak, 1.5x the graph's fp32 bytes (the
ratio measured exporting SD1.5's UNet: 5.1 GB for 3.4 GB of weights; see CHANGELOG 0.10.0) against
this machine's memory. Figures are of the configs, not of a run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

EXPORT_PEAK = 1.5  # export peak / fp32 weights, measured on SD1.5's UNet (CHANGELOG 0.10.0)

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
MODELS = {  # name -> (family, transformer config, ControlNet config)
    "sd3.5-medium": ("sd3", SD35_MEDIUM, {"num_layers": 12}),  # a ControlNet half as deep
    "sd3.5-large": (  # stabilityai's SD3.5-Large ControlNets: no position embedding, no text
        "sd3",
        SD35_LARGE,
        {"num_layers": 19, "use_pos_embed": False, "joint_attention_dim": None, "pos_embed_type": None},
    ),
    "flux.1-dev": ("flux", FLUX_DEV, {"num_layers": 5, "num_single_layers": 10}),  # InstantX-sized
}


def write_configs(root: Path, family: str, transformer: dict, controlnet: dict) -> tuple[Path, Path]:
    """A pipeline folder of configs only (no weights) and a ControlNet config folder."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxControlNetModel,
        FluxTransformer2DModel,
        SD3ControlNetModel,
        SD3Transformer2DModel,
    )
    from transformers import CLIPTextConfig, T5Config

    flux = family == "flux"
    model_cls, net_cls = (
        (FluxTransformer2DModel, FluxControlNetModel) if flux else (SD3Transformer2DModel, SD3ControlNetModel)
    )
    base = root / "base"
    texts = (
        {"text_encoder": ("CLIPTextModel", CLIP_L), "text_encoder_2": ("T5EncoderModel", T5_XXL)}
        if flux
        else {
            "text_encoder": ("CLIPTextModelWithProjection", CLIP_L),
            "text_encoder_2": ("CLIPTextModelWithProjection", CLIP_G),
            "text_encoder_3": ("T5EncoderModel", T5_XXL),
        }
    )
    index = {
        "_class_name": "FluxPipeline" if flux else "StableDiffusion3Pipeline",
        "transformer": ["diffusers", model_cls.__name__],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        **{name: ["transformers", cls] for name, (cls, _) in texts.items()},
        **{name.replace("text_encoder", "tokenizer"): ["transformers", "CLIPTokenizer"] for name in texts},
    }
    base.mkdir(parents=True)
    (base / "model_index.json").write_text(json.dumps(index))
    _save_config(base / "transformer", model_cls, transformer)
    _save_config(base / "vae", AutoencoderKL, VAE_16)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=flux)
    scheduler.save_config(base / "scheduler")
    for name, (cls, config) in texts.items():
        made = T5Config(**config) if cls == "T5EncoderModel" else CLIPTextConfig(**config)
        made.architectures = [cls]
        made.save_pretrained(base / name)
        tokenizer = base / name.replace("text_encoder", "tokenizer")
        tokenizer.mkdir()
        (tokenizer / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))
    shared = {k: v for k, v in transformer.items() if k not in ("dual_attention_layers", "num_single_layers")}
    net_config = {**shared, **controlnet}
    if flux:
        net_config["num_single_layers"] = controlnet.get("num_single_layers", 0)
    _save_config(root / "controlnet", net_cls, net_config)
    return base, root / "controlnet"


def _save_config(folder: Path, cls, config: dict) -> None:
    import torch

    with torch.device("meta"):
        model = cls(**config)
    model.save_config(folder)
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"")  # the folder check wants weights


def count(module) -> int:
    return sum(p.numel() for p in module.parameters()) + sum(b.numel() for b in module.buffers())


def graph_sizes(name: str, root: Path) -> list[dict]:
    """One row per graph of ``name``'s build (its transformer and one ControlNet): parameters
    (buffers included), fp32 and 16-bit bytes, the expected export peak. Config folders go in ``root``."""
    from controlrt.families import family_of, load_graph_module
    from controlrt.models import BaseModel, ControlNetModelFolder

    family_name, transformer, controlnet = MODELS[name]
    base_dir, net_dir = write_configs(root / name, family_name, transformer, controlnet)
    base, net = BaseModel.open(base_dir), ControlNetModelFolder.open(net_dir)
    rows = []
    for spec in family_of(base.info()).graph_specs([net]):
        params = count(load_graph_module(spec, base, [net], meta=True))
        rows.append(
            dict(
                model=name,
                graph=spec.name,
                params=params,
                fp32=4 * params,
                half=2 * params,
                peak=EXPORT_PEAK * 4 * params,
            )
        )
    return rows


def main() -> None:
    import tempfile

    import psutil

    from controlrt import cpu

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    names = args.models.split(",")
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown model {unknown[0]!r}; choose from {', '.join(MODELS)}")
    memory = psutil.virtual_memory().total
    info = cpu.describe()
    print(f"machine: {info['name']}, {info['cores']} cores, {memory / 2**30:.1f} GiB memory")
    print(f"{'model':<14} {'graph':<16} {'params':>9} {'fp32 GB':>8} {'16-bit GB':>9} {'export peak GB':>14}  fits")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            for row in graph_sizes(name, Path(tmp)):
                rows.append(row)
                print(
                    f"{name:<14} {row['graph']:<16} {row['params'] / 1e9:>8.2f}B {row['fp32'] / 1e9:>8.1f} "
                    f"{row['half'] / 1e9:>9.1f} {row['peak'] / 1e9:>14.1f}  {'yes' if row['peak'] < memory else 'no'}",
                    flush=True,
                )
    print(f"export peak: {EXPORT_PEAK}x the graph's fp32 weights (measured on SD1.5's UNet); one graph at a time")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "memory": memory, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
