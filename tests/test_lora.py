"""LoRAs fused at export and changed on a build, against diffusers' own LoRA loading.

LoRA files are made in code (tests/lora_files.py): peft adapters with non-zero weights on the UNet
and the text encoder, in diffusers' format (alpha kept in the adapter metadata) and in kohya's
(``.alpha`` tensors). Fused weights must equal diffusers' ``load_lora_weights`` + ``fuse_lora``, and
images must match StableDiffusionControlNetPipeline with the same LoRAs at the same scales.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from lora_files import write_diffusers_lora, write_kohya_lora

from controlrt.builtin import sample_control_images
from controlrt.compare import end_to_end_gate, psnr
from controlrt.errors import BuildError, InputError, ModelError
from controlrt.lora import Lora, read_lora
from controlrt.manifest import Build
from controlrt.models import BaseModel

GATE = end_to_end_gate("fp32")
PROMPT = "a red circle on a blue square"
SETTINGS = {"steps": 3, "seed": 4, "guidance": 6.0}


@pytest.fixture(scope="module")
def loras(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    base = tiny_models.base
    return {
        "style": write_diffusers_lora(base, root / "style", seed=1),
        "unet-only": write_diffusers_lora(base, root / "unet-only", seed=3, text=False, rank=2, alpha=1.0),
        "kohya": write_kohya_lora(base, root / "kohya.safetensors", seed=5),
    }


def diffusers_pipeline(tiny_models, fused: list[tuple[str, float]]):
    """StableDiffusionControlNetPipeline with each LoRA loaded and fused by diffusers."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    nets = [ControlNetModel.from_pretrained(p) for p in tiny_models.controlnets]
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        tiny_models.base, controlnet=nets, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    for k, (path, scale) in enumerate(fused):
        pipe.load_lora_weights(str(path), adapter_name=f"l{k}")
        pipe.fuse_lora(lora_scale=scale, adapter_names=[f"l{k}"], components=["unet", "text_encoder"])
        pipe.unload_lora_weights()
    return pipe


def _max_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max(float((sa[k] - sb[k]).abs().max()) for k in sa)


@pytest.mark.parametrize("which", ["style", "kohya"])
@pytest.mark.parametrize("scale", [1.0, 0.6])
def test_fused_weights_are_diffusers(tiny_models, loras, which, scale):
    base = BaseModel.open(tiny_models.base).with_loras([Lora(loras[which], scale)])
    reference = diffusers_pipeline(tiny_models, [(loras[which], scale)])
    unet, text = base.load_unet(), base.load_text_encoder()
    assert _max_difference(unet, reference.unet) < 1e-5
    assert _max_difference(text, reference.text_encoder) < 1e-5
    plain = BaseModel.open(tiny_models.base)
    assert _max_difference(unet, plain.load_unet()) > 1e-2  # the LoRA really changed the weights
    assert _max_difference(text, plain.load_text_encoder()) > 1e-2


def test_alpha_comes_from_the_file(loras):
    style = read_lora(Lora(loras["style"]), "StableDiffusionPipeline")
    assert {layer.alpha / layer.rank for layer in style["unet"].values()} == {2.0}  # metadata: alpha 8, rank 4
    assert {layer.alpha / layer.rank for layer in style["text_encoder"].values()} == {1.0}
    kohya = read_lora(Lora(loras["kohya"]), "StableDiffusionPipeline")
    assert {layer.alpha / layer.rank for layer in kohya["unet"].values()} == {0.5}  # .alpha tensors: 2 of rank 4
    assert set(read_lora(Lora(loras["unet-only"]), "StableDiffusionPipeline")) == {"unet"}


@pytest.fixture(scope="module")
def lora_build(tiny_models, loras, tmp_path_factory):
    from controlrt.export.build import export_build

    out = tmp_path_factory.mktemp("lora-build") / "build"
    fused = [Lora(loras["style"], 0.8), Lora(loras["kohya"], 0.5)]
    export_build(tiny_models.base, tiny_models.controlnets, out, loras=fused)
    return out


