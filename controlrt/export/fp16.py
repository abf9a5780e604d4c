"""``controlrt convert BUILD --precision fp16``: fp16 variants of every graph.

Weights and most arithmetic become fp16; inputs and outputs stay fp32 (``keep_io_types``), so the
runtime feeds every precision the same tensors. Numerically fragile parts stay fp32:

- ops in FP16_OP_BLOCK_LIST: normalisation statistics (InstanceNormalization, which is how
  GroupNorm exports, LayerNormalization, GroupNormalization) and Softmax;
- nodes whose names contain FP16_NODE_PATTERNS: the sinusoidal timestep embedding and its MLP
  (timesteps up to 1000 times a frequency lose their phase in fp16), and the VAE decoder's last
  normalisation and convolution, which set the final pixel values.
"""

from __future__ import annotations

from pathlib import Path

from controlrt.compare import compare_in_turn, seeded_cases
from controlrt.errors import InputError
from controlrt.export.onnx_export import save_onnx
from controlrt.export.variants import write_variants
from controlrt.families import family_of
from controlrt.manifest import Build, Manifest
from controlrt.precision import Precision
from controlrt.specs import GraphSpec

FP16_OP_BLOCK_LIST = (
    "InstanceNormalization",
    "GroupNormalization",
    "LayerNormalization",
    "Softmax",
)
FP16_NODE_PATTERNS = (
    "/time_proj/",
    "/time_embedding/",
    "/decoder/conv_norm_out/",
    "/decoder/conv_out/",
)


def convert_graph_fp16(source: Path, target: Path) -> list[Path]:
    """Write an fp16 copy of the fp32 ONNX graph ``source`` to ``target``."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_model
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    large = source.with_name(source.name + ".data").exists()  # export's rule for big graphs
    if not large:
        model = onnx.load(str(source))
    else:
        # The converter's own shape inference cannot serialise a >2 GiB model; infer on the file
        # instead, so it still knows every value's type when placing casts around blocked nodes.
        inferred = source.with_name(f".{source.stem}.inferred.onnx")
        try:
            onnx.shape_inference.infer_shapes_path(str(source), str(inferred))
            model = onnx.load(str(inferred), load_external_data=False)
        finally:
            inferred.unlink(missing_ok=True)
        load_external_data_for_model(model, str(source.parent))
    nodes = [n.name for n in model.graph.node if any(p in n.name for p in FP16_NODE_PATTERNS)]
    converted = convert_float_to_float16(
        model,
        keep_io_types=True,
        op_block_list=[*DEFAULT_OP_BLOCK_LIST, *FP16_OP_BLOCK_LIST],
        node_block_list=nodes,
        disable_shape_infer=large,  # done above
    )
    del model
    _drop_repeated_casts(converted)
    return save_onnx(converted, target, external=large)


def _drop_repeated_casts(model) -> None:
    """Remove exact repeats of a node (same op, inputs, outputs, attributes).

    Some onnxruntime releases (1.30) insert one identical Cast per blocked consumer of a value,
    all with the same name and output, which makes the model invalid; the first one suffices.
    """
    seen: set[bytes] = set()
    keep = []
    for node in model.graph.node:
        key = node.SerializeToString()
        if node.op_type == "Cast" and key in seen:
            continue
        seen.add(key)
        keep.append(node)
    if len(keep) != len(model.graph.node):
        del model.graph.node[:]
        model.graph.node.extend(keep)


def convert_build(
    build_dir: str | Path, precision: str | Precision = Precision.FP16, progress: bool = False
) -> Manifest:
    """Add fp16 variants of every graph to a build, each checked against its fp32 graph."""
    from controlrt.ort_session import OrtSession

    precision = Precision.parse(precision)
    if precision is not Precision.FP16:
        hint = "controlrt calibrate" if precision is Precision.INT8 else "controlrt export"
        raise InputError(f"convert makes fp16 graphs; {precision} graphs come from {hint}")
    build = Build.open(build_dir)
    build.require_fp32_graphs("convert")

    family = family_of(build.manifest.info)
    kept = family.kept_in_fp32()  # graph name -> why its fp16 variant is its fp32 graph

    def produce(spec: GraphSpec, target: Path) -> list[Path]:
        source = build.graph_path(spec.name)
        if spec.name in kept:
            import onnx

            return save_onnx(onnx.load(str(source)), target)
        return convert_graph_fp16(source, target)

    def check(spec: GraphSpec, path: Path):
        return compare_in_turn(
            lambda: OrtSession(build.graph_path(spec.name), spec),
            lambda: OrtSession(path, spec),
            seeded_cases(spec),
            family.tolerance(Precision.FP16, spec.kind),
        )

    settings = {
        "converter": "onnxruntime.transformers.float16.convert_float_to_float16",
        "keep_io_types": True,
        "op_block_list": list(FP16_OP_BLOCK_LIST),
        "node_patterns": list(FP16_NODE_PATTERNS),
        "checked_against": "fp32 graph",
        **{name: f"kept in fp32: {why}" for name, why in kept.items() if name in build.manifest.graphs},
    }
    return write_variants(build, precision, list(build.manifest.graphs), produce, check, settings, progress)
