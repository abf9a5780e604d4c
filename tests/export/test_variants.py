"""Adding precision variants to a build: new names, the manifest last, concurrent commands kept."""

from __future__ import annotations

import shutil

import pytest

from controlrt.errors import BuildError
from controlrt.export.fp16 import convert_build
from controlrt.export.onnx_export import save_onnx
from controlrt.export.variants import write_variants
from controlrt.manifest import Build, Manifest
from controlrt.precision import Precision


@pytest.fixture
def build(tiny_build, tmp_path):
    return shutil.copytree(tiny_build, tmp_path / "build")


def _copy_graph(build_dir):
    """A stand-in producer: the fp32 graph itself, under the new name."""
    import onnx

    def produce(spec, target):
        return save_onnx(onnx.load(str(Build.open(build_dir).graph_path(spec.name))), target)

    return produce


def test_rerunning_convert_never_touches_the_listed_files_before_the_new_manifest(build, monkeypatch):
    convert_build(build, "fp16")
    first = {n: g.variants["fp16"].files[0] for n, g in Build.open(build).manifest.graphs.items()}
    listed = {f.path: (build / f.path).read_bytes() for f in first.values()}

    def crash(self, root):
        raise OSError("the machine went down")

    monkeypatch.setattr(Manifest, "write", crash)
    with pytest.raises(OSError, match="went down"):
        convert_build(build, "fp16")
    monkeypatch.undo()
    Build.open(build, verify=True)  # every listed file still matches its hash
    assert {p: (build / p).read_bytes() for p in listed} == listed

    convert_build(build, "fp16")  # the leftovers of the crash do not stop a new run
    second = {n: g.variants["fp16"].files[0] for n, g in Build.open(build, verify=True).manifest.graphs.items()}
    assert all(second[n].path != first[n].path for n in first)
    assert not any((build / p).exists() for p in listed)  # the replaced files are gone, after the manifest


def test_a_variant_written_meanwhile_is_kept(build):
    """Two commands adding variants to one build: each adds to the manifest the other wrote."""
    names = ["unet", "controlnet_0"]
    copy = _copy_graph(build)

    def produce(spec, target):
        if spec.name == names[0]:
            convert_build(build, "fp16")  # another command commits while this one works
        return copy(spec, target)

    write_variants(Build.open(build), Precision.INT8, names, produce, lambda spec, path: [], {"quantizer": "test"})
    manifest = Build.open(build, verify=True).manifest
    assert all("fp16" in g.variants for g in manifest.graphs.values())
    assert all("int8" in manifest.graphs[n].variants for n in names)


def test_variants_of_a_graph_replaced_meanwhile_are_refused(build, tiny_models):
    from controlrt.export.build import export_build

    def produce(spec, target):
        files = _copy_graph(build)(spec, target)
        export_build(tiny_models.base, tiny_models.controlnets[::-1], build, force=True, validate=False)
        return files

    with pytest.raises(BuildError, match="changed while"):
        write_variants(Build.open(build), Precision.FP16, ["controlnet_0"], produce, lambda s, p: [], {})
    assert "fp16" not in Build.open(build).manifest.graphs["controlnet_0"].variants


def test_variants_keep_the_exports_tool_record(build):
    tools = Build.open(build).manifest.tools
    convert_build(build, "fp16")
    manifest = Build.open(build).manifest
    assert manifest.tools == tools
    assert manifest.graphs["unet"].variants["fp16"].settings["tools"]["onnxruntime"]
