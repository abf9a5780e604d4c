"""Train the built-in model: a small Stable-Diffusion-shaped model and its ControlNets, on shapes.

Three stages, each deterministic for a fixed seed and thread count:

1. the VAE (AutoencoderKL, factor 4) learns to reconstruct the shapes images (L1 + MSE + a small
   KL term); its latent scaling factor is then set from the data;
2. the base model: UNet and CLIP text encoder together, epsilon prediction on the SD noise
   schedule, 10% of captions dropped so classifier-free guidance works;
3. one ControlNet per condition, as the paper trains them: the base frozen, a trainable copy of
   its encoder (``ControlNetModel.from_unet``) joined by zero convolutions, a condition encoder,
   50% of the prompts replaced by the empty string. Every ``eval_every`` steps the control
   fidelity (edge F1 between the control scene and the generated image, on held-out scenes) is
   recorded: the curve that shows the sudden convergence.

``train(out_dir, config)`` writes ``models/`` (diffusers folders: base/, one per condition) and
``history.json`` (losses and the fidelity curve) under ``out_dir``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from controlrt.builtin import Architecture, build_modules, controlnet_embedding
from controlrt.io import check_replaceable, files_under, output_folder, staged_folder
from controlrt.training import shapes
from controlrt.training.fidelity import edge_f1, image_edges, scene_edges
from controlrt.training.plot import fidelity_svg

logger = logging.getLogger(__name__)

# The built-in model: 64 px images, a factor-4 VAE (16x16x4 latents), a three-level UNet.
SHAPES = Architecture(
    unet_channels=(32, 64, 128),
    layers_per_block=1,
    cross_attention_dim=64,
    attention_head_dim=4,
    norm_num_groups=8,
    vae_channels=(16, 32, 32),
    vae_layers_per_block=1,
    sample_size=16,
    text_layers=2,
    text_heads=4,
    sequence_length=24,
    bpe_merges=400,
    scheduler="DDIMScheduler",
    controlnets=shapes.CONDITIONS,
    corpus=shapes.VOCABULARY,
)


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    train_samples: int = 20000
    vae_steps: int = 1000
    vae_batch: int = 16
    vae_lr: float = 1e-3
    base_steps: int = 3000
    base_batch: int = 32
    base_lr: float = 1e-3
    controlnet_steps: tuple[int, ...] = (1500, 900)  # per condition
    controlnet_batch: int = 16
    controlnet_lr: float = 5e-4
    conditions: tuple[str, ...] = shapes.CONDITIONS
    eval_every: int = 100
    eval_scenes: int = 8
    eval_steps: int = 10
    guidance: float = 4.0
    threads: int | None = None
    device: str = "cpu"

    @classmethod
    def smoke(cls, **overrides) -> TrainConfig:
        """A few steps of every stage: checks the code path, learns nothing."""
        settings = dict(
            train_samples=64,
            vae_steps=3,
            vae_batch=4,
            base_steps=3,
            base_batch=4,
            controlnet_steps=(4, 4),
            controlnet_batch=4,
            eval_every=2,
            eval_scenes=2,
            eval_steps=2,
        )
        settings.update(overrides)
        return cls(**settings)


@dataclass
class History:
    config: dict
    losses: dict[str, list[float]] = field(default_factory=dict)
    fidelity: dict[str, list[dict]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    scaling_factor: float = 1.0

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1))


def _lr_at(step: int, total: int, peak: float, warmup: int = 100) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _optimise(params, lr: float):
    import torch

    return torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)


def _step(optimizer, loss, params, step: int, total: int, peak: float) -> None:
    import torch

    for group in optimizer.param_groups:
        group["lr"] = _lr_at(step, total, peak)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()


class _Data:
    """The training scenes, made once: uint8 images and conditions, captions as token ids."""

    def __init__(self, count: int, size: int, tokenizer, conditions: tuple[str, ...]) -> None:
        import torch

        samples = [shapes.sample(seed, size) for seed in range(count)]
        self.images = (
            torch.from_numpy(np.stack([np.asarray(s.image) for s in samples])).permute(0, 3, 1, 2).contiguous()
        )
        self.conditions = {
            kind: torch.from_numpy(np.stack([np.asarray(s.conditions[kind]) for s in samples]))
            .permute(0, 3, 1, 2)
            .contiguous()
            for kind in conditions
        }
        self.captions = [s.caption for s in samples]
        self.tokenizer = tokenizer
        self.ids = _tokens(tokenizer, self.captions)
        self.empty = _tokens(tokenizer, [""])[0]
        self.latents: torch.Tensor | None = None  # posterior (mean, std) once the VAE is trained

    def __len__(self) -> int:
        return len(self.captions)

    @staticmethod
    def pixels(images):
        return images.float() / 127.5 - 1.0


def _tokens(tokenizer, captions: list[str]):
    return tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def train_vae(vae, data: _Data, config: TrainConfig, history: History, progress: Callable | None = None) -> None:
    import torch

    generator = torch.Generator().manual_seed(config.seed + 100)
    params = [p for p in vae.parameters() if p.requires_grad]
    optimizer = _optimise(params, config.vae_lr)
    losses = history.losses.setdefault("vae", [])
    vae.train()
    for step in range(config.vae_steps):
        index = torch.randint(len(data), (config.vae_batch,), generator=generator)
        x = data.pixels(data.images[index]).to(config.device)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator).to(config.device)
        recon = vae.decode(z).sample
        kl = posterior.kl().mean() / x[0].numel()
        loss = (recon - x).abs().mean() + ((recon - x) ** 2).mean() + 1e-4 * kl
        _step(optimizer, loss, params, step, config.vae_steps, config.vae_lr)
        losses.append(loss.item())
        if progress:
            progress("vae", step + 1, config.vae_steps, losses[-1])
    vae.eval()
    with torch.no_grad():
        stats = []
        for start in range(0, len(data), 256):
            dist = vae.encode(data.pixels(data.images[start : start + 256]).to(config.device)).latent_dist
            stats.append(torch.stack([dist.mean, dist.std], dim=1).cpu())
        data.latents = torch.cat(stats)
    history.scaling_factor = float(1.0 / data.latents[:, 0].std())
    vae.register_to_config(scaling_factor=history.scaling_factor)


def _noisy(latents, scheduler, generator):
    import torch

    noise = torch.randn(latents.shape, generator=generator).to(latents.device)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator).to(
        latents.device
    )
    return scheduler.add_noise(latents, noise, t), noise, t


def _latents(data: _Data, index, scaling: float, generator, device: str):
    import torch

    stats = data.latents[index]
    return ((stats[:, 0] + stats[:, 1] * torch.randn(stats[:, 0].shape, generator=generator)) * scaling).to(device)


def _drop(ids, empty, fraction: float, generator, device: str):
    import torch

    drop = torch.rand(ids.shape[0], generator=generator) < fraction
    return torch.where(drop[:, None], empty[None, :], ids).to(device)


def train_base(
    unet, text_encoder, scheduler, data: _Data, config: TrainConfig, history: History, progress=None
) -> None:
    import torch

    generator = torch.Generator().manual_seed(config.seed + 200)
    params = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = _optimise(params, config.base_lr)
    losses = history.losses.setdefault("base", [])
    unet.train()
    text_encoder.train()
    for step in range(config.base_steps):
        index = torch.randint(len(data), (config.base_batch,), generator=generator)
        latents = _latents(data, index, history.scaling_factor, generator, config.device)
        noisy, noise, t = _noisy(latents, scheduler, generator)
        ids = _drop(data.ids[index], data.empty, 0.1, generator, config.device)
        text = text_encoder(ids)[0]
        loss = torch.nn.functional.mse_loss(unet(noisy, t, text).sample, noise)
        _step(optimizer, loss, params, step, config.base_steps, config.base_lr)
        losses.append(loss.item())
        if progress:
            progress("base", step + 1, config.base_steps, losses[-1])
    unet.eval()
    text_encoder.eval()


def train_controlnet(
    kind: str, unet, text_encoder, vae, scheduler, data: _Data, config: TrainConfig, history: History, progress=None
):
    """Train one ControlNet on ``kind`` maps; the base stays frozen. Returns the ControlNet."""
    import torch
    from diffusers import ControlNetModel

    torch.manual_seed(config.seed + 300 + config.conditions.index(kind))
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=controlnet_embedding(SHAPES))
    controlnet.to(config.device)
    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    generator = torch.Generator().manual_seed(config.seed + 400 + config.conditions.index(kind))
    params = list(controlnet.parameters())
    optimizer = _optimise(params, config.controlnet_lr)
    losses = history.losses.setdefault(kind, [])
    curve = history.fidelity.setdefault(kind, [])
    evaluation = _Evaluation(kind, config, vae, unet, text_encoder, scheduler, data)
    curve.append({"step": 0, "f1": evaluation(controlnet)})
    controlnet.train()
    steps = config.controlnet_steps[config.conditions.index(kind)]
    for step in range(steps):
        index = torch.randint(len(data), (config.controlnet_batch,), generator=generator)
        latents = _latents(data, index, history.scaling_factor, generator, config.device)
        noisy, noise, t = _noisy(latents, scheduler, generator)
        ids = _drop(data.ids[index], data.empty, 0.5, generator, config.device)
        with torch.no_grad():
            text = text_encoder(ids)[0]
        condition = (data.conditions[kind][index].float() / 255.0).to(config.device)
        down, mid = controlnet(noisy, t, text, condition, return_dict=False)
        prediction = unet(
            noisy, t, text, down_block_additional_residuals=down, mid_block_additional_residual=mid
        ).sample
        loss = torch.nn.functional.mse_loss(prediction, noise)
        _step(optimizer, loss, params, step, steps, config.controlnet_lr)
        losses.append(loss.item())
        if (step + 1) % config.eval_every == 0 or step + 1 == steps:
            controlnet.eval()
            curve.append({"step": step + 1, "f1": evaluation(controlnet)})
            controlnet.train()
        if progress:
            progress(kind, step + 1, steps, losses[-1])
    controlnet.eval()
    return controlnet


class _Evaluation:
    """Control fidelity on held-out scenes: mean edge F1 of generated images against the scenes."""

    def __init__(self, kind: str, config: TrainConfig, vae, unet, text_encoder, scheduler, data: _Data) -> None:
        import torch

        seeds = [shapes.HELD_OUT + k for k in range(config.eval_scenes)]
        scenes = [shapes.sample(seed) for seed in seeds]
        self.targets = [scene_edges(s) for s in scenes]
        self.conditions = torch.stack(
            [torch.from_numpy(np.array(s.conditions[kind])).permute(2, 0, 1).float() / 255.0 for s in scenes]
        ).to(config.device)
        ids = _tokens(data.tokenizer, [s.caption for s in scenes])
        with torch.no_grad():
            self.text = text_encoder(ids.to(config.device))[0]
            self.empty = text_encoder(data.empty[None].expand(len(scenes), -1).to(config.device))[0]
        self.config, self.vae, self.unet, self.scheduler = config, vae, unet, scheduler

    def __call__(self, controlnet) -> float:
        images = sample_images(
            self.vae, self.unet, self.scheduler, self.text, self.empty, controlnet, self.conditions, 1.0,
            self.config.eval_steps, self.config.guidance, seed=self.config.seed,
        )  # fmt: skip
        return float(np.mean([edge_f1(image_edges(i), t) for i, t in zip(images, self.targets, strict=True)]))


def sample_images(vae, unet, scheduler, text, empty, controlnet, conditions, scale, steps, guidance, seed):
    """A batch of images by controlrt's own denoise loop (runtime.loop) on the torch modules being
    trained: DDIM, classifier-free guidance, the control on both branches (uniform mode)."""
    import torch
    from diffusers import DDIMScheduler
    from PIL import Image

    from controlrt.families import family_of
    from controlrt.graphs import ControlNetGraph, UNetGraph
    from controlrt.models import model_info
    from controlrt.runtime.loop import ControlPlan, denoise
    from controlrt.runtime.torch_backend import TorchSession
    from controlrt.specs import GraphKind

    info = model_info(
        {
            "unet": {**unet.config, "_class_name": "UNet2DConditionModel"},
            "vae": {**vae.config, "_class_name": "AutoencoderKL"},
            "text_encoder": {"hidden_size": text.shape[-1], "max_position_embeddings": text.shape[1], "vocab_size": 1},
            "tokenizer": {"model_max_length": text.shape[1]},
            "scheduler": dict(scheduler.config),
        }
    )
    family = family_of(info)
    branches = family.branches(guidance)
    modes = {m: m.training for m in (unet, controlnet) if m is not None}
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((text.shape[0], info.latent_channels, *info.sample_size), generator=generator)
    controls = []
    if controlnet is not None and scale != 0:
        spec = family.controlnet_spec(0, "training", conditions.shape[1])
        session = TorchSession(ControlNetGraph(controlnet), spec, text.device)
        weights = torch.full((len(spec.outputs),), float(scale), device=text.device)
        images = torch.cat([conditions] * branches.per_image(GraphKind.CONTROLNET))
        controls.append(ControlPlan(session, images, weights, 0.0, 1.0))
    try:
        latents = denoise(
            TorchSession(UNetGraph(unet), family.unet_spec(), text.device),
            controls,
            DDIMScheduler.from_config(scheduler.config),
            torch.cat([empty, text]) if branches.cfg else text,
            noise,
            steps=steps,
            guidance=guidance,
            branches=branches,
            generator=generator,
        )
        with torch.no_grad():
            pixels = vae.decode(latents / vae.config.scaling_factor).sample
    finally:
        for module, training in modes.items():
            module.train(training)
    pixels = ((pixels.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(p) for p in pixels]


def train(
    out_dir: str | Path, config: TrainConfig = TrainConfig(), progress: Callable | None = None, force: bool = False
) -> History:
    """Run every stage and write ``models/``, ``history.json`` and ``fidelity.svg`` to ``out_dir``.

    ``out_dir`` must be new or empty, or (with ``force``) an earlier run's folder holding nothing
    else; it is written whole at the end.
    """
    import tempfile

    import torch

    _check_device(config.device)
    check_replaceable(output_folder(out_dir), force)
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.use_deterministic_algorithms(True, warn_only=config.device != "cpu")
    history = History(config=asdict(config))
    with tempfile.TemporaryDirectory() as scratch:
        pipe, _ = build_modules(replace(SHAPES, controlnets=()), Path(scratch) / "tokenizer", config.seed)
    data = _Data(config.train_samples, 64, pipe.tokenizer, config.conditions)
    pipe.to(config.device)

    start = time.perf_counter()
    train_vae(pipe.vae, data, config, history, progress)
    history.seconds["vae"] = time.perf_counter() - start
    start = time.perf_counter()
    train_base(pipe.unet, pipe.text_encoder, pipe.scheduler, data, config, history, progress)
    history.seconds["base"] = time.perf_counter() - start
    controlnets = {}
    for kind in config.conditions:
        start = time.perf_counter()
        controlnets[kind] = train_controlnet(
            kind, pipe.unet, pipe.text_encoder, pipe.vae, pipe.scheduler, data, config, history, progress
        ).to("cpu")
        history.seconds[kind] = time.perf_counter() - start

    pipe.to("cpu")
    with staged_folder(out_dir, "train", force) as staging:
        pipe.save_pretrained(staging / "models" / "base", safe_serialization=True)
        for kind, controlnet in controlnets.items():
            controlnet.save_pretrained(staging / "models" / kind, safe_serialization=True)
        history.write(staging / "history.json")
        (staging / "fidelity.svg").write_text(fidelity_svg(history.fidelity, _plot_title(history.config)))
    return history


def _check_device(device: str) -> None:
    import torch

    from controlrt.errors import InputError

    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise InputError(f"unknown torch device {device!r} (cpu, cuda, cuda:N, …)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise InputError(f"cannot train on {device!r}: torch sees no CUDA device here")


def _plot_title(config: dict) -> str:
    return f"ControlNet training on shapes: edge F1 on {config['eval_scenes']} held-out scenes (seed {config['seed']})"


def ship(out_dir: str | Path, dest: Path | None = None, docs: Path | None = None) -> Path:
    """Install a training run's models as the package's built-in model, in fp16 safetensors.

    ``out_dir`` is what :func:`train` wrote. The models go to ``dest`` (controlrt/trained) with
    history.json; the fidelity plot to ``docs`` (the checkout's docs/ folder, when there is one).
    """
    import shutil

    from safetensors.torch import load_file, save_file

    from controlrt.builtin import TRAINED_DIR
    from controlrt.errors import InputError

    out = Path(out_dir)
    models = out / "models"
    if not (models / "base" / "model_index.json").is_file() or not (out / "history.json").is_file():
        raise InputError(f"{out} holds no finished training run (models/ and history.json): run controlrt train first")
    dest = dest or TRAINED_DIR
    # the package's own folder: everything in it is controlrt's
    with staged_folder(dest, "train --ship", True, lambda p: set(files_under(p)), owner=False) as staging:
        for folder in sorted(p for p in models.iterdir() if p.is_dir()):
            shutil.copytree(folder, staging / folder.name)
        for path in staging.glob("**/*.safetensors"):
            tensors = {k: v.half() if v.is_floating_point() else v for k, v in load_file(path).items()}
            save_file(tensors, path, metadata={"format": "pt"})
        shutil.copy2(out / "history.json", staging / "history.json")
    history = json.loads((out / "history.json").read_text())
    docs = docs if docs is not None else dest.parent.parent / "docs"
    if docs.is_dir():
        (docs / "control-fidelity.svg").write_text(fidelity_svg(history["fidelity"], _plot_title(history["config"])))
    return dest
