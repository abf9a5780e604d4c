#!/usr/bin/env bash
# Create .venv with PyTorch 2.13.0 (pinned: an unpinned torch pulls a multi-GB CUDA build) and
# controlrt installed in editable mode with its development tools. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[dev]"
.venv/bin/python -c "import controlrt, torch, onnxruntime; print('controlrt', controlrt.__version__, '| torch', torch.__version__, '| onnxruntime', onnxruntime.__version__)"
