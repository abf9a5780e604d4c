"""The built-in small model sets, written as ordinary diffusers folders.

- The trained model (``write_trained_models``): a small SD-shaped model and two ControlNets
  (canny, seg) trained here on synthetic shapes by ``controlrt train`` (controlrt/training); its
  weights ship in the package (controlrt/trained, fp16 safetensors). The demo uses it.
- Seeded random weights (``write_builtin_models``) at any :class:`Architecture`, for tests and for
  measurements at full Stable Diffusion 1.5 shapes.

The demo and the tests load these folders through the same code as real models. Nothing is
downloaded: the CLIP tokenizer's byte-level BPE vocabulary is generated here from a small word
list, and every random module is built from its constructor with a fixed seed.
"""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

from controlrt.errors import ModelError
from controlrt.io import output_folder, staged_folder

# The trained built-in model shipped with the package: base/, canny/, seg/ (diffusers folders).
TRAINED_DIR = Path(__file__).resolve().parent / "trained"
TRAINED_CONTROLNETS = ("canny", "seg")

# Words the generated tokenizer learns merges from: the vocabulary of simple scene prompts.
_CORPUS = """
a an the photo picture drawing painting of with and on in at by red green blue yellow white
black orange purple pink gray brown circle square triangle line lines shape shapes house tree
cat dog person man woman car road sky mountain river city street room table chair window door
light dark bright soft sharp detailed high quality best realistic style portrait landscape
scene background foreground small large big tiny old new beautiful simple edges depth map
"""


@dataclass(frozen=True)
class Architecture:
    """Sizes of a small Stable-Diffusion-shaped model set.

    The VAE's scale factor is ``2 ** (len(vae_channels) - 1)``; the UNet has one down block per
    entry of ``unet_channels``; images are ``sample_size * vae factor`` pixels square.
    """

    unet_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 2
    cross_attention_dim: int = 32
    attention_head_dim: int = 8
    norm_num_groups: int = 16
    vae_channels: tuple[int, ...] = (16, 32)
    vae_layers_per_block: int = 1
    latent_channels: int = 4
    sample_size: int = 32
    text_layers: int = 2
    text_heads: int = 4
    text_intermediate: int | None = None
    sequence_length: int = 77
    bpe_merges: int = 200
    scheduler: str = "DDIMScheduler"
    controlnets: tuple[str, ...] = ("edges", "depth")
    corpus: str = _CORPUS  # the words the generated tokenizer learns its merges from
    # SDXL-shaped: a second text encoder (with projection) whose width adds to the first's to make
    # cross_attention_dim, "text_time" added conditions, a first down block without attention
    text_widths: tuple[int, int] | None = None
    pooled_dim: int = 0
    time_embed_dim: int = 8
    unions: tuple[str, ...] = ()  # ControlNet-Union models written after the plain ControlNets
    # the second text encoder's depth and MLP width, where they differ from the first's (SDXL's bigG)
    text_layers_2: int | None = None
    text_intermediate_2: int | None = None

    @property
    def family(self) -> str:
        """The model family (controlrt.families) of the set: "sdxl" with a second text encoder."""
        return "sdxl" if self.text_widths is not None else "sd"


TINY = Architecture()

# A second small architecture unlike TINY, for tests and measurements on "another" model: three
# UNet blocks of one layer, a wider cross-attention, a VAE with factor 4, a shorter token
# sequence and an Euler scheduler.
ALTERNATE = Architecture(
    unet_channels=(16, 32, 48),
    layers_per_block=1,
    cross_attention_dim=48,
    attention_head_dim=8,
    norm_num_groups=8,
    vae_channels=(8, 16, 16),
    sample_size=16,
    text_heads=4,
    sequence_length=32,
    scheduler="EulerDiscreteScheduler",
    controlnets=("lines", "seg"),
)

# Settings Stable Diffusion 1.5 ships with, per scheduler class.
_SCHEDULER_EXTRAS = {
    "DDIMScheduler": {"clip_sample": False, "set_alpha_to_one": False},
    "PNDMScheduler": {"skip_prk_steps": True, "set_alpha_to_one": False},
}

