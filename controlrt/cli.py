"""The ``controlrt`` command line: parse, build a config, call one API function.

Every :class:`ControlrtError` and every usage error becomes one ``error: …`` line on stderr and a
non-zero exit. Results go to stdout; logs and progress to stderr.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

from controlrt.errors import ControlrtError, InputError
from controlrt.runtime.limits import DEFAULT_MAX_IMAGES
from controlrt.version import __version__

BACKENDS = ["torch", "onnxruntime", "openvino", "tensorrt"]  # controlrt.runtime.backends, without its imports

logger = logging.getLogger("controlrt")


def _fail(message: str, code: int) -> None:
    click.echo(f"error: {' '.join(str(message).split())}", err=True)
    sys.exit(code)


class _CleanGroup(click.Group):
    """A group whose errors are one line each, never a usage dump or a traceback."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.exceptions.NoArgsIsHelpError as exc:  # a bare command: its help, as --help shows it
            click.echo(exc.ctx.get_help() if exc.ctx else self.get_help(click.Context(self)))
            sys.exit(0)
        except click.ClickException as exc:
            _fail(exc.format_message(), exc.exit_code)
        except click.exceptions.Abort as exc:  # click turns Ctrl-C into Abort
            if isinstance(exc.__cause__, KeyboardInterrupt):
                _fail("interrupted", 130)
            _fail("aborted", 1)
        except ControlrtError as exc:
            _fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except OSError as exc:  # the file system refused something no check foresaw
            where = f": {exc.filename}" if exc.filename else ""
            _fail(f"{exc.strerror or exc}{where}", 1)
        sys.exit(rv if isinstance(rv, int) else 0)


def _quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@click.group(cls=_CleanGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="controlrt")
@click.option("-v", "--verbose", is_flag=True, help="Log progress details to stderr.")
@click.option("-q", "--quiet", is_flag=True, help="Only errors on stderr; no progress bars.")
@click.pass_context
def cli(ctx: click.Context, verbose: bool, quiet: bool) -> None:
    """Stable Diffusion + ControlNet: export to ONNX, generate, and prove parity with PyTorch."""
    _quiet_libraries()
    level = logging.ERROR if quiet else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logger.setLevel(level)
    ctx.obj = {"progress": not quiet}  # a bar on a terminal, plain lines elsewhere


main = cli


@cli.command()
@click.argument("base_dir")
@click.option(
    "--controlnet",
    "controlnets",
    multiple=True,
    required=True,
    metavar="CN_DIR",
    help="A ControlNet folder; repeat for several (their order is the controls' order).",
)
@click.option("--out", required=True, help="Build folder to write.")
@click.option("--opset", type=int, default=None, help="ONNX opset (default 18).")
@click.option("--force", is_flag=True, help="Replace an existing build folder.")
@click.option(
    "--external-data/--no-external-data",
    default=None,
    help="Force weights into (or out of) .onnx.data files; default: by size (>1.5 GiB).",
)
@click.option("--no-validate", is_flag=True, help="Skip the onnxruntime check of each graph.")
@click.option(
    "--lora",
    "loras",
    multiple=True,
    metavar="PATH[:SCALE]",
    help="A LoRA fused into the UNet and text encoders at SCALE (default 1); repeat for several.",
)
@click.option(
    "--vae",
    "vae_dir",
    default=None,
    metavar="VAE_DIR",
    help="A VAE folder in place of BASE_DIR's vae/: an AutoencoderKL or a tiny AutoencoderTiny (TAESD).",
)
@click.option(
    "--precision",
    type=click.Choice(["fp32", "fp16"]),
    default="fp32",
    show_default=True,
    help="fp16: load and trace the models in fp16 (half the memory of fp32, for models too large to hold in "
    "fp32); the build then has fp16 graphs only.",
)
@click.pass_context
def export(
    ctx, base_dir, controlnets, out, opset, force, external_data, no_validate, loras, vae_dir, precision
) -> None:
    """Export BASE_DIR's text encoder(s), each ControlNet, the UNet and the VAE decoder and encoder to ONNX."""
    from controlrt.export.build import export_build
    from controlrt.export.onnx_export import DEFAULT_OPSET, ExportSettings
    from controlrt.lora import Lora

    opset = DEFAULT_OPSET if opset is None else opset
    settings = ExportSettings(opset=opset, external_data=external_data, precision=precision)
    manifest = export_build(
        base_dir,
        controlnets,
        out,
        settings,
        force=force,
        validate=not no_validate,
        progress=ctx.obj["progress"],
        loras=[Lora.parse(text) for text in loras],
        vae_dir=vae_dir,
    )
    click.echo(str(Path(out).resolve()))
    logger.info("graphs: %s", ", ".join(manifest.graphs))


