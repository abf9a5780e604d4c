"""The Python API: load a build once, generate many images."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from controlrt.errors import BuildError, InputError
from controlrt.families import family_of
from controlrt.io import sha256_file
from controlrt.manifest import MANIFEST_NAME, Build
from controlrt.precision import Precision
from controlrt.runtime.autoprecision import Choice, choose_precision, requested
from controlrt.runtime.backends import BackendOptions, open_sessions
from controlrt.runtime.images import (
    describe_control,
    load_image,
    peek_size,
    postprocess,
    preprocess_control,
    with_settings,
)
from controlrt.runtime.img2img import InitImages, decode, mask_crop, overlay, preprocess_image, sample_latents
from controlrt.runtime.img2img import start as start_latents
from controlrt.runtime.limits import Limits
from controlrt.runtime.loop import ControlPlan, UnionInputs, denoise
from controlrt.runtime.preprocess import inpaint as inpaint_condition
from controlrt.runtime.preprocess import load_control, peek_control_size, split_control
from controlrt.runtime.request import GenerationRequest, ResolvedRequest, resolve
from controlrt.runtime.schedulers import check_steps, make_scheduler, max_steps
from controlrt.session import Session
from controlrt.specs import GraphKind, GraphSpec
from controlrt.version import __version__

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

    def __init__(
        self,
        build: Build,
        sessions: dict[str, Session],
        options: BackendOptions,
        tokenizers: Sequence,
        limits: Limits | None = None,
    ) -> None:
        self.build = build
        self.sessions = sessions
        self.options = options
        self.tokenizers = list(tokenizers)  # one per text encoder, in order
        manifest = build.manifest
        self.info = manifest.info
        self.family = family_of(self.info)
        self.limits = limits or Limits.for_model(self.info)
        self.unet_spec = manifest.spec(self.family.denoiser)  # the denoiser: a UNet or a transformer
        self.controlnet_specs = manifest.controlnet_specs
        self.annotators: str | Path | None = None  # controlnet-aux weights for KIND:PATH controls
        self.precision_choice: Choice | None = None  # what --precision auto measured, if it ran
        self.warn_truncated = True  # log prompts cut off by the tokenizer (they are in the settings too)
        # which build made an image: recorded in its settings
        self._build_record = {"path": str(build.path), "manifest_sha256": sha256_file(build.path / MANIFEST_NAME)}

    @classmethod
    def load(
        cls,
        build_dir: str | Path,
        backend: str = "onnxruntime",
        providers: Sequence[str] | None = None,
        device: str | None = None,
        verify: bool = True,
        precision: str = "fp32",
        limits: Limits | None = None,
        max_pixels: int | None = None,
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
            precision: "fp32", "fp16" or "int8" graphs (the build must have them); "bf16" (the
                fp32 graphs computed in bf16: openvino, torch); or "auto": the fastest here that
                meets its gate, measured at first use and cached (controlrt.runtime.autoprecision).
            limits: Bounds for every request (default: Limits.for_model of the build's model).
            max_pixels: The largest height x width a request may ask for, in place of the default
                limit's (ignored when ``limits`` is given).
            options: Further BackendOptions: cuda_graphs, weight_streaming_budget (tensorrt).
        """
        build = Build.open(build_dir, verify=verify)
        if limits is None and max_pixels is not None:
            limits = Limits.for_model(build.manifest.info, max_pixels)
        return cls.from_build(build, backend, providers, device, precision, limits, **options)

    @classmethod
    def from_build(
        cls,
        build: Build,
        backend: str = "onnxruntime",
        providers: Sequence[str] | None = None,
        device: str | None = None,
        precision: str = "fp32",
        limits: Limits | None = None,
        **options: Any,
    ) -> Pipeline:
        """Like :meth:`load`, for a build that is already open (and checked)."""
        choice = None
        if requested(precision) is None:
            choice = choose_precision(build, backend, providers, device, **options)
            precision = choice.precision
            if choice.float_precision is not None:
                options = {**options, "float_precision": choice.float_precision}
        backend_options = BackendOptions(
            backend, tuple(providers) if providers else None, device, Precision.parse(precision), **options
        )
        tokenizers = load_tokenizers(build)
        # the VAE encoder opens at the first image-to-image request (see session)
        names = [n for n, g in build.manifest.graphs.items() if g.spec.kind is not GraphKind.VAE_ENCODER]
        sessions = open_sessions(build, backend_options, names)
        pipe = cls(build, sessions, backend_options, tokenizers, limits)
        pipe.precision_choice = choice
        return pipe

    def session(self, name: str) -> Session:
        """The session of graph ``name``, opened now if it was not at load (the VAE encoder, which
        only image-to-image requests use)."""
        if name not in self.sessions:
            self.sessions[name] = open_sessions(self.build, self.options, [name])[name]
        return self.sessions[name]

    @property
    def tokenizer(self):
        """The (first) tokenizer."""
        return self.tokenizers[0]

    @property
    def controlnet_names(self) -> list[str]:
        """Source names of the build's ControlNets, in the order controls are matched to them."""
        return [s.source_name for s in self.controlnet_specs]

    def __call__(self, prompt: str, controls: Sequence[Any] = (), **settings: Any) -> Image.Image:
        """Generate one image; keyword arguments are those of :class:`GenerationRequest`."""
        return self.generate(GenerationRequest(prompt, tuple(controls), **settings)).image

    def check(self, request: GenerationRequest) -> ResolvedRequest:
        """Validate a request against the build and the limits, reading only the images' headers
        (init image, mask, controls); InputError names the first problem. Nothing is allocated."""
        if request.image is not None and "vae_encoder" not in self.build.manifest.graphs:
            raise BuildError(
                f"build {self.build.path} has no VAE encoder graph (it was exported before controlrt 0.14): "
                "export it again with controlrt export to generate from an image"
            )
        # as diffusers: the size defaults to the init image's, else the first control image's
        first = request.image if request.image is not None else (request.controls[0] if request.controls else None)
        control_size = None
        if request.image is not None:
            control_size = peek_size(request.image, "init image")
        elif first is not None:
            control_size = peek_control_size(first)
        if request.mask is not None:
            peek_size(request.mask, "mask")
        kinds = [s.control_types for s in self.controlnet_specs]
        # the scheduler's own maximum, found by asking it (DDIM and PNDM stop short of 1000)
        most = max_steps(self.build.scheduler_config, request.scheduler)
        limits = replace(self.limits, max_steps=min(self.limits.max_steps, most))
        resolved = resolve(request, kinds, self.info, limits, control_size)
        for control in resolved.controls[1:]:
            peek_control_size(control)  # each is readable and within bounds
        check_steps(self.build.scheduler_config, request.scheduler, request.steps)
        return resolved

    def generate(
        self, request: GenerationRequest, progress: bool = False, timings: dict[str, float] | None = None
    ) -> GenerationResult:
        """Generate one image; ``timings``, if given, receives the denoise loop's seconds.

        The image carries its settings as JSON in ``image.info["controlrt"]``.
        """
        resolved = self.check(request)
        device = self.sessions[self.unet_spec.name].device
        info = self.info
        # read (and preprocess, for KIND:PATH controls) every image before any work
        init_image = load_image(request.image, "init image") if request.image is not None else None
        mask_image = load_image(request.mask, "mask") if request.mask is not None else None
        images = [self._control_image(c, mask_image) for c in resolved.controls]
        scheduler = make_scheduler(self.build.scheduler_config, request.scheduler)
        branches = self.family.branches(resolved.guidance, resolved.mode, resolved.true_cfg)
        f = info.vae_scale_factor
        crop = None
        if request.mask_crop is not None:  # diffusers' padding_mask_crop: work on the region around the mask
            crop = mask_crop(mask_image, resolved.height, resolved.width, request.mask_crop)

        # 1. text: [uncond, cond] for classifier-free guidance (and SDXL's pooled embeddings and time ids)
        embeds, added, truncated = self._prompt(request, branches.cfg, resolved.height, resolved.width, resolved.task)
        # 2. controls: preprocessed once, at the ControlNets' batch size (a family whose pipeline
        # samples their latents from the request's generator draws them before the noise)
        generator = torch.Generator("cpu").manual_seed(request.seed)
        controls = self._plan_controls(
            resolved,
            images,
            branches.per_image(GraphKind.CONTROLNET),
            device,
            crop,
            generator if self.family.controls_draw_first else torch.Generator("cpu").manual_seed(request.seed),
        )
        # 3. initial latents, drawn as diffusers draws them (the init image's sample before the noise)
        shape = (1, info.latent_channels, resolved.height // f, resolved.width // f)
        init = None
        if init_image is not None:
            size = (resolved.height, resolved.width)
            init = InitImages(
                preprocess_image(init_image, *size, f, crop, "init image"),
                None if mask_image is None else preprocess_image(mask_image, *size, f, crop, "mask"),
            )
        begin = start_latents(
            scheduler,
            request.steps,
            shape,
            generator,
            device,
            encoder=self.session("vae_encoder") if init is not None else None,
            info=info,
            init=init,
            strength=resolved.strength or 1.0,
            unet_batch=branches.per_image(GraphKind.UNET),
            tiling=request.vae_tiling,
            schedule=self.family.schedule(request.steps, shape[2:], self.build.scheduler_config),
            first_step=self.family.first_step(request.steps, resolved.strength or 1.0),
        )
        # an LCM-distilled UNet takes guidance as an embedding instead of a CFG batch
        unet_only = self.family.unet_extras(resolved.guidance)
        # 4. denoise
        started = time.perf_counter()
        latents = denoise(
            self.sessions[self.unet_spec.name],
            controls,
            scheduler,
            embeds,
            begin.latents,
            steps=request.steps,
            guidance=self.family.cfg_scale(resolved.guidance, resolved.true_cfg),
            branches=branches,
            generator=generator,
            progress=progress,
            added=added,
            unet_only=unet_only,
            start=begin,
        )
        if timings is not None:
            if latents.device.type == "cuda":
                torch.cuda.synchronize(latents.device)
            timings["denoise"] = time.perf_counter() - started
        # 5. decode (and, for a mask crop, paste the region back into the init image under the mask)
        decoded = decode(self.sessions["vae_decoder"], latents, info.vae_tile_size, f, request.vae_tiling)
        image = postprocess(decoded, f)
        if crop is not None:
            image = overlay(mask_image, init_image, image, crop)
        settings = resolved.settings()
        settings["controls"] = [describe_control(c, i) for c, i in zip(resolved.controls, images, strict=True)]
        if init_image is not None:
            settings["image"] = describe_control(request.image, init_image, digest=True)
            settings["strength"] = resolved.strength
        if mask_image is not None:
            settings["mask"] = describe_control(request.mask, mask_image, digest=True)
        settings["backend"] = self.options.backend
        settings["precision"] = str(self.options.precision)
        if self.options.float_precision is not None:
            settings["float_precision"] = str(self.options.float_precision)
        settings["controlrt"] = __version__
        settings["build"] = self._build_record
        if truncated:
            settings["truncated"] = truncated
        return GenerationResult(with_settings(image, settings), latents, settings)

    def _prompt(
        self, request: GenerationRequest, cfg: bool, height: int, width: int, task: str = "txt2img"
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[str]]:
        """Prompt embeddings [uncond, cond] (or [cond] without CFG), SDXL's added conditions in the
        same batch order (empty for SD 1.x/2.x), and the text the tokenizers cut off.

        As diffusers' pipelines do it: the negative prompt is "" when not given, except for SDXL
        models with force_zeros_for_empty_prompt, whose unconditional embeddings and pooled vector
        are then zeros; SDXL's time ids are original size, crop offsets and target size, by default
        (height, width), (0, 0), (height, width), the same for both branches. For img2img and
        inpainting (``task``) with a model that requires_aesthetics_score, the target size is the
        aesthetic score instead (negative_aesthetic_score for the unconditional branch, whose crop
        offsets are (0, 0) in img2img and the request's in inpainting).
        """
        info = self.info
        zeros = cfg and request.negative_prompt is None and info.force_zeros_for_empty_prompt
        texts = [request.negative_prompt or "", request.prompt] if cfg and not zeros else [request.prompt]
        outputs, truncated = self._encode(texts)
        hidden, added = self.family.conditioning(outputs, request, zeros, height, width, task)
        return hidden, added, truncated

    def _encode(self, texts: list[str]) -> tuple[list[list[torch.Tensor]], list[str]]:
        """Each text encoder's outputs for ``texts``, and the text the tokenizers cut off (warned
        about, as in diffusers)."""
        specs = sorted(
            (s.spec for s in self.sessions.values() if s.spec.kind is GraphKind.TEXT_ENCODER),
            key=lambda spec: spec.index,
        )
        outputs, truncated = [], []
        for tokenizer, spec in zip(self.tokenizers, specs, strict=True):
            length = spec.tensor("input_ids").shape[1]  # the encoder's own (SD3's T5: 256)
            tokens = tokenizer(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
            full = tokenizer(texts, padding="longest", return_tensors="pt").input_ids
            for row in range(len(texts)) if full.shape[-1] > length else ():
                removed = tokenizer.decode(full[row, length - 1 : -1], skip_special_tokens=True).strip()
                if removed and removed not in truncated:
                    truncated.append(removed)
                    if self.warn_truncated:
                        logger.warning(
                            "this part of the prompt was cut off because the text encoder takes at most %d tokens: %s",
                            length,
                            removed,
                        )
            feeds = {"input_ids": tokens.input_ids.to(torch.int64)}
            if "attention_mask" in spec.input_names:  # the config asks for it
                feeds["attention_mask"] = tokens.attention_mask.to(torch.int64)
            result = self.sessions[spec.name].infer(feeds)
            outputs.append([result[name] for name in spec.output_names])
        return outputs, truncated

    def _control_image(self, control: Any, mask: Image.Image | None):
        """A control as the ControlNet takes it: ``inpaint:PATH`` is the inpaint ControlNet's
        condition made from that image and the request's mask; other controls as load_control
        reads them."""
        if isinstance(control, str) and split_control(control)[0] == "inpaint":
            if mask is None:
                raise InputError(f"control {control!r} is made from the request's mask: give one (--mask)")
            return inpaint_condition(load_image(split_control(control)[1]), mask)
        return load_control(control, self.annotators)

    def _plan_controls(
        self,
        resolved: ResolvedRequest,
        images: list,
        batch: int,
        device: torch.device,
        crop: tuple | None = None,
        generator: torch.Generator | None = None,
    ) -> list[ControlPlan]:
        """One plan per ControlNet given controls (resolved.assignment), at the ControlNets' batch
        (cropped as the init image is, for a mask crop), as the family's ControlNets take them (SD3's
        and Flux's: VAE-encoded, sampled from ``generator``, in ControlNet order)."""
        base = self.family.control_weights(resolved.mode, self.unet_spec)
        plans = []
        generator = generator or torch.Generator("cpu").manual_seed(0)

        def encode(image: torch.Tensor) -> torch.Tensor:
            encoder = self.session("vae_encoder")
            return sample_latents(encoder.infer({"image": image.to(encoder.device)}), generator)

        def prepared(i: int, channels: int) -> torch.Tensor:
            tensor = preprocess_control(
                images[i], resolved.height, resolved.width, self.info.vae_scale_factor, channels, crop
            )
            return torch.cat([tensor] * batch) if batch > 1 else tensor

        def one_image(spec: GraphSpec, i: int, **extra: torch.Tensor) -> ControlPlan:
            """The plan of control ``i`` alone through ``spec``'s ControlNet, at its scale and window."""
            image = prepared(i, self.family.control_channels(spec))
            return ControlPlan(
                session=self.sessions[spec.name],
                image=self.family.control_condition(image, encode, spec).to(device),
                weights=(base * resolved.scales[i]).to(device),
                start=resolved.starts[i],
                end=resolved.ends[i],
                extra=extra or None,
            )

        for spec, indices in zip(self.controlnet_specs, resolved.assignment, strict=True):
            if not indices:
                continue
            first = indices[0]
            if spec.union and "control_mode" in spec.input_names:
                # a Flux ControlNet-Union: one pass per image with its type, summed as diffusers'
                # multi-ControlNet sums them
                for i in indices:
                    mode = torch.full((batch, 1), int(resolved.types[i]), device=device)
                    plans.append(one_image(spec, i, control_mode=mode))
                continue
            if not spec.union:
                plans.append(one_image(spec, first))
                continue
            # a union ControlNet: all its images in one pass; one image is scaled outside as usual,
            # two or more inside the model (and their windows as scale 0 there), as diffusers does
            channels = spec.tensor("controlnet_cond").shape[2]
            image = torch.stack([prepared(i, channels) for i in indices], dim=1)
            types = [int(resolved.types[i]) for i in indices]  # type: ignore[arg-type]
            multi_hot = torch.zeros(spec.control_types).scatter_(0, torch.tensor(types), 1)
            single = len(indices) == 1
            union = UnionInputs(
                control_type=multi_hot.reshape(1, -1).repeat(batch, 1).to(device),
                type_idx=torch.tensor(types, dtype=torch.int64, device=device),
                scales=tuple(resolved.scales[i] for i in indices),
                windows=tuple((resolved.starts[i], resolved.ends[i]) for i in indices),
            )
            plans.append(
                ControlPlan(
                    session=self.sessions[spec.name],
                    image=image.to(device),
                    weights=(base * (resolved.scales[first] if single else 1.0)).to(device),
                    start=resolved.starts[first] if single else 0.0,
                    end=resolved.ends[first] if single else 1.0,
                    union=union,
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


def load_tokenizers(build: Build) -> list:
    """The build's tokenizers, one per text encoder; BuildError if one cannot be loaded."""
    from transformers import AutoTokenizer

    tokenizers = []
    for folder in build.tokenizer_dirs:
        try:
            tokenizers.append(AutoTokenizer.from_pretrained(folder))
        except (OSError, ValueError) as exc:
            raise BuildError(f"build {build.path}: cannot load its tokenizer {folder.name} ({exc})") from None
    return tokenizers