# Stable Diffusion 1.5's shapes (UNet 860M parameters, 13 residuals, VAE factor 8, CLIP ViT-L/14
# text width), with the generated tokenizer's small vocabulary. For full-size checks and benchmarks.
SD15 = Architecture(
    unet_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
    vae_channels=(128, 256, 512, 512),
    vae_layers_per_block=2,
    sample_size=64,
    text_layers=12,
    text_heads=12,
    text_intermediate=3072,
    scheduler="PNDMScheduler",
    controlnets=("canny", "depth"),
)


# A small SDXL-shaped set: two CLIP text encoders (32 and 48 wide, the second with a 24-wide
# projection), text_time conditions, no attention in the first block, a factor-2 VAE.
TINY_XL = Architecture(
    unet_channels=(32, 64),
    layers_per_block=2,
    cross_attention_dim=80,
    attention_head_dim=8,
    norm_num_groups=16,
    sample_size=32,
    text_widths=(32, 48),
    pooled_dim=24,
    time_embed_dim=8,
    scheduler="EulerDiscreteScheduler",
    controlnets=("canny", "depth"),
    unions=("union",),
)

# SDXL's shapes (UNet 2.6G parameters: 320/640/1280 channels, 1/2/10 transformer layers, 10
# residuals; CLIP ViT-L (12 layers) and OpenCLIP bigG (32 layers, MLP 5120) text encoders 768 + 1280
# wide, pooled 1280, time ids of 256; full-size ControlNets), for slow full-size checks.
SDXL = Architecture(
    unet_channels=(320, 640, 1280),
    layers_per_block=2,
    cross_attention_dim=2048,
    attention_head_dim=64,
    norm_num_groups=32,
    vae_channels=(128, 256, 512, 512),
    vae_layers_per_block=2,
    sample_size=128,
    text_layers=12,
    text_heads=12,
    text_intermediate=3072,
    text_widths=(768, 1280),
    pooled_dim=1280,
    time_embed_dim=256,
    scheduler="EulerDiscreteScheduler",
    controlnets=("canny", "depth"),
    text_layers_2=32,
    text_intermediate_2=5120,
)


@dataclass(frozen=True)
class BuiltinModels:
    """Where a written model set lives."""

    base: Path
    controlnets: list[Path] = field(default_factory=list)
    unions: list[Path] = field(default_factory=list)  # ControlNet-Union models