def _backend_options(f):
    f = click.option(
        "--threads",
        type=int,
        default=None,
        help="onnxruntime / openvino: threads per graph (default: one per core).",
    )(f)
    f = click.option(
        "--weight-streaming-budget",
        type=float,
        default=None,
        metavar="GB",
        help="tensorrt: GiB of weights per engine kept on the GPU (engines built with --weight-streaming).",
    )(f)
    f = click.option(
        "--cuda-graphs", is_flag=True, help="tensorrt: capture and replay CUDA graphs (static engines are best)."
    )(f)
    f = click.option(
        "--providers",
        default=None,
        metavar="LIST",
        help="onnxruntime providers, comma-separated: cpu, cuda, tensorrt.",
    )(f)
    f = click.option(
        "--backend",
        type=click.Choice(BACKENDS),
        default="onnxruntime",
        show_default=True,
        help="Where the graphs run.",
    )(f)
    return f


def _limit_options(f):
    f = click.option(
        "--max-images",
        type=int,
        default=None,
        help=f"Most images one command may make (default {DEFAULT_MAX_IMAGES}).",
    )(f)
    return click.option(
        "--max-pixels",
        type=int,
        default=None,
        help="Largest height x width (default: 4x the native area, less if the memory is smaller).",
    )(f)


def _precision_option(f=None, default: str = "auto"):
    def add(f):
        return click.option(
            "--precision",
            default=default,
            show_default=True,
            help="auto: the fastest here that meets its gate, measured at first use and cached in the build; "
            "fp32 | fp16 | int8 graphs (onnxruntime, openvino) or engines (tensorrt), the build must have them; "
            "bf16: the fp32 graphs computed in bf16 (openvino, torch). torch's auto is fp32, the reference.",
        )(f)

    return add(f) if f is not None else add


def _providers(text: str | None) -> list[str] | None:
    return [p.strip() for p in text.split(",") if p.strip()] if text else None


def _force_option(f):
    return click.option("--force", is_flag=True, help="Replace the --json file if it exists.")(f)


def _json_output(json_path: str | None, force: bool, build: str) -> Path | None:
    """The --json file, checked before the work: never over a file without --force, never over
    one of the build's own files."""
    from controlrt.io import check_output_file

    if json_path is None:
        return None
    return check_output_file(json_path, force, _build_files(build), what="--json file")


def _build_files(build: str) -> list[Path]:
    """The files of a build folder that controlrt wrote: a command's inputs, never its outputs."""
    from controlrt.manifest import explain_build

    root = Path(build).expanduser()
    return [root / f for f in explain_build(root) or ()] if root.is_dir() else []


def _write_json(path: Path | None, text: str, force: bool) -> None:
    from controlrt.io import write_output_file

    if path is not None:
        write_output_file(path, text.encode("utf-8"), force)


def _backend_settings(backend: str, cuda_graphs: bool, budget_gb: float | None, threads: int | None) -> dict:
    """The backend-specific Pipeline options, refused with a backend they do not apply to."""
    options: dict = {}
    if threads is not None:
        if backend not in ("onnxruntime", "openvino"):
            raise InputError("--threads applies to --backend onnxruntime and openvino")
        options["threads"] = threads
    if backend != "tensorrt":
        if cuda_graphs or budget_gb is not None:
            raise InputError("--cuda-graphs and --weight-streaming-budget need --backend tensorrt")
        return options
    if budget_gb is not None and budget_gb < 0:
        raise InputError(f"--weight-streaming-budget {budget_gb} must not be negative")
    budget = None if budget_gb is None else int(budget_gb * (1 << 30))
    return {"cuda_graphs": cuda_graphs, "weight_streaming_budget": budget}