@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "openvino"])
def test_two_loras_match_diffusers(tiny_models, loras, lora_build, backend, tiny_build):
    from controlrt.runtime.pipeline import Pipeline

    reference = diffusers_pipeline(tiny_models, [(loras["style"], 0.8), (loras["kohya"], 0.5)])
    images = sample_control_images(2, 64, 64)
    expected = reference(
        PROMPT,
        image=images,
        num_inference_steps=3,
        guidance_scale=6.0,
        generator=torch.Generator("cpu").manual_seed(4),
        height=64,
        width=64,
    ).images[0]
    with Pipeline.load(lora_build, backend=backend) as pipe:
        got = np.asarray(pipe(PROMPT, controls=images, **SETTINGS))
    with Pipeline.load(tiny_build, backend=backend) as pipe:
        plain = np.asarray(pipe(PROMPT, controls=images, **SETTINGS))
    expected = np.asarray(expected)
    assert expected.std() > 5
    assert psnr(expected, got) >= GATE
    assert psnr(plain, got) < 40  # the LoRAs change the image, so the comparison can fail


def test_the_manifest_records_the_loras_and_inspect_shows_them(lora_build, loras):
    from controlrt.inspect import format_inspection, inspect_build

    records = Build.open(lora_build).manifest.sources["base"]["loras"]
    assert [(r["path"], r["scale"]) for r in records] == [(str(loras["style"]), 0.8), (str(loras["kohya"]), 0.5)]
    assert all(len(r["sha256"]) == 64 and r["components"] == ["text_encoder", "unet"] for r in records)
    text = format_inspection(inspect_build(lora_build))
    assert f"LoRA {loras['style']} at scale 0.8" in text


def test_a_changed_lora_file_is_refused_by_the_torch_reference(lora_build, loras, tmp_path, tiny_models):
    from controlrt.export.build import export_build
    from controlrt.runtime.backends import open_sources

    copy = tmp_path / "mine.safetensors"
    shutil.copy2(loras["unet-only"], copy)
    build = tmp_path / "build"
    export_build(tiny_models.base, tiny_models.controlnets[:1], build, loras=[Lora(copy)], validate=False)
    shutil.copy2(loras["style"], copy)  # the user replaced the file
    with pytest.raises(BuildError, match=r"changed since it was exported.*LoRAs"):
        open_sources(Build.open(build).manifest)
    copy.unlink()
    with pytest.raises(BuildError, match="does not exist"):
        open_sources(Build.open(build).manifest)


def test_lora_command_swaps_and_clears_without_touching_the_controlnets(
    lora_build, loras, tiny_models, tiny_build, tmp_path
):
    from click.testing import CliRunner

    from controlrt.cli import cli
    from controlrt.export.build import export_build
    from controlrt.export.fp16 import convert_build
    from controlrt.runtime.pipeline import Pipeline

    build = shutil.copytree(lora_build, tmp_path / "build")
    convert_build(build)  # an fp16 variant to be made again
    controlnet_files = {n: Build.open(build).variant(n).files for n in ("controlnet_0", "controlnet_1")}
    result = CliRunner().invoke(cli, ["lora", str(build), "--set", f"{loras['unet-only']}:1.5"])
    assert result.exit_code == 0, result.output
    assert "re-exported: text_encoder, unet" in result.output and "unet fp16" in result.output
    now = Build.open(build)  # every file matches its hash
    assert {n: now.variant(n).files for n in controlnet_files} == controlnet_files
    assert [(r["path"], r["scale"]) for r in now.manifest.sources["base"]["loras"]] == [(str(loras["unet-only"]), 1.5)]
    # the build now computes what a fresh export with that LoRA computes
    fresh = tmp_path / "fresh"
    export_build(tiny_models.base, tiny_models.controlnets, fresh, loras=[Lora(loras["unet-only"], 1.5)])
    settings = {"controls": sample_control_images(2, 64, 64), **SETTINGS}
    with Pipeline.load(build) as a, Pipeline.load(fresh) as b:
        assert np.array_equal(np.asarray(a(PROMPT, **settings)), np.asarray(b(PROMPT, **settings)))
    with Pipeline.load(build, precision="fp16") as a, Pipeline.load(fresh) as b:
        assert psnr(np.asarray(b(PROMPT, **settings)), np.asarray(a(PROMPT, **settings))) >= end_to_end_gate("fp16")
    # parity against the torch reference (which fuses the recorded LoRAs) passes
    from controlrt.parity import run_parity

    assert run_parity(build, steps=2).passed
    # --clear: the base's own weights, as the plain build
    result = CliRunner().invoke(cli, ["lora", str(build), "--clear"])
    assert result.exit_code == 0, result.output
    assert "loras" not in Build.open(build).manifest.sources["base"]
    with Pipeline.load(build) as a, Pipeline.load(tiny_build) as b:
        assert np.array_equal(np.asarray(a(PROMPT, **settings)), np.asarray(b(PROMPT, **settings)))
    assert not [p for p in build.iterdir() if p.name.startswith(".lora-")]