def bytes_to_unicode() -> dict[int, str]:
    """The byte-to-printable-character table of byte-level BPE (GPT-2, CLIP)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def train_bpe(words: list[str], num_merges: int) -> list[tuple[str, str]]:
    """Learn CLIP-style BPE merges (word-final symbols carry ``</w>``), ties broken by text."""
    table = bytes_to_unicode()
    corpus = Counter()
    for word in words:
        chars = [table[b] for b in word.encode("utf-8")]
        corpus[(*chars[:-1], chars[-1] + "</w>")] += 1
    merges = []
    for _ in range(num_merges):
        pairs: Counter = Counter()
        for symbols, count in corpus.items():
            for pair in pairwise(symbols):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged = Counter()
        for symbols, count in corpus.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] += count
        corpus = merged
    return merges


def write_tokenizer(
    folder: Path, num_merges: int, max_length: int, corpus: str = _CORPUS, pad_token: str = "<|endoftext|>"
) -> int:
    """Write vocab.json, merges.txt and tokenizer_config.json for a CLIPTokenizer; return the vocab size."""
    table = bytes_to_unicode()
    merges = train_bpe(corpus.split(), num_merges)
    tokens = list(table.values()) + [c + "</w>" for c in table.values()]
    tokens += [a + b for a, b in merges if a + b not in tokens]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_length,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": pad_token,
        "unk_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return len(tokens)


def _give_zero_convs_weights(controlnet, seed: int) -> None:
    """ControlNet zero convolutions start at zero; seeded weights make parity tests able to fail."""
    import torch

    generator = torch.Generator("cpu").manual_seed(seed)
    convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]
    convs.append(controlnet.controlnet_cond_embedding.conv_out)
    with torch.no_grad():
        for conv in convs:
            fan_in = conv.weight[0].numel()
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) / math.sqrt(fan_in))
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=generator) * 0.05)


def _controlnets(arch: Architecture, unet, seed: int) -> list:
    import torch
    from diffusers import ControlNetModel

    controlnets = []
    for k, _ in enumerate(arch.controlnets):
        torch.manual_seed(seed + 10 + k)
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=controlnet_embedding(arch))
        _give_zero_convs_weights(controlnet, seed + 20 + k)
        controlnets.append(controlnet)
    return controlnets


def _union_controlnet(arch: Architecture, unet, seed: int):
    """A ControlNet-Union (diffusers' ControlNetUnionModel) made from the UNet as from_unet makes it,
    its condition transformer as wide as the UNet's first block (from_unet fixes it at SDXL's 320),
    eight condition types as xinsir's ProMax, and weights in its zero-initialised layers."""
    import torch
    from diffusers import ControlNetUnionModel

    torch.manual_seed(seed + 30)
    template = ControlNetUnionModel.from_unet(
        unet, conditioning_embedding_out_channels=controlnet_embedding(arch), load_weights_from_unet=False
    )
    width = arch.unet_channels[0]
    config = {k: v for k, v in template.config.items() if k != "_use_default_values"}  # else those stay default
    config.update(num_control_type=8, num_trans_channel=width, num_proj_channel=width)
    config["num_trans_head"] = 8 if width % 8 == 0 else 4
    union = ControlNetUnionModel.from_config(config)
    union.conv_in.load_state_dict(unet.conv_in.state_dict())
    union.time_proj.load_state_dict(unet.time_proj.state_dict())
    union.time_embedding.load_state_dict(unet.time_embedding.state_dict())
    union.down_blocks.load_state_dict(unet.down_blocks.state_dict(), strict=False)
    union.mid_block.load_state_dict(unet.mid_block.state_dict(), strict=False)
    _give_zero_convs_weights(union, seed + 31)
    generator = torch.Generator("cpu").manual_seed(seed + 32)
    with torch.no_grad():
        projection = union.spatial_ch_projs
        projection.weight.copy_(torch.randn(projection.weight.shape, generator=generator) / width**0.5)
        projection.bias.copy_(torch.randn(projection.bias.shape, generator=generator) * 0.05)
    return union


def _scheduler(arch: Architecture):
    import diffusers

    return getattr(diffusers, arch.scheduler)(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        **_SCHEDULER_EXTRAS.get(arch.scheduler, {}),
    )


def _vae(arch: Architecture, **extra):
    from diffusers import AutoencoderKL

    m = len(arch.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * m,
        up_block_types=("UpDecoderBlock2D",) * m,
        block_out_channels=arch.vae_channels,
        latent_channels=arch.latent_channels,
        layers_per_block=arch.vae_layers_per_block,
        norm_num_groups=arch.norm_num_groups,
        sample_size=arch.sample_size * 2 ** (m - 1),
        **extra,
    )