@cli.command()
@click.argument("build")
@click.option("--prompt", default=None, help="The prompt (or --prompts FILE).")
@click.option("--prompts", "prompts_file", default=None, metavar="FILE", help="One prompt per line; --out is a folder.")
@click.option("--num-images", type=int, default=1, show_default=True, help="Images per prompt, seeds SEED, SEED+1, …")
@click.option("--annotators", default=None, metavar="DIR", help="controlnet-aux weights for KIND:PHOTO controls.")
@click.option("--negative-prompt", default=None)
@click.option(
    "--control",
    "controls",
    multiple=True,
    metavar="IMAGE",
    help="A control image, or KIND:PHOTO to preprocess (canny:photo.jpg); the k-th goes to the k-th ControlNet.",
)
@click.option(
    "--control-type",
    "control_types",
    multiple=True,
    metavar="TYPE",
    help="A union ControlNet's condition type for the k-th control: openpose, depth, hed, canny, normal, "
    "segment, tile, repaint or a number; none for a plain ControlNet's control.",
)
@click.option("--scale", "scales", multiple=True, type=float, help="Per control, or one for all (default 1.0).")
@click.option("--start", "starts", multiple=True, type=float, help="Window start in [0, 1) (default 0).")
@click.option("--end", "ends", multiple=True, type=float, help="Window end in (0, 1] (default 1).")
@click.option(
    "--control-mode",
    default="uniform",
    show_default=True,
    help="uniform | guess | cfg-rw | cfg-rw-normalized",
)
@click.option("--steps", type=int, default=50, show_default=True)
@click.option(
    "--guidance", type=float, default=None, help="Default: the model's, as diffusers: SD 7.5, SDXL 5.0, SD3 7.0."
)
@click.option(
    "--true-cfg",
    type=float,
    default=1.0,
    show_default=True,
    help="Flux: classifier-free guidance with --negative-prompt (diffusers' true_cfg_scale; 1: off).",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--height", type=int, default=None, help="Default: the first control image's (as diffusers), else native."
)
@click.option("--width", type=int, default=None, help="Default: the first control image's (as diffusers), else native.")
@click.option(
    "--scheduler",
    default=None,
    help="ddim, pndm, euler, euler-ancestral, dpm++, unipc, lcm, tcd, ... (default: the model's own).",
)
@click.option("--image", "init_image", default=None, metavar="IMAGE", help="Init image: image-to-image (img2img).")
@click.option("--mask", default=None, metavar="MASK", help="With --image: inpaint where the mask is white.")
@click.option(
    "--strength",
    type=float,
    default=None,
    help="With --image: share of the schedule that runs, in (0, 1] (default 0.8; inpaint 1.0, SDXL 0.9999; Flux 0.6).",
)
@click.option(
    "--mask-crop", type=int, default=None, metavar="PX", help="With --mask: work on the masked region grown by PX."
)
@click.option("--vae-tiling", is_flag=True, help="Encode and decode in overlapping tiles (diffusers' enable_tiling).")
@click.option("--aesthetic-score", type=float, default=6.0, show_default=True, help="SDXL img2img/inpaint models.")
@click.option("--negative-aesthetic-score", type=float, default=2.5, show_default=True)
@click.option("--original-size", default=None, metavar="HxW", help="SDXL: the original-size condition.")
@click.option("--crops-top-left", default=None, metavar="TOPxLEFT", help="SDXL: the crop-offset condition.")
@click.option("--target-size", default=None, metavar="HxW", help="SDXL: the target-size condition.")
@_backend_options
@_precision_option
@_limit_options
@click.option("--out", required=True, help="Image file to write (.png or .jpg), or a folder for several images.")
@click.option("--force", is_flag=True, help="Replace images that exist (never one of the command's inputs).")
@click.pass_context
def generate(
    ctx,
    build,
    prompt,
    prompts_file,
    num_images,
    annotators,
    negative_prompt,
    controls,
    control_types,
    scales,
    starts,
    ends,
    control_mode,
    steps,
    guidance,
    true_cfg,
    seed,
    height,
    width,
    scheduler,
    init_image,
    mask,
    strength,
    mask_crop,
    vae_tiling,
    aesthetic_score,
    negative_aesthetic_score,
    original_size,
    crops_top_left,
    target_size,
    backend,
    providers,
    cuda_graphs,
    weight_streaming_budget,
    threads,
    precision,
    max_pixels,
    max_images,
    out,
    force,
) -> None:
    """Generate images from prompts and control images with BUILD.

    One image goes to --out FILE; with --num-images N or --prompts FILE, --out is a folder and the
    images are named NNNN-seedS.png. Every image carries its settings: PNGs in a "controlrt" text
    chunk, JPEGs in a comment. Every request is checked before anything runs, and no image is
    written over an existing file without --force.
    """
    from controlrt.io import check_output_file, check_output_folder
    from controlrt.manifest import Build
    from controlrt.runtime.images import check_image_path, save_image
    from controlrt.runtime.limits import Limits
    from controlrt.runtime.pipeline import Pipeline
    from controlrt.runtime.preprocess import split_control
    from controlrt.runtime.request import GenerationRequest

    build_folder = Build.open(build)
    limits = Limits.for_model(build_folder.manifest.info, max_pixels, max_images=max_images)
    if num_images < 1:
        raise InputError(f"--num-images {num_images} must be at least 1")
    limits.check_images(num_images)
    prompts = _prompts(prompt, prompts_file, limits.max_images)
    limits.check_images(len(prompts) * num_images)
    many = num_images > 1 or prompts_file is not None
    given = [prompts_file, init_image, mask]
    inputs = [split_control(c)[1] for c in controls] + [f for f in given if f] + _build_files(build)
    if many:
        folder = check_output_folder(out)
        count = len(prompts) * num_images
        paths = [folder / f"{index:04d}-seed{seed + index % num_images}.png" for index in range(count)]
    else:
        check_image_path(Path(out))
        paths = [Path(out)]
    paths = [check_output_file(path, force, inputs) for path in paths]
    requests = [
        GenerationRequest(
            prompt=text,
            controls=list(controls),
            scales=list(scales) or None,
            start=list(starts) or 0.0,
            end=list(ends) or 1.0,
            negative_prompt=negative_prompt,
            control_mode=control_mode,
            steps=steps,
            guidance=guidance,
            true_cfg=true_cfg,
            seed=seed + j,
            height=height,
            width=width,
            scheduler=scheduler,
            control_types=list(control_types) or None,
            image=init_image,
            mask=mask,
            strength=strength,
            mask_crop=mask_crop,
            vae_tiling=vae_tiling,
            aesthetic_score=aesthetic_score,
            negative_aesthetic_score=negative_aesthetic_score,
            original_size=_size(original_size),
            crops_coords_top_left=_size(crops_top_left),
            target_size=_size(target_size),
        )
        for text in prompts
        for j in range(num_images)
    ]
    options = _backend_settings(backend, cuda_graphs, weight_streaming_budget, threads)
    with Pipeline.from_build(
        build_folder, backend, _providers(providers), precision=precision, limits=limits, **options
    ) as pipe:
        pipe.annotators = annotators
        for request in requests:
            pipe.check(request)
        for request, path in zip(requests, paths, strict=True):
            result = pipe.generate(request, progress=ctx.obj["progress"])
            save_image(result.image, path, result.settings, force=force)
            click.echo(str(path))


