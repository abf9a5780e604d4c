"""SD3/SD3.5 and Flux single-file checkpoints: files in the originals' names written by the test from the
small sets, converted back, compared weight by weight; FLUX.1's own widths against diffusers' converter."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from original_layout import (
    flux_transformer_to_original,
    sd3_transformer_to_original,
    text_encoder_to_original,
    vae_to_original,
)
from safetensors.torch import save_file

from controlrt.errors import InputError, ModelError
from controlrt.models import BaseModel
from controlrt.transformer_checkpoints import convert_base_checkpoint, flux_transformer_to_diffusers


def _save(state: dict[str, torch.Tensor], path, dtype=None):
    """A safetensors file of ``state``, tied tensors (T5's shared embedding) once, as published files hold them."""
    seen, out = set(), {}
    for key, value in state.items():
        if value.data_ptr() not in seen:
            seen.add(value.data_ptr())
            out[key] = (value.to(dtype) if dtype else value).contiguous()
    save_file(out, path)
    return path


def _modules(base, components):
    import diffusers
    import transformers

    index = json.loads((base / "model_index.json").read_text())
    out = {}
    for name in components:
        library, cls = index[name]
        out[name] = getattr(diffusers if library == "diffusers" else transformers, cls).from_pretrained(base / name)
    return out


def _same(a: torch.nn.Module, b: torch.nn.Module, dtype=None) -> bool:
    """Equal weights (``b``'s cast to ``dtype`` first, as a 16-bit file stores them)."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k].to(dtype or sb[k].dtype)) for k in sa)


def _stored_dtypes(folder) -> set[str]:
    from safetensors import safe_open

    dtypes = set()
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            dtypes |= {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118
    return dtypes


@pytest.fixture(scope="module")
def sd3_files(tmp_path_factory):
    """The small SD3 set with an SD3.5-Medium-like transformer (query/key norms, a second attention in
    the first block), as Stability AI's single file (transformer, VAE and the three text encoders, fp32)
    and as a transformer-only file (bf16)."""
    from diffusers import SD3Transformer2DModel
    from sd3_files import write_sd3

    root = tmp_path_factory.mktemp("sd3-single")
    base, _ = write_sd3(root / "models")
    config = {k: v for k, v in SD3Transformer2DModel.load_config(base / "transformer").items() if k[0] != "_"}
    torch.manual_seed(7)
    transformer = SD3Transformer2DModel(**{**config, "qk_norm": "rms_norm", "dual_attention_layers": (0,)})
    shutil.rmtree(base / "transformer")
    transformer.save_pretrained(base / "transformer")
    modules = _modules(base, ["vae", "text_encoder", "text_encoder_2", "text_encoder_3"])
    vae = modules["vae"]
    state = {
        **sd3_transformer_to_original(transformer.state_dict()),
        **vae_to_original(vae.state_dict(), dict(vae.config)),
    }
    for component, name in (("text_encoder", "clip_l"), ("text_encoder_2", "clip_g"), ("text_encoder_3", "t5xxl")):
        weights = {k: v for k, v in modules[component].state_dict().items() if "position_ids" not in k}
        state.update(text_encoder_to_original(weights, f"text_encoders.{name}.transformer."))
    return {
        "base": base,
        "all": _save(state, root / "sd3.5.safetensors"),
        "transformer": _save(
            sd3_transformer_to_original(transformer.state_dict()), root / "mmdit.safetensors", torch.bfloat16
        ),
        "models": {"transformer": transformer, **modules},
        "root": root,
    }


def test_an_sd3_single_file_converts_to_its_models(sd3_files, tmp_path):
    out = convert_base_checkpoint(sd3_files["all"], tmp_path / "sd35", config=sd3_files["base"])
    BaseModel.open(out)
    got = _modules(out, sd3_files["models"])
    for name, module in sd3_files["models"].items():
        assert _same(got[name], module), name
    source = json.loads((out / "controlrt_source.json").read_text())
    assert set(source["converted"]) == {"transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"}
    assert (out / "tokenizer_3").is_dir() and (out / "scheduler" / "scheduler_config.json").is_file()


def test_a_transformer_file_takes_the_rest_from_the_config_folder(sd3_files, tmp_path):
    out = convert_base_checkpoint(sd3_files["transformer"], tmp_path / "finetune", config=sd3_files["base"])
    assert _stored_dtypes(out / "transformer") == {"BF16"}  # the file's dtype, kept
    got = _modules(out, ["transformer"])["transformer"]
    assert _same(got.to(torch.bfloat16), sd3_files["models"]["transformer"], torch.bfloat16)
    for component in ("vae", "text_encoder_3"):
        for file in (sd3_files["base"] / component).iterdir():
            assert (out / component / file.name).read_bytes() == file.read_bytes()
            linked = (out / component / file.name).stat().st_ino == file.stat().st_ino
            assert linked == (file.suffix == ".safetensors")  # weights linked, configs copied
    assert json.loads((out / "controlrt_source.json").read_text())["converted"] == ["transformer"]


def test_bad_transformer_checkpoints_are_one_line_and_write_nothing(sd3_files, flux_files, tmp_path):
    from diffusers import SD3Transformer2DModel

    out = tmp_path / "out"
    with pytest.raises(InputError, match="give --config DIR, the diffusers StableDiffusion3Pipeline folder"):
        convert_base_checkpoint(sd3_files["all"], out)
    with pytest.raises(InputError, match="is a Flux pipeline folder; give the StableDiffusion3Pipeline folder"):
        convert_base_checkpoint(sd3_files["all"], out, config=flux_files["base"])
    with pytest.raises(InputError, match="its tokenizers come from --config"):
        convert_base_checkpoint(
            sd3_files["all"], out, config=sd3_files["base"], tokenizer=sd3_files["base"] / "tokenizer"
        )
    with pytest.raises(InputError, match="--config: "):
        convert_base_checkpoint(sd3_files["all"], out, config=tmp_path)
    # a folder of the same family whose transformer has another depth
    other = tmp_path / "deeper"
    shutil.copytree(sd3_files["base"], other)
    config = SD3Transformer2DModel.load_config(other / "transformer")
    (other / "transformer" / "config.json").write_text(json.dumps({**config, "num_layers": config["num_layers"] + 1}))
    with pytest.raises(ModelError, match="the checkpoint's transformer does not match its config: missing"):
        convert_base_checkpoint(sd3_files["all"], out, config=other)
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))


@pytest.fixture(scope="module")
def flux_files(tmp_path_factory):
    """The small Flux set's transformer in Black Forest Labs' names (bf16, as published), and a
    ComfyUI-style all-in-one file (the transformer under model.diffusion_model., the VAE, CLIP-L, T5)."""
    from flux_files import write_flux

    root = tmp_path_factory.mktemp("flux-single")
    base, _ = write_flux(root / "models")
    modules = _modules(base, ["transformer", "vae", "text_encoder", "text_encoder_2"])
    transformer = modules["transformer"].state_dict()
    vae = modules["vae"]
    state = {
        **flux_transformer_to_original(transformer, "model.diffusion_model."),
        **vae_to_original(vae.state_dict(), dict(vae.config)),
    }
    for component, name in (("text_encoder", "clip_l"), ("text_encoder_2", "t5xxl")):
        weights = {k: v for k, v in modules[component].state_dict().items() if "position_ids" not in k}
        state.update(text_encoder_to_original(weights, f"text_encoders.{name}.transformer."))
    torch.save({"state_dict": flux_transformer_to_original(transformer)}, root / "flux1.pt")
    return {
        "base": base,
        "pickle": root / "flux1.pt",
        "bfl": _save(flux_transformer_to_original(transformer), root / "flux1.safetensors", torch.bfloat16),
        "all": _save(state, root / "flux1-aio.safetensors"),
        "models": modules,
    }


def test_flux_single_files_convert_to_their_models(flux_files, tmp_path):
    out = convert_base_checkpoint(flux_files["all"], tmp_path / "aio", config=flux_files["base"])
    BaseModel.open(out)
    got = _modules(out, flux_files["models"])
    for name, module in flux_files["models"].items():
        assert _same(got[name], module), name
    out = convert_base_checkpoint(flux_files["bfl"], tmp_path / "bfl", config=flux_files["base"])
    assert _stored_dtypes(out / "transformer") == {"BF16"}
    got = _modules(out, ["transformer"])["transformer"]
    assert _same(got.to(torch.bfloat16), flux_files["models"]["transformer"], torch.bfloat16)
    assert json.loads((out / "controlrt_source.json").read_text())["converted"] == ["transformer"]
    out = convert_base_checkpoint(flux_files["pickle"], tmp_path / "pickled", config=flux_files["base"])
    assert _same(_modules(out, ["transformer"])["transformer"], flux_files["models"]["transformer"])


def test_the_flux_converter_is_diffusers_at_flux1_widths():
    """diffusers' converter fixes the block width at FLUX.1's 3072 (so it cannot read the small set);
    controlrt's reads it from the weights. At 3072, on tensors one column wide, both give the same."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    with torch.device("meta"):
        shapes = FluxTransformer2DModel(
            num_layers=2, num_single_layers=2, attention_head_dim=128, num_attention_heads=24, guidance_embeds=True
        ).state_dict()
    generator = torch.Generator().manual_seed(0)
    thin = {
        k: torch.randn(v.shape[:1] if v.ndim == 1 else (v.shape[0], 1), generator=generator) for k, v in shapes.items()
    }
    original = flux_transformer_to_original(thin)
    want = convert_flux_transformer_checkpoint_to_diffusers(dict(original))
    got = flux_transformer_to_diffusers(dict(original))
    assert got.keys() == want.keys() == thin.keys()
    assert all(torch.equal(got[k], want[k]) and torch.equal(got[k], thin[k]) for k in got)


def test_convert_checkpoint_command_takes_transformer_files(sd3_files, tmp_path):
    from click.testing import CliRunner

    from controlrt.cli import cli

    def run(*args):
        return CliRunner().invoke(cli, [str(a) for a in args])

    out = tmp_path / "sd35"
    result = run("convert-checkpoint", "sd", sd3_files["transformer"], "--out", out, "--config", sd3_files["base"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(out.resolve())
    again = run("convert-checkpoint", "sd", sd3_files["transformer"], "--out", out, "--config", sd3_files["base"])
    assert again.exit_code == 2 and "--force" in again.output and len(again.output.strip().splitlines()) == 1
    bare = run("convert-checkpoint", "sd", sd3_files["transformer"], "--out", tmp_path / "x")
    assert bare.exit_code == 2 and bare.output.startswith("error: ") and len(bare.output.strip().splitlines()) == 1