def build_sdxl_modules(arch: Architecture, tokenizer_dirs: tuple[Path, Path], seed: int):
    """An SDXL-shaped pipeline (StableDiffusionXLPipeline) and its ControlNets, seeded.

    Two CLIP text encoders (the second with a projection, whose text_embeds are the pooled
    embedding), tokenizers that pad differently (the second with "!", as SDXL's), a UNet with
    "text_time" added conditions and no attention in its first block.
    """
    import torch
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    assert arch.text_widths is not None
    vocab = write_tokenizer(tokenizer_dirs[0], arch.bpe_merges, arch.sequence_length, arch.corpus)
    write_tokenizer(tokenizer_dirs[1], arch.bpe_merges, arch.sequence_length, arch.corpus, pad_token="!")
    tokenizers = [CLIPTokenizer.from_pretrained(d) for d in tokenizer_dirs]
    n = len(arch.unet_channels)
    full = arch.unet_channels[0] >= 320  # SDXL's own heads and transformer depths
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=arch.sample_size,
        in_channels=arch.latent_channels,
        out_channels=arch.latent_channels,
        block_out_channels=arch.unet_channels,
        layers_per_block=arch.layers_per_block,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        cross_attention_dim=arch.cross_attention_dim,
        attention_head_dim=(5, 10, 20) if full else arch.attention_head_dim,
        transformer_layers_per_block=(1, 2, 10) if full else 1,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=arch.time_embed_dim,
        projection_class_embeddings_input_dim=arch.pooled_dim + 6 * arch.time_embed_dim,
        norm_num_groups=arch.norm_num_groups,
    )
    torch.manual_seed(seed + 1)
    vae = _vae(arch, scaling_factor=0.13025, force_upcast=True)
    encoders = []
    for k, (width, cls) in enumerate(zip(arch.text_widths, (CLIPTextModel, CLIPTextModelWithProjection), strict=True)):
        torch.manual_seed(seed + 2 + k)
        config = CLIPTextConfig(
            vocab_size=vocab,
            hidden_size=width,
            intermediate_size=(k == 1 and arch.text_intermediate_2) or arch.text_intermediate or width * 2,
            projection_dim=arch.pooled_dim if k == 1 else width,
            num_hidden_layers=(k == 1 and arch.text_layers_2) or arch.text_layers,
            hidden_act="gelu" if full and k == 1 else "quick_gelu",  # OpenCLIP bigG's, as SDXL's config
            num_attention_heads=width // 64 if full else arch.text_heads,
            max_position_embeddings=arch.sequence_length,
            bos_token_id=vocab - 2,
            eos_token_id=vocab - 1,
            pad_token_id=vocab - 1,
        )
        encoders.append(cls(config))
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=encoders[0],
        text_encoder_2=encoders[1],
        tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1],
        unet=unet,
        scheduler=_scheduler(arch),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    return pipe, _controlnets(arch, unet, seed)