MAX_PROMPTS_FILE_BYTES = 1 << 20


def _prompts(prompt: str | None, prompts_file: str | None, max_prompts: int) -> list[str]:
    if (prompt is None) == (prompts_file is None):
        raise InputError("give --prompt TEXT or --prompts FILE (one of them)")
    if prompt is not None:
        return [prompt]
    path = Path(prompts_file).expanduser()
    try:
        if path.stat().st_size > MAX_PROMPTS_FILE_BYTES:
            raise InputError(f"prompts file {path} is over {MAX_PROMPTS_FILE_BYTES >> 20} MiB")
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read prompts file {path}: {exc.__class__.__name__}") from None
    if sum(1 for line in lines if line.strip()) > max_prompts:
        raise InputError(f"prompts file {path} has more than {max_prompts} prompts (--max-images)")
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise InputError(f"prompts file {path} has no prompts")
    return prompts


@cli.command()
@click.argument("build")
@_backend_options
@_precision_option(default="fp32")
@click.option("--json", "json_path", default=None, metavar="FILE", help="Also write the report as JSON.")
@_force_option
@click.option("--steps", type=int, default=4, show_default=True, help="Steps of the end-to-end run.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--height", type=int, default=None, help="End-to-end image height (default: native).")
@click.option("--width", type=int, default=None, help="End-to-end image width (default: native).")
@click.option("--no-end-to-end", is_flag=True, help="Compare the graphs only.")
def parity(
    build,
    backend,
    providers,
    cuda_graphs,
    weight_streaming_budget,
    threads,
    precision,
    json_path,
    force,
    steps,
    seed,
    height,
    width,
    no_end_to_end,
) -> None:
    """Compare every graph of BUILD, and a short generation, against the fp32 PyTorch reference.

    fp32 graphs are compared on seeded inputs at two shapes; fp16 and int8 graphs on held-out
    inputs captured from the reference denoise loop.
    """
    from controlrt.parity import ParityError, run_parity

    json_out = _json_output(json_path, force, build)
    report = run_parity(
        build,
        backend,
        _providers(providers),
        steps=steps,
        seed=seed,
        end_to_end=not no_end_to_end,
        precision=precision,
        height=height,
        width=width,
        **_backend_settings(backend, cuda_graphs, weight_streaming_budget, threads),
    )
    click.echo(report.table())
    _write_json(json_out, report.to_json(), force)
    if not report.passed:
        raise ParityError(f"parity failed: {', '.join(report.failures)}")


@cli.command()
@click.argument("build")
@click.option("--precision", required=True, help="fp16 (int8 graphs come from controlrt calibrate).")
@click.pass_context
def convert(ctx, build, precision) -> None:
    """Add fp16 variants of every graph to BUILD, each checked against its fp32 graph."""
    from controlrt.export.fp16 import convert_build

    manifest = convert_build(build, precision, progress=ctx.obj["progress"])
    click.echo(" ".join(f"{n}.{precision}" for n in manifest.graphs))


@cli.command()
@click.argument("build")
@click.option(
    "--data",
    "data_dir",
    default=None,
    metavar="DIR",
    help="Control images and a prompts.txt; default: the built-in calibration set.",
)
@click.option("--samples", type=int, default=8, show_default=True, help="Generations to capture.")
@click.option("--steps", type=int, default=4, show_default=True, help="Denoising steps per generation.")
@click.option(
    "--method",
    type=click.Choice(["modelopt", "onnxruntime", "nncf"]),
    default="modelopt",
    show_default=True,
    help="Quantizer: NVIDIA ModelOpt, onnxruntime's quantize_static, or NNCF (OpenVINO's; its graphs run "
    "fastest on --backend openvino).",
)
@click.option(
    "--calibration",
    default=None,
    help="Activation ranges: modelopt percentile (default) or max; onnxruntime percentile (default), "
    "entropy or minmax; nncf minmax.",
)
@click.option("--height", type=int, default=None, help="Capture size (default: native).")
@click.option("--width", type=int, default=None, help="Capture size (default: native).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--vae",
    is_flag=True,
    help="Quantize the VAE decoder too (else it runs fp16, or fp32, in int8 pipelines).",
)
@click.option(
    "--float-layers",
    type=int,
    default=None,
    metavar="N",
    help="In each graph keep N more layers float (0-64): those whose int8 error reaches the output most, "
    "measured on the captures. Better images, slower int8 graphs.",
)
@click.option(
    "--float-budget",
    type=float,
    default=None,
    metavar="PERCENT",
    help="In each graph keep float at most PERCENT of the quantized layers' compute, taking the layers "
    "that remove the most int8 error per GFLOP (with --float-layers: at most N of them).",
)
@click.pass_context
def calibrate(
    ctx, build, data_dir, samples, steps, method, calibration, height, width, seed, vae, float_layers, float_budget
) -> None:
    """Capture the UNet's and ControlNets' inputs over real generations; write int8 (Q/DQ) graphs."""
    from controlrt.calibration.calibrate import CalibrationSettings, calibrate_build

    settings = CalibrationSettings(
        method, calibration, samples, steps, height, width, seed, vae, float_layers, float_budget
    )
    manifest = calibrate_build(build, data_dir, settings, progress=ctx.obj["progress"])
    click.echo(" ".join(f"{n}.int8" for n, g in manifest.graphs.items() if "int8" in g.variants))


