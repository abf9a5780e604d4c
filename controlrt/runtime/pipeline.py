"""The Python API: load a build once, generate many images."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from controlrt.errors import BuildError
from controlrt.manifest import Build
from controlrt.precision import Precision
from controlrt.preprocess import load_control
from controlrt.runtime.backends import BackendOptions, open_sessions
from controlrt.runtime.control import block_weights, residual_divisors
from controlrt.runtime.images import postprocess, preprocess_control
from controlrt.runtime.loop import ControlPlan, denoise
from controlrt.runtime.request import GenerationRequest, ResolvedRequest, resolve
from controlrt.runtime.schedulers import make_scheduler
from controlrt.runtime.session import Session

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationResult:
    """A generated image with the latents it was decoded from and the settings that made it."""

    image: Image.Image
    latents: torch.Tensor
    settings: dict[str, Any]


class Pipeline:
    """Text + control images -> image, on one backend. Sessions are opened once and reused.

    Example::

        pipe = controlrt.Pipeline.load("build", backend="onnxruntime")
        image = pipe("a house", controls=["edges.png"], steps=20, seed=1)
    """

    def __init__(self, build: Build, sessions: dict[str, Session], options: BackendOptions, tokenizer) -> None:
        self.build = build
        self.sessions = sessions
        self.options = options
        self.tokenizer = tokenizer
        manifest = build.manifest
        self.info = manifest.info
        self.unet_spec = manifest.spec("unet")
        self.controlnet_specs = manifest.controlnet_specs
        self._divisors = residual_divisors(self.unet_spec)
        self.annotators: str | Path | None = None  # controlnet-aux weights for KIND:PATH controls

    @classmethod
    def load(
        cls,
        build_dir: str | Path,
        backend: str = "onnxruntime",
        providers: Sequence[str] | None = None,
        device: str | None = None,
        verify: bool = True,
        precision: str = "fp32",
        **options: Any,
    ) -> Pipeline:
        """Open a build and every graph on ``backend``.

        Args:
            build_dir: Folder written by ``controlrt export``.
            backend: "onnxruntime" (the exported graphs), "tensorrt" (the engines of
                ``controlrt build``) or "torch" (the source modules, the reference).
            providers: onnxruntime execution providers, e.g. ["cuda"]; default CPU.
            device: torch device for the torch and tensorrt backends (default cpu / cuda).
            verify: Check every file's sha256 against the manifest (else only sizes).
            precision: "fp32", "fp16" or "int8" graphs; the build must have them.
            options: Further BackendOptions: cuda_graphs, weight_streaming_budget (tensorrt).
        """
        build = Build.open(build_dir, verify=verify)
        return cls.from_build(build, backend, providers, device, precision, **options)

    @classmethod
    def from_build(
        cls,
        build: Build,
        backend: str = "onnxruntime",
        providers: Sequence[str] | None = None,
        device: str | None = None,
        precision: str = "fp32",
        **options: Any,
    ) -> Pipeline:
        """Like :meth:`load`, for a build that is already open (and checked)."""
        from transformers import AutoTokenizer

        backend_options = BackendOptions(
            backend, tuple(providers) if providers else None, device, Precision.parse(precision), **options
        )
        try:
            tokenizer = AutoTokenizer.from_pretrained(build.tokenizer_dir)
        except (OSError, ValueError) as exc:
            raise BuildError(f"build {build.path}: cannot load its tokenizer ({exc})") from None
        sessions = open_sessions(build, backend_options)
        return cls(build, sessions, backend_options, tokenizer)

    @property
    def controlnet_names(self) -> list[str]:
        """Source names of the build's ControlNets, in the order controls are matched to them."""
        return [str(s.attributes["controlnet_name"]) for s in self.controlnet_specs]

    def __call__(self, prompt: str, controls: Sequence[Any] = (), **settings: Any) -> Image.Image:
        """Generate one image; keyword arguments are those of :class:`GenerationRequest`."""
        return self.generate(GenerationRequest(prompt, tuple(controls), **settings)).image

    def generate(
        self, request: GenerationRequest, progress: bool = False, timings: dict[str, float] | None = None
    ) -> GenerationResult:
        """Generate one image; ``timings``, if given, receives the denoise loop's seconds."""
        resolved = resolve(request, len(self.controlnet_specs), self.info.size_multiple, self.info.default_size)
        device = self.sessions["unet"].device
        # read (and preprocess, for KIND:PATH controls) every image before any work
        images = [load_control(c, self.annotators) for c in resolved.controls]
        scheduler = make_scheduler(self.build.scheduler_config, request.scheduler)
        cfg = request.guidance > 1.0
        conditional_only = resolved.mode.conditional_only and cfg

        # 1. text: [uncond, cond] for classifier-free guidance
        embeds = self._encode([request.negative_prompt or "", request.prompt] if cfg else [request.prompt])
        # 2. controls: preprocessed once, at the ControlNets' batch size
        controls = self._plan_controls(resolved, images, cfg and not conditional_only, device)
        # 3. initial latents, drawn as diffusers draws them
        generator = torch.Generator("cpu").manual_seed(request.seed)
        f = self.info.vae_scale_factor
        shape = (1, self.info.latent_channels, resolved.height // f, resolved.width // f)
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        # 4. denoise
        start = time.perf_counter()
        latents = denoise(
            self.sessions["unet"],
            controls,
            scheduler,
            embeds,
            noise,
            steps=request.steps,
            guidance=float(request.guidance),
            conditional_only=conditional_only,
            generator=generator,
            progress=progress,
        )
        if timings is not None:
            if latents.device.type == "cuda":
                torch.cuda.synchronize(latents.device)
            timings["denoise"] = time.perf_counter() - start
        # 5. decode
        decoded = self.sessions["vae_decoder"].infer({"latent": latents})["image"]
        image = postprocess(decoded, f)
        settings = request.settings() | {"height": resolved.height, "width": resolved.width}
        settings["controls"] = [str(c) if isinstance(c, (str, Path)) else type(c).__name__ for c in resolved.controls]
        settings["backend"] = self.options.backend
        settings["precision"] = str(self.options.precision)
        return GenerationResult(image, latents, settings)

    def _encode(self, texts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(
            texts,
            padding="max_length",
            max_length=self.info.sequence_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return self.sessions["text_encoder"].infer({"input_ids": ids.to(torch.int64)})["last_hidden_state"]

    def _plan_controls(
        self, resolved: ResolvedRequest, images: list, both_branches: bool, device: torch.device
    ) -> list[ControlPlan]:
        base = block_weights(resolved.mode, self._divisors)
        plans = []
        for k, image in enumerate(images):
            spec = self.controlnet_specs[k]
            channels = spec.tensor("controlnet_cond").shape[1]
            tensor = preprocess_control(image, resolved.height, resolved.width, self.info.vae_scale_factor, channels)
            if both_branches:
                tensor = torch.cat([tensor] * 2)
            plans.append(
                ControlPlan(
                    session=self.sessions[spec.name],
                    image=tensor.to(device),
                    weights=(base * resolved.scales[k]).to(device),
                    start=resolved.starts[k],
                    end=resolved.ends[k],
                )
            )
        return plans

    def close(self) -> None:
        for session in self.sessions.values():
            session.close()
        self.sessions = {}

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