def build_modules(arch: Architecture, tokenizer_dir: Path, seed: int):
    """Construct the seeded pipeline and ControlNet modules (returns pipeline, controlnets)."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab_size = write_tokenizer(tokenizer_dir, arch.bpe_merges, arch.sequence_length, arch.corpus)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    n = len(arch.unet_channels)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=arch.sample_size,
        in_channels=arch.latent_channels,
        out_channels=arch.latent_channels,
        block_out_channels=arch.unet_channels,
        layers_per_block=arch.layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=arch.cross_attention_dim,
        attention_head_dim=arch.attention_head_dim,
        norm_num_groups=arch.norm_num_groups,
    )
    torch.manual_seed(seed + 1)
    vae = _vae(arch)
    torch.manual_seed(seed + 2)
    text_config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=arch.cross_attention_dim,
        intermediate_size=arch.text_intermediate or arch.cross_attention_dim * 2,
        projection_dim=arch.cross_attention_dim,
        num_hidden_layers=arch.text_layers,
        num_attention_heads=arch.text_heads,
        max_position_embeddings=arch.sequence_length,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    text_encoder = CLIPTextModel(text_config)
    scheduler = _scheduler(arch)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipe, _controlnets(arch, unet, seed)


def controlnet_embedding(arch: Architecture) -> tuple[int, ...]:
    """Channels of the condition encoder, which downsamples control images by the VAE factor."""
    return tuple(16 * 2**i for i in range(len(arch.vae_channels)))


def write_builtin_models(
    out_dir: str | Path, arch: Architecture = TINY, seed: int = 0, force: bool = False
) -> BuiltinModels:
    """Write the model set under ``out_dir`` (base/ and one folder per ControlNet), atomically.

    The same ``arch`` and ``seed`` always give the same weights. ``out_dir`` must be new or empty,
    or (with ``force``) a folder controlrt wrote holding nothing else; InputError otherwise.
    """
    with staged_folder(out_dir, "builtin --random", force) as staging:
        scratch = (staging / "_tokenizer", staging / "_tokenizer_2")
        if arch.family == "sdxl":
            pipe, controlnets = build_sdxl_modules(arch, scratch, seed)
        else:
            pipe, controlnets = build_modules(arch, scratch[0], seed)
        pipe.save_pretrained(staging / "base", safe_serialization=True)
        for name, controlnet in zip(arch.controlnets, controlnets, strict=True):
            controlnet.save_pretrained(staging / name, safe_serialization=True)
        for k, name in enumerate(arch.unions):
            _union_controlnet(arch, pipe.unet, seed + k).save_pretrained(staging / name, safe_serialization=True)
        for folder in scratch:
            shutil.rmtree(folder, ignore_errors=True)
    out = output_folder(out_dir)
    return BuiltinModels(out / "base", [out / name for name in arch.controlnets], [out / name for name in arch.unions])


def write_trained_models(out_dir: str | Path, force: bool = False) -> BuiltinModels:
    """Copy the shipped trained model set to ``out_dir`` (base/, canny/, seg/), atomically.

    ``out_dir`` must be new or empty, or (with ``force``) a folder controlrt wrote holding nothing
    else; InputError otherwise.
    """
    folders = [TRAINED_DIR / "base", *(TRAINED_DIR / name for name in TRAINED_CONTROLNETS)]
    missing = [str(f) for f in folders if not any(f.glob("**/*.safetensors"))]
    if missing:
        raise ModelError(
            f"the trained built-in model is missing from this installation ({', '.join(missing)}); "
            "reinstall controlrt, or train it: controlrt train --out DIR --ship"
        )
    with staged_folder(out_dir, "builtin", force) as staging:
        for folder in folders:
            shutil.copytree(folder, staging / folder.name)
    out = output_folder(out_dir)
    return BuiltinModels(out / "base", [out / name for name in TRAINED_CONTROLNETS])


def sample_control_images(count: int, height: int, width: int) -> list:
    """Deterministic control maps of the kinds ControlNets use, cycled to ``count`` images.

    An edge map (white outlines on black), a depth-like map (a radial gradient with a near
    object) and a scribble (thick strokes).
    """
    from PIL import Image, ImageDraw

    def edges() -> Image.Image:
        image = Image.new("RGB", (width, height), "black")
        draw = ImageDraw.Draw(image)
        draw.ellipse((width * 0.1, height * 0.15, width * 0.5, height * 0.6), outline="white", width=1)
        draw.rectangle((width * 0.55, height * 0.4, width * 0.9, height * 0.85), outline="white", width=1)
        draw.line((0, height * 0.9, width, height * 0.7), fill="white", width=1)
        return image

    def depth() -> Image.Image:
        import numpy as np

        y, x = np.mgrid[0:height, 0:width]
        far = 1.0 - np.hypot((x - width / 2) / width, (y - height) / height)
        image = Image.fromarray((np.clip(far, 0, 1) * 180).astype("uint8")).convert("RGB")
        ImageDraw.Draw(image).ellipse((width * 0.3, height * 0.3, width * 0.7, height * 0.7), fill=(240,) * 3)
        return image

    def scribble() -> Image.Image:
        image = Image.new("RGB", (width, height), "black")
        draw = ImageDraw.Draw(image)
        draw.line(
            [(width * 0.1, height * 0.8), (width * 0.4, height * 0.2), (width * 0.9, height * 0.5)],
            fill="white",
            width=max(2, width // 20),
        )
        return image

    makers = [edges, depth, scribble]
    return [makers[k % len(makers)]() for k in range(count)]


def sample_init_image(height: int, width: int, seed: int = 0):
    """A deterministic photo-like init image for img2img and inpainting (a colour gradient with a few
    filled ellipses), and ``sample_mask``'s rectangle to repaint."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    rgb = np.stack([x, y, 1 - x * y], axis=-1) * rng.uniform(120, 240, size=3)
    image = Image.fromarray(rgb.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x0, y0 = rng.randint(0, max(1, width - 8)), rng.randint(0, max(1, height - 8))
        draw.ellipse((x0, y0, x0 + width // 3, y0 + height // 3), fill=tuple(int(v) for v in rng.randint(0, 255, 3)))
    return image


def sample_mask(height: int, width: int, box: tuple[float, float, float, float] = (0.25, 0.2, 0.7, 0.75)):
    """A mask (white = repaint) of the rectangle ``box`` (left, top, right, bottom, as fractions)."""
    from PIL import Image, ImageDraw

    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).rectangle((box[0] * width, box[1] * height, box[2] * width, box[3] * height), fill=255)
    return mask