def _size(text: str | None) -> tuple[int, int] | None:
    """HxW or one number for a square, in pixels (checked where the value is used)."""

    if text is None:
        return None
    parts = text.lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise InputError(f"size {text!r} is not HEIGHTxWIDTH or one number") from None
    if len(values) == 1:
        values *= 2
    if len(values) != 2:
        raise InputError(f"size {text!r} is not HEIGHTxWIDTH or one number")
    return values[0], values[1]


@cli.command()
@click.argument("build")
@_backend_options
@_precision_option
@click.option("--steps", type=int, default=4, show_default=True)
@click.option("--height", type=int, default=None, help="Default: the model's native size.")
@click.option("--width", type=int, default=None, help="Default: the model's native size.")
@click.option("--controls", type=int, default=None, help="How many ControlNets get a control (default: all).")
@click.option("--control-mode", default="uniform", show_default=True)
@click.option("--guidance", type=float, default=7.5, show_default=True)
@click.option("--runs", type=int, default=3, show_default=True, help="Timed generations (after --warmup).")
@click.option("--warmup", type=int, default=1, show_default=True)
@click.option("--scheduler", default=None, help="ddim, euler, … (default: the model's own).")
@click.option(
    "--task",
    type=click.Choice(["txt2img", "img2img", "inpaint"]),
    default="txt2img",
    show_default=True,
    help="img2img and inpaint start from a sample image (and mask): the VAE encoder is timed too.",
)
@click.option("--json", "json_path", default=None, metavar="FILE", help="Also write the numbers as JSON.")
@_force_option
def bench(
    build, backend, providers, cuda_graphs, weight_streaming_budget, threads, json_path, force, **settings
) -> None:
    """Time warm generations with BUILD: per graph, per step, end to end, loop overhead, GFLOP/s."""
    import json

    from controlrt.bench import run_bench

    json_out = _json_output(json_path, force, build)
    options = _backend_settings(backend, cuda_graphs, weight_streaming_budget, threads)
    report = run_bench(build, backend, _providers(providers), **settings, **options)
    click.echo(report.table())
    _write_json(json_out, json.dumps(report.to_dict(), indent=2), force)


@cli.command()
@click.argument("build")
@click.option("--backend", type=click.Choice(BACKENDS), default="onnxruntime", show_default=True)
@click.option("--providers", default=None, metavar="LIST", help="onnxruntime providers: cpu, cuda, tensorrt.")
@_precision_option
@click.option("--replicas", type=int, default=1, show_default=True, help="Pipeline replicas (one GPU each on GPU).")
@click.option("--max-batch", type=int, default=1, show_default=True, help="Group up to N queued requests.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Where the HTTP app listens (Ray: loopback).")
@click.option("--port", type=int, default=8000, show_default=True)
@click.option(
    "--max-pixels",
    type=int,
    default=None,
    help="Largest height x width a request may ask for (default: 4x the native area, less if memory is smaller).",
)
@click.option("--dashboard", is_flag=True, help="Also start Ray's dashboard, on loopback.")
@click.option(
    "--ray-address", default=None, metavar="ADDRESS", help="Join this Ray cluster instead of starting a local Ray."
)
def serve(
    build, backend, providers, precision, replicas, max_batch, host, port, max_pixels, dashboard, ray_address
) -> None:
    """Serve BUILD over HTTP with Ray Serve: POST /generate (JSON -> PNG), GET /health.

    A local Ray is started for it with every server on loopback; SIGTERM and Ctrl-C both drain the
    requests in flight and stop it with all its processes.
    """
    from controlrt.serving.app import ServeSettings, start

    provider_list = _providers(providers)
    settings = ServeSettings(
        str(Path(build).resolve()),
        backend,
        precision,
        tuple(provider_list) if provider_list else None,
        replicas,
        max_batch,
        host,
        port,
        max_pixels,
        dashboard,
        ray_address,
    )

    def announce(url: str, dashboard_url: str | None) -> None:
        click.echo(f"serving {build} on {url} (Ctrl-C or SIGTERM stops)", err=True)
        if dashboard_url:
            click.echo(f"Ray's dashboard: {dashboard_url}", err=True)

    start(settings, blocking=True, announce=announce)
    click.echo("stopped", err=True)


