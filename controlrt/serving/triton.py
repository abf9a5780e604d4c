"""``controlrt triton-repo BUILD --out REPO``: a Triton Inference Server model repository.

    REPO/
      text_encoder/config.pbtxt, 1/model.plan     one TensorRT model per engine
      controlnet_0/ …, unet/ …, vae_decoder/ …
      controlrt/config.pbtxt, 1/model.py          Python backend: the denoise loop, calling the
                                                  models above through BLS

Each TensorRT model's inputs and outputs, types and dimensions come from the graph spec (symbolic
axes become -1, batch included: max_batch_size 0, since the engines' profiles carry the batch).
Plans are copied from ``controlrt build``'s engines, which must be current for their ONNX.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from controlrt.errors import BuildError, InputError
from controlrt.io import output_folder, sha256_file, staged_folder
from controlrt.manifest import Build
from controlrt.precision import Precision
from controlrt.specs import Axis, GraphSpec, TensorSpec

TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32"}
PIPELINE_MODEL = "controlrt"


def _tensor(t: TensorSpec) -> str:
    dims = ", ".join("-1" if isinstance(d, Axis) else str(d) for d in t.shape)
    return f'  {{\n    name: "{t.name}"\n    data_type: {TYPES[t.dtype]}\n    dims: [ {dims} ]\n  }}'


def engine_config(spec: GraphSpec, instances: int = 1) -> str:
    """config.pbtxt of the TensorRT model serving ``spec``'s engine."""
    inputs = ",\n".join(_tensor(t) for t in spec.inputs)
    outputs = ",\n".join(_tensor(t) for t in spec.outputs)
    return (
        f'name: "{spec.name}"\n'
        'platform: "tensorrt_plan"\n'
        "max_batch_size: 0\n"
        f"input [\n{inputs}\n]\n"
        f"output [\n{outputs}\n]\n"
        f"instance_group [\n  {{\n    count: {instances}\n    kind: KIND_GPU\n  }}\n]\n"
    )


def pipeline_config(build: Path, precision: Precision, instances: int = 1) -> str:
    """config.pbtxt of the Python-backend model that runs the denoise loop."""
    return (
        f'name: "{PIPELINE_MODEL}"\n'
        'backend: "python"\n'
        "max_batch_size: 0\n"
        'input [\n  {\n    name: "request"\n    data_type: TYPE_STRING\n    dims: [ 1 ]\n  }\n]\n'
        'output [\n  {\n    name: "image"\n    data_type: TYPE_UINT8\n    dims: [ -1 ]\n  }\n]\n'
        f"instance_group [\n  {{\n    count: {instances}\n    kind: KIND_CPU\n  }}\n]\n"
        f'parameters {{\n  key: "build"\n  value: {{ string_value: "{build}" }}\n}}\n'
        f'parameters {{\n  key: "precision"\n  value: {{ string_value: "{precision}" }}\n}}\n'
    )


def write_triton_repo(
    build_dir: str | Path, out_dir: str | Path, precision: str = "fp16", instances: int = 1, force: bool = False
) -> Path:
    """Write the repository for the build's ``precision`` engines; BuildError if one is missing."""
    from controlrt.engine.cache import EngineStore

    precision = Precision.parse(precision)
    if instances < 1:
        raise InputError("--instances must be at least 1")
    build = Build.open(build_dir)
    store = EngineStore(build)
    plans = {}
    command = f"controlrt build {build.path} --precision {precision}"
    for name, record in build.manifest.graphs.items():
        variant = record.runs_in(precision)
        engine, reasons = store.problems(name, variant)  # TensorRT and GPU are Triton's machine's
        if engine is None:
            raise BuildError(f"build {build.path} has no {variant} engine for {name}; run {command}")
        if reasons:
            raise BuildError(f"the {variant} engine for {name} is stale: {'; '.join(reasons)}; run {command}")
        if engine.key.options.weight_stripped:
            raise BuildError(f"the {name} engine is weight-stripped; Triton loads plans as they are: {command}")
        plans[name] = (store.plan_path(name, variant), engine.plan_sha256)
    with staged_folder(out_dir, "triton-repo", force) as staging:
        for name, (plan, digest) in plans.items():
            (staging / name / "1").mkdir(parents=True)
            shutil.copyfile(plan, staging / name / "1" / "model.plan")
            if sha256_file(staging / name / "1" / "model.plan") != digest:
                raise BuildError(f"the {name} engine changed while it was copied; run controlrt triton-repo again")
            (staging / name / "config.pbtxt").write_text(engine_config(build.manifest.spec(name), instances))
        (staging / PIPELINE_MODEL / "1").mkdir(parents=True)
        shutil.copyfile(Path(__file__).with_name("triton_model.py"), staging / PIPELINE_MODEL / "1" / "model.py")
        (staging / PIPELINE_MODEL / "config.pbtxt").write_text(pipeline_config(build.path, precision, instances))
    return output_folder(out_dir)
