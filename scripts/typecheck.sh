#!/usr/bin/env bash
# mypy on the TensorRT modules against tensorrt-stubs.
#
# tensorrt-stubs 10.13 needs three fixes before mypy can use it (see README, "Type checking"):
# it depends on tensorrt, which cannot be installed without the TensorRT libraries (so it is
# installed with --no-deps into .typing/); its .pyi files ship without a py.typed marker (so the
# folder goes on MYPYPATH); and tensorrt.pyi does not parse until parameters named `in` are
# renamed and add_scale_nd's channel_axis gets a default.
set -euo pipefail
cd "$(dirname "$0")/.."
STUBS_VERSION=10.13.0.35.1
stubs=.typing/tensorrt-stubs-$STUBS_VERSION
if [ ! -f "$stubs/tensorrt_bindings/tensorrt.pyi" ]; then
    rm -rf "$stubs.tmp"
    python -m pip install --quiet --no-deps --target "$stubs.tmp" "tensorrt-stubs==$STUBS_VERSION"
    sed -E -i \
        -e 's/([(, ])in: /\1in_: /g' \
        -e 's/channel_axis: int\) -> IScaleLayer/channel_axis: int = 0) -> IScaleLayer/' \
        "$stubs.tmp/tensorrt_bindings/tensorrt.pyi"
    rm -rf "$stubs" && mv "$stubs.tmp" "$stubs"
fi
MYPYPATH="$stubs" python -m mypy "$@"