@cli.command("triton-repo")
@click.argument("build_dir", metavar="BUILD")
@click.option("--out", required=True, help="Model repository folder to write.")
@click.option("--precision", default="fp16", show_default=True, help="Which engines (controlrt build) to serve.")
@click.option("--instances", type=int, default=1, show_default=True, help="Instances per model.")
@click.option("--force", is_flag=True, help="Replace a repository this command wrote before.")
def triton_repo(build_dir, out, precision, instances, force) -> None:
    """Write a Triton Inference Server model repository for BUILD's TensorRT engines."""
    from controlrt.serving.triton import write_triton_repo

    click.echo(str(write_triton_repo(build_dir, out, precision, instances, force)))


@cli.command("convert-checkpoint")
@click.argument("kind", type=click.Choice(["sd", "controlnet"]))
@click.argument("checkpoint")
@click.option("--out", required=True, help="diffusers folder to write.")
@click.option(
    "--config",
    default=None,
    metavar="DIR",
    help="diffusers configs of the model (default: SD1.5's or SDXL's); SD3 and Flux: their pipeline folder.",
)
@click.option("--tokenizer", default=None, metavar="DIR", help="sd: a CLIP tokenizer folder (not in checkpoints).")
@click.option("--tokenizer-2", "tokenizer_2", default=None, metavar="DIR", help="sd: SDXL's second tokenizer folder.")
@click.option("--force", is_flag=True, help="Replace a folder this command wrote before.")
def convert_checkpoint(kind, checkpoint, out, config, tokenizer, tokenizer_2, force) -> None:
    """Convert a single-file CHECKPOINT to a diffusers folder: an original-format SD 1.x, SDXL, SD3/SD3.5 or
    Flux model, a ControlNet 1.x, or an SDXL ControlNet or ControlNet-Union file in diffusers' names."""
    from controlrt.checkpoints import convert_controlnet_checkpoint
    from controlrt.transformer_checkpoints import convert_base_checkpoint

    if kind == "sd":
        path = convert_base_checkpoint(checkpoint, out, config, tokenizer, force, tokenizer_2=tokenizer_2)
    else:
        if tokenizer is not None or tokenizer_2 is not None:
            raise InputError("--tokenizer and --tokenizer-2 apply to sd checkpoints only")
        path = convert_controlnet_checkpoint(checkpoint, out, config, force)
    click.echo(str(path))


@cli.command("inspect")
@click.argument("build_dir", metavar="BUILD")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def inspect_cmd(build_dir, as_json) -> None:
    """Show BUILD: graphs, inputs and outputs, precisions, engines (current or stale), sources."""
    import json

    from controlrt.inspect import format_inspection, inspect_build

    info = inspect_build(build_dir)
    click.echo(json.dumps(info, indent=2) if as_json else format_inspection(info))


@cli.command("preprocess")
@click.argument("kind")
@click.argument("image")
@click.option("--out", required=True, help="Control map to write (.png).")
@click.option("--low", type=int, default=100, show_default=True, help="canny: lower threshold.")
@click.option("--high", type=int, default=200, show_default=True, help="canny: upper threshold.")
@click.option("--min-length", type=float, default=16.0, show_default=True, help="mlsd: shortest segment (px).")
@click.option("--thickness", type=int, default=None, help="mlsd / scribble: stroke width in pixels.")
@click.option("--annotators", default=None, metavar="DIR", help="controlnet-aux annotator weights (depth, pose …).")
@click.option("--mask", default=None, metavar="MASK", help="inpaint: the mask (white = repaint).")
@click.option("--force", is_flag=True, help="Replace --out if it exists (never IMAGE itself).")
def preprocess_cmd(kind, image, out, low, high, min_length, thickness, annotators, mask, force) -> None:
    """Make a control map of KIND (canny, mlsd, scribble, inpaint, or a pass-through kind) from IMAGE.

    inpaint writes an inpaint ControlNet's condition, IMAGE with the pixels --mask marks at -1, as
    a .npy array (-1 is no pixel value); --control COND.npy takes it.
    """
    from controlrt.io import check_output_file, write_output_file
    from controlrt.runtime.images import check_image_path, save_image
    from controlrt.runtime.preprocess import check_kind, preprocess

    kind = check_kind(kind)
    if (mask is not None) != (kind == "inpaint"):
        raise InputError("--mask is the inpaint preprocessor's (and it needs one)")
    if kind == "inpaint" and Path(out).suffix.lower() != ".npy":
        raise InputError(f"output {out}: the inpaint condition holds -1 pixels; write it as a .npy array")
    if kind != "inpaint":
        check_image_path(Path(out))
    out_path = check_output_file(out, force, [image, *([mask] if mask else [])])
    options: dict = {}
    if kind == "canny":
        options = {"low": low, "high": high}
    elif kind == "mlsd":
        options = {"min_length": min_length} | ({"thickness": thickness} if thickness else {})
    elif kind == "scribble" and thickness:
        options = {"thickness": thickness}
    elif kind == "inpaint":
        options = {"mask": mask}
    result = preprocess(kind, image, annotators, **options)
    if kind == "inpaint":
        import io

        import numpy as np

        buffer = io.BytesIO()
        np.save(buffer, result)
        write_output_file(out_path, buffer.getvalue(), force)
    else:
        save_image(result, out_path, {"preprocessor": kind, "source": str(image), **options}, force=force)
    click.echo(str(out_path))


