"""GPU paths: run wherever CUDA (and onnxruntime-gpu) exist, skipped elsewhere with the reason."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from controlrt.builtin import sample_control_images
from controlrt.compare import end_to_end_gate, psnr

END_TO_END_PSNR_DB = end_to_end_gate("fp32")

pytestmark = pytest.mark.gpu


def _ort_has(provider: str) -> bool:
    import onnxruntime

    return provider in onnxruntime.get_available_providers()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU and a CUDA build of torch")
@pytest.mark.parametrize("mode", ["uniform", "cfg-rw"])
def test_torch_backend_on_cuda_matches_cpu(tiny_build, pipelines, mode):
    from controlrt.runtime.pipeline import Pipeline

    images = sample_control_images(2, 64, 64)
    with Pipeline.load(tiny_build, backend="torch", device="cuda") as gpu:
        assert gpu.sessions["unet"].device.type == "cuda"
        got = np.asarray(gpu("a red circle", controls=images, control_mode=mode, steps=6, seed=3))
    expected = np.asarray(
        pipelines("tiny", "torch")("a red circle", controls=images, control_mode=mode, steps=6, seed=3)
    )
    assert psnr(expected, got) >= END_TO_END_PSNR_DB


@pytest.mark.skipif(not _ort_has("CUDAExecutionProvider"), reason="needs onnxruntime-gpu with CUDA")
def test_onnxruntime_cuda_provider_parity(tiny_build):
    from controlrt.parity import run_parity

    report = run_parity(tiny_build, backend="onnxruntime", providers=["cuda"], steps=3)
    assert report.passed, report.table()