def test_int8_variants_are_dropped_with_a_message(lora_build, loras, tmp_path):
    from controlrt.export.loras import set_loras
    from controlrt.manifest import Variant

    build = shutil.copytree(lora_build, tmp_path / "build")
    current = Build.open(build)
    fp32 = current.variant("unet")
    manifest = current.manifest.with_variants("int8", {"unet": Variant(fp32.files, [], {"quantizer": "test"})})
    manifest.write(build)  # stands in for a calibrated variant (the same files: nothing else to delete)
    change = set_loras(build, [Lora(loras["style"], 0.3)])
    assert change.dropped == ("unet int8",)
    assert "run controlrt calibrate again" in "\n".join(change.summary())
    assert "int8" not in Build.open(build).manifest.graphs["unet"].variants


def test_bad_loras(tiny_models, loras, tmp_path, lora_build):
    from click.testing import CliRunner

    from controlrt.cli import cli

    with pytest.raises(InputError, match="does not exist"):
        Lora.parse(str(tmp_path / "nope.safetensors"))
    with pytest.raises(InputError, match="scale"):
        Lora.parse(f"{loras['style']}:1e9")
    assert Lora.parse(f"{loras['style']}:0.25").scale == 0.25
    assert Lora.parse(str(loras["style"].parent)).path == loras["style"]  # a diffusers LoRA folder
    base = BaseModel.open(tiny_models.base)
    with pytest.raises(InputError, match="given twice"):
        base.with_loras([Lora(loras["style"]), Lora(loras["style"], 0.5)])
    junk = tmp_path / "junk.safetensors"
    from safetensors.torch import save_file

    save_file({"something.else": torch.zeros(2)}, junk)
    with pytest.raises((InputError, ModelError)):
        base.with_loras([Lora(junk)])
    # a LoRA made for another architecture does not fit
    other = write_diffusers_lora(tiny_models.base, tmp_path / "wide", seed=9)
    from safetensors.torch import load_file

    state = {k: torch.cat([v, v], dim=-1) if "lora_A" in k else v for k, v in load_file(other).items()}
    save_file(state, other)
    with pytest.raises(ModelError, match="does not fit"):
        base.with_loras([Lora(other)]).load_unet()
    runner = CliRunner()
    for args in (["lora", str(lora_build)], ["lora", str(lora_build), "--clear", "--set", str(loras["style"])]):
        result = runner.invoke(cli, args)
        assert result.exit_code == 2 and result.output.startswith("error: "), result.output
        assert len(result.output.strip().splitlines()) == 1
    result = runner.invoke(cli, ["lora", str(lora_build), "--set", str(tmp_path / "missing.safetensors")])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_sdxl_lora_on_the_unet_and_both_text_encoders(xl_models, tmp_path):
    """SDXL: the UNet and both text encoders fused as StableDiffusionXLPipeline fuses them."""
    from diffusers import StableDiffusionXLPipeline
    from lora_files import write_sdxl_lora

    lora = write_sdxl_lora(xl_models.base, tmp_path / "xl-lora", seed=3)
    base = BaseModel.open(xl_models.base).with_loras([Lora(lora, 0.7)])
    assert set(read_lora(Lora(lora), "StableDiffusionXLPipeline")) == {"unet", "text_encoder", "text_encoder_2"}
    reference = StableDiffusionXLPipeline.from_pretrained(xl_models.base)
    reference.load_lora_weights(str(lora))
    reference.fuse_lora(lora_scale=0.7, components=["unet", "text_encoder", "text_encoder_2"])
    reference.unload_lora_weights()
    assert _max_difference(base.load_unet(), reference.unet) < 1e-5
    for name in ("text_encoder", "text_encoder_2"):
        fused = base.load_text_encoder(name)
        assert _max_difference(fused, getattr(reference, name)) < 1e-5
        assert _max_difference(fused, BaseModel.open(xl_models.base).load_text_encoder(name)) > 1e-2


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_transformer_loras_match_diffusers(family, request, tmp_path):
    """SD3's and Flux's LoRAs: the transformer and the first CLIP fused as their pipelines'
    load_lora_weights + fuse_lora fuse them, and a build exported with one gives their ControlNet
    pipeline's image."""
    import diffusers
    from lora_files import write_transformer_lora

    from controlrt.export.build import export_build
    from controlrt.runtime.pipeline import Pipeline

    root = request.getfixturevalue(family)
    pipeline, controlnet_pipeline, net, size = {
        "sd3": ("StableDiffusion3Pipeline", "StableDiffusion3ControlNetPipeline", "SD3ControlNetModel", (64, 64)),
        "flux": ("FluxPipeline", "FluxControlNetPipeline", "FluxControlNetModel", (64, 96)),
    }[family]
    lora = write_transformer_lora(root / "base", tmp_path / "lora", seed=9, pipeline=pipeline)
    assert set(read_lora(Lora(lora), pipeline)) == {"transformer", "text_encoder"}
    base = BaseModel.open(root / "base").with_loras([Lora(lora, 0.7)])
    plain = BaseModel.open(root / "base")

    controlnet = getattr(diffusers, net).from_pretrained(root / "canny")
    reference = getattr(diffusers, controlnet_pipeline).from_pretrained(root / "base", controlnet=controlnet)
    reference.set_progress_bar_config(disable=True)
    reference.load_lora_weights(str(lora))
    reference.fuse_lora(lora_scale=0.7, components=["transformer", "text_encoder"])
    reference.unload_lora_weights()
    assert _max_difference(base.load_unet(), reference.transformer) < 1e-5
    assert _max_difference(base.load_text_encoder(), reference.text_encoder) < 1e-5
    assert _max_difference(base.load_unet(), plain.load_unet()) > 1e-2  # the LoRA changed the weights

    image = sample_control_images(1, *size)[0]
    settings = {"num_inference_steps": 3, "guidance_scale": 4.0, "controlnet_conditioning_scale": 0.8}
    torch.manual_seed(3)  # SD3's pipeline samples the control latents from the global generator
    expected = reference(
        "a red house",
        control_image=image,
        generator=torch.Generator("cpu").manual_seed(3),
        height=size[0],
        width=size[1],
        **settings,
    ).images[0]
    export_build(root / "base", [root / "canny"], tmp_path / "build", loras=[Lora(lora, 0.7)])
    with Pipeline.load(tmp_path / "build", backend="onnxruntime") as pipe:
        ours = {"steps": 3, "guidance": 4.0, "scales": 0.8, "seed": 3, "height": size[0], "width": size[1]}
        got = pipe("a red house", controls=[image], **ours)
    expected, got = np.asarray(expected), np.asarray(got)
    assert expected.std() > 5
    assert psnr(expected, got) >= GATE
    unfused = getattr(diffusers, controlnet_pipeline).from_pretrained(root / "base", controlnet=controlnet)
    unfused.set_progress_bar_config(disable=True)
    torch.manual_seed(3)
    generator = torch.Generator("cpu").manual_seed(3)
    plain_image = unfused(
        "a red house", control_image=image, generator=generator, height=size[0], width=size[1], **settings
    )
    assert psnr(np.asarray(plain_image.images[0]), got) < 40  # the LoRA changes the image
    assert Build.open(tmp_path / "build").manifest.sources["base"]["loras"][0]["components"] == [
        "text_encoder",
        "transformer",
    ]