@cli.command("build")
@click.argument("build_dir", metavar="BUILD")
@click.option("--precision", default="fp16", show_default=True, help="fp32 | fp16 | int8 (from the build's graphs).")
@click.option("--min-size", default=None, metavar="HxW", help="Smallest image (default: half the native size).")
@click.option("--opt-size", default=None, metavar="HxW", help="Size tuned for (default: native).")
@click.option("--max-size", default=None, metavar="HxW", help="Largest image (default: twice the native size).")
@click.option("--min-batch", type=int, default=1, show_default=True, help="Fewest images per request.")
@click.option("--opt-batch", type=int, default=1, show_default=True, help="Images per request tuned for.")
@click.option("--max-batch", type=int, default=1, show_default=True, help="Most images per request.")
@click.option("--static", is_flag=True, help="Fixed shapes (opt size and batch): fastest, allows CUDA graphs.")
@click.option("--timing-cache", default=None, metavar="PATH", help="Timing cache file (default: in BUILD/engines).")
@click.option(
    "--refittable", is_flag=True, help="ControlNet, UNet and text encoder engines take new weights (refit, lora)."
)
@click.option("--weight-stripped", is_flag=True, help="Plans without weights, refitted from the ONNX at load.")
@click.option("--weight-streaming", is_flag=True, help="Allow a weight streaming budget at load (small GPUs).")
@click.option("--optimization-level", type=int, default=3, show_default=True, help="Builder optimization level 0-5.")
@click.option("--workspace", type=float, default=None, metavar="GB", help="Workspace memory limit in GiB.")
@click.option("--graph", "graphs", multiple=True, help="Only this graph (repeatable; default: all).")
@click.option("--force", is_flag=True, help="Rebuild engines that are current.")
@click.pass_context
def build_cmd(
    ctx,
    build_dir,
    precision,
    min_size,
    opt_size,
    max_size,
    min_batch,
    opt_batch,
    max_batch,
    static,
    timing_cache,
    refittable,
    weight_stripped,
    weight_streaming,
    optimization_level,
    workspace,
    graphs,
    force,
) -> None:
    """Build a TensorRT engine per graph of BUILD (needs TensorRT and an NVIDIA GPU)."""
    from controlrt.engine.builder import build_engines
    from controlrt.engine.cache import BuildOptions
    from controlrt.engine.profiles import ProfileSettings

    profile = ProfileSettings(
        _size(min_size), _size(opt_size), _size(max_size), min_batch, opt_batch, max_batch, static
    )
    options = BuildOptions(refittable, weight_stripped, optimization_level, workspace, weight_streaming)
    results = build_engines(
        build_dir, precision, profile, options, timing_cache, graphs or None, force, ctx.obj["progress"]
    )
    for r in results:
        click.echo(f"{r.graph} {r.precision} {r.status} {r.plan_bytes / 2**20:.1f} MiB {r.seconds:.1f} s")


@cli.command()
@click.argument("build_dir", metavar="BUILD")
@click.option("--controlnet", required=True, help="Which ControlNet: graph name (controlnet_0) or source name.")
@click.option(
    "--from", "source", required=True, metavar="CN_DIR_OR_ONNX", help="A diffusers ControlNet folder or fp32 .onnx."
)
def refit(build_dir, controlnet, source) -> None:
    """Give a ControlNet's refittable engines the weights of another ControlNet of its architecture."""
    from controlrt.engine.refit import refit_controlnet

    for line in refit_controlnet(build_dir, controlnet, source):
        click.echo(f"refitted {line}")


@cli.command()
@click.argument("build_dir", metavar="BUILD")
@click.option("--set", "loras", multiple=True, metavar="PATH[:SCALE]", help="A LoRA to fuse; repeat for several.")
@click.option("--clear", is_flag=True, help="Remove every LoRA: the base model's own weights.")
@click.pass_context
def lora(ctx, build_dir, loras, clear) -> None:
    """Change the LoRAs fused into BUILD's UNet and text encoders; its ControlNets stay as they are."""
    from controlrt.export.loras import set_loras
    from controlrt.lora import Lora

    if bool(loras) == clear:
        raise InputError("give the LoRAs with --set PATH[:SCALE] (repeatable), or --clear to remove them all")
    change = set_loras(build_dir, [Lora.parse(text) for text in loras], progress=ctx.obj["progress"])
    for line in change.summary():
        click.echo(line)


