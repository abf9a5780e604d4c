"""The Triton Inference Server Python-backend model of a controlrt repository (copied as model.py).

It runs controlrt's own denoise loop (controlrt.runtime.pipeline.Pipeline) with sessions that call
the repository's TensorRT models through Triton's business-logic scripting (BLS), tensors passed as
DLPack so they stay on the GPU. Input ``request``: one JSON string, the HTTP API's body
(controlrt.serving.protocol); output ``image``: the PNG bytes, settings in its text chunk.
Triton's Python environment needs controlrt installed, and the build folder named by the
``build`` parameter (its manifest, tokenizer and scheduler config) readable.
"""

import json

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import from_dlpack, to_dlpack

from controlrt.errors import BackendError, ControlrtError, InputError
from controlrt.session import Session


class TritonSession(Session):
    """One graph served by another model of the repository, called with BLS."""

    backend = "triton"

    def __init__(self, spec, model_name, device):
        super().__init__(spec)
        self.model_name = model_name
        self._device = torch.device(device)

    @property
    def device(self):
        return self._device

    def _run(self, feeds):
        inputs = [
            pb_utils.Tensor.from_dlpack(name, to_dlpack(feeds[name].to(self._device).contiguous()))
            for name in self.spec.input_names
        ]
        request = pb_utils.InferenceRequest(
            model_name=self.model_name, requested_output_names=self.spec.output_names, inputs=inputs
        )
        response = request.exec()
        if response.has_error():
            raise BackendError(f"Triton model {self.model_name}: {response.error().message()}")
        return {
            name: from_dlpack(pb_utils.get_output_tensor_by_name(response, name).to_dlpack())
            for name in self.spec.output_names
        }


class TritonPythonModel:
    def initialize(self, args):
        from controlrt.manifest import Build
        from controlrt.runtime.backends import BackendOptions
        from controlrt.runtime.pipeline import Pipeline, load_tokenizers

        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        build = Build.open(params["build"], verify=False)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        sessions = {name: TritonSession(build.manifest.spec(name), name, device) for name in build.manifest.graphs}
        options = BackendOptions("tensorrt", device=device, precision=params.get("precision", "fp16"))
        self.pipe = Pipeline(build, sessions, options, load_tokenizers(build))

    def execute(self, requests):
        from controlrt.runtime.images import encode_png
        from controlrt.serving.protocol import parse_request

        responses = []
        for request in requests:
            try:
                raw = pb_utils.get_input_tensor_by_name(request, "request").as_numpy().reshape(-1)[0]
                body = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
                result = self.pipe.generate(parse_request(body))
                png = np.frombuffer(encode_png(result.image, result.settings), dtype=np.uint8)
                responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("image", png)]))
            except (InputError, ValueError) as exc:
                error = pb_utils.TritonError(f"bad request: {exc}")
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
            except ControlrtError as exc:
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(exc))))
        return responses

    def finalize(self):
        self.pipe = None
