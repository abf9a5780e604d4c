"""The package's layering: model families in one place each, no import circle, engine/ below runtime/."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from conftest import write_config_folders

from controlrt.builtin import TINY, Architecture
from controlrt.families import FAMILIES, StableDiffusion, StableDiffusionXL, family_for, family_of
from controlrt.models import BaseModel

PACKAGE = Path(__file__).resolve().parents[1] / "controlrt"


def _imports() -> dict[str, set[str]]:
    """Every controlrt module and the controlrt modules it imports, at module level or in a function."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            edges[name] |= {t for t in targets if t in modules and t != name}
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                component.append(w)
            if component:
                found.append(sorted([v, *component]))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_no_import_circle_in_the_package():
    assert _cycles(_imports()) == []


def test_the_cycle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_engine_does_not_import_runtime():
    edges = _imports()
    wrong = sorted((a, b) for a in edges for b in edges[a] if a.startswith("controlrt.engine") and "runtime" in b)
    assert wrong == []


def test_family_switches_live_in_the_family_files():
    """No "is it SDXL / is it LCM" test outside controlrt/families/: the layers ask the family."""
    pattern = re.compile(r"\.sdxl\b|embedded_guidance")
    outside = [
        f"{path.relative_to(PACKAGE)}:{n}"
        for path in PACKAGE.rglob("*.py")
        if "families" not in path.parts
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert outside == []


def test_each_model_is_of_one_family(tmp_path):
    base, _ = write_config_folders(tmp_path)
    info = BaseModel.open(base).info()
    assert isinstance(family_of(info), StableDiffusion) and family_of(info).name == "sd"
    assert family_of(info).added_conditions() == [] and family_of(info).text_layer == "last"
    sdxl = family_of(type(info)(**{**info.__dict__, "pooled_dim": 32, "time_ids": 6, "text_hidden_sizes": (16, 16)}))
    assert isinstance(sdxl, StableDiffusionXL)
    assert sdxl.added_condition_names == ("text_embeds", "time_ids") and sdxl.text_layer == "penultimate"
    assert [f.name for f in FAMILIES] == ["flux", "sd3", "sdxl", "sd"]  # the specific before the general
    assert TINY.family == "sd" and Architecture(text_widths=(16, 16), pooled_dim=32).family == "sdxl"


def test_each_family_reads_its_own_configs(tmp_path):
    base, _ = write_config_folders(tmp_path)
    configs = BaseModel.open(base).configs
    assert family_for(configs) is StableDiffusion and StableDiffusion.read_conditions(configs) == {}
    xl = {**configs, "unet": {**configs["unet"], "addition_embed_type": "text_time"}}
    assert family_for(xl) is StableDiffusionXL
    with pytest.raises(Exception, match="lists no text_encoder_2"):  # its configs are the family's to check
        StableDiffusionXL.read_conditions(xl)
    two = {**xl, "text_encoder_2": {"hidden_size": 8, "projection_dim": 12}}
    two["unet"] = {**xl["unet"], "addition_time_embed_dim": 4, "projection_class_embeddings_input_dim": 12 + 6 * 4}
    read = StableDiffusionXL.read_conditions(two)
    assert read["time_ids"] == 6 and read["pooled_dim"] == 12
    assert read["text_hidden_sizes"] == (configs["text_encoder"]["hidden_size"], 8)


@pytest.mark.parametrize("mode", ["uniform", "guess", "cfg-rw"])
def test_family_weights_are_the_control_modes_block_weights(tmp_path, mode):
    from controlrt.control import ControlMode, block_weights, residual_divisors

    base, _ = write_config_folders(tmp_path)
    family = family_of(BaseModel.open(base).info())
    expected = block_weights(ControlMode(mode), residual_divisors(family.unet_spec()))
    assert family.control_weights(ControlMode(mode)).tolist() == expected.tolist()


def test_graph_modules_are_the_familys_declaration(tmp_path):
    """Which torch module computes each graph is the family's: graphs.py knows neither models nor families."""
    from controlrt.errors import ModelError
    from controlrt.families import load_graph_module
    from controlrt.graphs import ControlNetGraph, TextEncoderGraph, UNetGraph, VaeDecoderGraph, VaeEncoderGraph
    from controlrt.models import ControlNetModelFolder
    from controlrt.specs import GraphKind

    assert not {m for m in _imports()["controlrt.graphs"] if m.startswith(("controlrt.models", "controlrt.fam"))}
    base_dir, controlnet_dir = write_config_folders(tmp_path)
    base, controlnets = BaseModel.open(base_dir), [ControlNetModelFolder.open(controlnet_dir)]
    family = family_of(base.info())
    specs = family.graph_specs(controlnets)
    assert {s.kind for s in specs} == set(family.module_factories())
    wrappers = {
        "text_encoder": TextEncoderGraph,
        "controlnet_0": ControlNetGraph,
        "unet": UNetGraph,
        "vae_decoder": VaeDecoderGraph,
        "vae_encoder": VaeEncoderGraph,
    }
    for spec in specs:
        module = load_graph_module(spec, base, controlnets, meta=True)
        assert type(module) is wrappers[spec.name] and not module.training
        assert all(p.is_meta for p in module.parameters())

    class NoVae(StableDiffusion):
        def module_factories(self):
            return {k: v for k, v in super().module_factories().items() if k is not GraphKind.VAE_ENCODER}

    with pytest.raises(ModelError, match=r"SD 1\.x/2\.x models have no vae_encoder graph"):
        NoVae(base.info()).graph_module(specs[-1], base, controlnets, meta=True)


def test_each_familys_default_guidance_is_its_diffusers_pipelines():
    import inspect

    import diffusers

    from controlrt.families import Flux, StableDiffusion3

    pipelines = {
        Flux: "FluxControlNetPipeline",
        StableDiffusion: "StableDiffusionControlNetPipeline",
        StableDiffusionXL: "StableDiffusionXLControlNetPipeline",
        StableDiffusion3: "StableDiffusion3ControlNetPipeline",
    }
    for family, name in pipelines.items():
        call = inspect.signature(getattr(diffusers, name).__call__)
        assert family.default_guidance == call.parameters["guidance_scale"].default, name