@cli.command()
@click.option("--out", default="controlrt-demo", show_default=True, help="Folder for models, build and outputs.")
@click.option("--steps", type=int, default=20, show_default=True)
@click.option("--force", is_flag=True, help="Replace an earlier demo's folder.")
@click.pass_context
def demo(ctx, out, steps, force) -> None:
    """Export the built-in trained model, generate with two controls (and without), run parity."""
    from controlrt.demo import run_demo

    result = run_demo(out, steps=steps, force=force, progress=ctx.obj["progress"])
    click.echo(result.parity_table)
    click.echo(f"prompt: {result.prompt}")
    click.echo(f"image: {result.image} (edge F1 against the control scene {result.f1:.3f})")
    click.echo(f"without the controls: {result.image_off} (edge F1 {result.f1_off:.3f})")
    click.echo(f"parity report: {result.parity_json}")
    click.echo(f"build: {result.build}")


@cli.command()
@click.option("--out", required=True, help="Folder for models/, history.json and fidelity.svg.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
@click.option("--device", default="cpu", show_default=True, help="torch device to train on.")
@click.option("--smoke", is_flag=True, help="A few steps of every stage: checks the code path, learns nothing.")
@click.option("--ship", is_flag=True, help="Then install the result as the package's built-in model (fp16).")
@click.option("--force", is_flag=True, help="Replace an earlier run's folder.")
@click.pass_context
def train(ctx, out, seed, threads, device, smoke, ship, force) -> None:
    """Train the built-in model on synthetic shapes: VAE, base (UNet + text encoder), ControlNets.

    Deterministic for a fixed seed and thread count; about an hour on 2 CPU cores.
    """
    from tqdm.auto import tqdm

    from controlrt.training.train import TrainConfig
    from controlrt.training.train import ship as ship_run
    from controlrt.training.train import train as run

    if threads is not None and threads < 1:
        raise InputError(f"--threads must be at least 1 (got {threads})")
    config = (
        TrainConfig.smoke(seed=seed, threads=threads, device=device)
        if smoke
        else TrainConfig(seed=seed, threads=threads, device=device)
    )
    bars: dict = {}

    def progress(stage: str, step: int, total: int, loss: float) -> None:
        if not ctx.obj["progress"]:
            return
        bar = bars.get(stage) or bars.setdefault(stage, tqdm(total=total, desc=stage, unit="step", leave=False))
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        if step == total:
            bar.close()

    history = run(out, config, progress, force)
    for kind, curve in history.fidelity.items():
        click.echo(f"{kind}: edge F1 {curve[0]['f1']:.3f} -> {curve[-1]['f1']:.3f} over {curve[-1]['step']} steps")
    click.echo(f"stages (s): {', '.join(f'{k} {v:.0f}' for k, v in history.seconds.items())}")
    click.echo(f"models: {Path(out) / 'models'}")
    if ship:
        click.echo(f"shipped: {ship_run(out)}")


MAX_SCENES = 1000


@cli.command()
@click.argument("build_dir", metavar="BUILD")
@click.option("--backend", type=click.Choice(BACKENDS), default="onnxruntime")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32", show_default=True)
@click.option("--scenes", type=int, default=16, show_default=True, help="Held-out shapes scenes.")
@click.option("--steps", type=int, default=20, show_default=True)
@click.option("--guidance", type=float, default=4.0, show_default=True)
@click.option("--json", "json_path", default=None, help="Also write the figures as JSON.")
@_force_option
def fidelity(build_dir, backend, precision, scenes, steps, guidance, json_path, force) -> None:
    """Control fidelity of a build of the shapes model: edge F1 with each control, all, and off."""
    import json
    from dataclasses import asdict

    from controlrt.runtime.pipeline import Pipeline
    from controlrt.training.fidelity import measure

    if not 1 <= scenes <= MAX_SCENES or not 1 <= steps <= 1000:
        raise InputError(f"--scenes must be from 1 to {MAX_SCENES} and --steps from 1 to 1000")
    json_out = _json_output(json_path, force, build_dir)
    with Pipeline.load(build_dir, backend=backend, precision=precision) as pipe:
        report = measure(pipe, scenes=scenes, steps=steps, guidance=guidance)
    click.echo(report.table())
    text = json.dumps({"backend": backend, "precision": precision, **asdict(report)}, indent=2)
    _write_json(json_out, text, force)


@cli.command("builtin")
@click.argument("out")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--random", "random_weights", is_flag=True, help="Seeded random weights instead of the trained model.")
@click.option("--force", is_flag=True, help="Replace a model set controlrt wrote there before.")
def builtin_cmd(out, seed, random_weights, force) -> None:
    """Write the built-in model set (diffusers folders) to OUT: the trained shapes model by default.

    OUT must be new or empty; --force replaces a folder controlrt wrote, never one it did not.
    """
    from controlrt.builtin import TINY, write_builtin_models, write_trained_models

    models = write_builtin_models(out, TINY, seed, force) if random_weights else write_trained_models(out, force)
    click.echo(str(models.base))
    for path in models.controlnets:
        click.echo(str(path))


if __name__ == "__main__":
    main()
