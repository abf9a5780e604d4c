"""The PyTorch modules behind each graph, with the graph spec's inputs and outputs.

Each wrapper takes its inputs positionally in spec order and returns its outputs in spec order.
Export traces exactly these modules, and the torch backend runs them, so the reference and the
exported graph compute the same thing by construction. Which wrapper a graph gets, around which
loaded model, is its family's declaration (``Family.module_factories``); this module knows torch
and diffusers' model classes only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class TextEncoderGraph(nn.Module):
    """A text encoder as diffusers' encode_prompt uses it.

    SD 1.x/2.x (``layer="last"``): input_ids [B, S] int64 (and, where the config asks for it,
    attention_mask [B, S] int64) -> last_hidden_state [B, S, D]. SDXL (``layer="penultimate"``):
    input_ids -> the penultimate layer's hidden states [B, S, D] and, with ``pooled``, the
    projection's text_embeds [B, P] (CLIPTextModelWithProjection). Flux's CLIP (``layer="pooled"``):
    input_ids -> pooler_output [B, D] (CLIPTextModel).
    """

    def __init__(self, text_encoder: nn.Module, layer: str = "last", pooled: bool = False) -> None:
        super().__init__()
        self.text_encoder = text_encoder
        self.layer = layer
        self.pooled = pooled

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        if self.layer == "pooled":  # Flux's CLIP: the pooled output alone
            return self.text_encoder(input_ids, attention_mask=attention_mask, return_dict=False)[1]
        if self.layer == "last":
            return self.text_encoder(input_ids, attention_mask=attention_mask, return_dict=False)[0]
        out = self.text_encoder(input_ids, attention_mask=attention_mask, output_hidden_states=True)
        hidden = out.hidden_states[-2]
        return (hidden, out.text_embeds) if self.pooled else hidden


def _added(names: tuple[str, ...], values) -> dict[str, torch.Tensor] | None:
    return dict(zip(names, values, strict=True)) if names else None


class ControlNetGraph(nn.Module):
    """One ControlNet with unit conditioning scale: returns its residuals unscaled.

    Inputs: sample, timestep, encoder_hidden_states, the added conditions ``added`` names (SDXL:
    text_embeds, time_ids), controlnet_cond.
    """

    def __init__(self, controlnet: nn.Module, added: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.controlnet = controlnet
        self.added = tuple(added)

    def forward(self, sample, timestep, encoder_hidden_states, *rest):
        *conditions, controlnet_cond = rest
        down, mid = self.controlnet(
            sample,
            timestep,
            encoder_hidden_states=encoder_hidden_states,
            controlnet_cond=controlnet_cond,
            conditioning_scale=1.0,
            guess_mode=False,
            added_cond_kwargs=_added(self.added, conditions),
            return_dict=False,
        )
        return (*down, mid)


def _attention(attn: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """``attn(x, x, x)`` of an nn.MultiheadAttention built with batch_first=False, as ControlNet-Union
    calls it on [B, N + 1, C] (so it attends across the first axis), written out with shapes that
    stay symbolic in the exported graph (the module's own reshapes trace as constants)."""
    import torch.nn.functional as F

    width, heads = attn.embed_dim, attn.num_heads
    q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)  # [L, M, width]

    def split(t: torch.Tensor) -> torch.Tensor:  # [L, M, width] -> [M * heads, L, width / heads]
        return t.reshape(t.shape[0], -1, width // heads).transpose(0, 1)

    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    out = out.transpose(0, 1).reshape(x.shape[0], -1, width)
    return F.linear(out, attn.out_proj.weight, attn.out_proj.bias)


class UnionControlNetGraph(nn.Module):
    """A ControlNet-Union (diffusers' ControlNetUnionModel) over any number of condition images.

    diffusers' forward takes its images as a Python list and their types as a list of integers, so
    a traced graph would be fixed to one set of types. This computes the same thing with tensors:
    the condition images [B, N, C, H, W] go through the condition encoder as one batch, each type's
    task embedding is gathered by index, and the per-image scales [N] multiply the feature tokens
    and the fused conditions exactly where diffusers multiplies them (with one image it passes
    scale 1 there and scales the outputs: so does the loop). Its transformer layers get the tokens
    in diffusers' layout [B, N + 1, C] and attend as diffusers' do (across the first axis; see
    _attention). Returns the residuals, unscaled. Guess-mode weights, like every control weight,
    are the loop's.
    """

    def __init__(self, controlnet: nn.Module, added: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.controlnet = controlnet
        self.added = tuple(added)

    def forward(self, sample, timestep, encoder_hidden_states, *rest):
        m = self.controlnet
        *conditions, controlnet_cond, control_type, control_type_idx, conditioning_scale = rest
        added = _added(self.added, conditions) or {}
        batch, count = controlnet_cond.shape[0], controlnet_cond.shape[1]
        # 1. time, added conditions and control types, as ControlNetUnionModel.forward
        t_emb = m.time_proj(timestep.expand(sample.shape[0])).to(dtype=sample.dtype)
        emb = m.time_embedding(t_emb, None)
        if m.config.addition_embed_type == "text_time":
            time_embeds = m.add_time_proj(added["time_ids"].flatten()).reshape((batch, -1))
            aug_emb = m.add_embedding(torch.concat([added["text_embeds"], time_embeds], dim=-1).to(emb.dtype))
        else:
            aug_emb = None
        control_embeds = m.control_type_proj(control_type.flatten()).reshape((batch, -1)).to(emb.dtype)
        emb = emb + m.control_add_embedding(control_embeds)
        emb = emb + aug_emb if aug_emb is not None else emb
        # 2. the conditions, fused into the sample
        sample = m.conv_in(sample)
        condition = m.controlnet_cond_embedding(controlnet_cond.flatten(0, 1))
        condition = condition.reshape((batch, count, *condition.shape[1:]))  # [B, N, c, h, w]
        scale = conditioning_scale.to(sample.dtype)
        features = (torch.mean(condition, dim=(3, 4)) + m.task_embedding[control_type_idx]) * scale[None, :, None]
        tokens = torch.cat([features, torch.mean(sample, dim=(2, 3)).unsqueeze(1)], dim=1)
        for layer in m.transformer_layes:
            tokens = tokens + _attention(layer.attn, layer.ln_1(tokens))
            tokens = tokens + layer.mlp(layer.ln_2(tokens))
        alpha = m.spatial_ch_projs(tokens[:, :count])[..., None, None]  # [B, N, c, 1, 1]
        weight = scale[None, :, None, None, None]
        sample = sample + (condition * weight + alpha * weight).sum(dim=1)
        # 3. down, 4. mid, 5. ControlNet blocks
        residuals = (sample,)
        for block in m.down_blocks:
            if getattr(block, "has_cross_attention", False):
                sample, res = block(hidden_states=sample, temb=emb, encoder_hidden_states=encoder_hidden_states)
            else:
                sample, res = block(hidden_states=sample, temb=emb)
            residuals += res
        sample = m.mid_block(sample, emb, encoder_hidden_states=encoder_hidden_states)
        down = [block(r) for r, block in zip(residuals, m.controlnet_down_blocks, strict=True)]
        return (*down, m.controlnet_mid_block(sample))


class UNetGraph(nn.Module):
    """The UNet with every control residual as an explicit input (zeros mean no control).

    Inputs: sample, timestep, encoder_hidden_states, the added conditions ``added`` names (SDXL:
    text_embeds, time_ids), with ``guidance_embedding`` the guidance embedding (timestep_cond, for
    LCM-distilled UNets), with ``inpainting`` the mask and the masked image's latents (concatenated
    to the sample on the channels, as diffusers' inpainting pipelines do), then the residuals.
    """

    def __init__(
        self, unet: nn.Module, added: tuple[str, ...] = (), guidance_embedding: bool = False, inpainting: bool = False
    ) -> None:
        super().__init__()
        self.unet = unet
        self.added = tuple(added)
        self.guidance_embedding = guidance_embedding
        self.inpainting = inpainting

    def forward(self, sample, timestep, encoder_hidden_states, *rest):
        conditions, rest = rest[: len(self.added)], rest[len(self.added) :]
        timestep_cond, rest = (rest[0], rest[1:]) if self.guidance_embedding else (None, rest)
        if self.inpainting:
            mask, masked_image_latents, *rest = rest
            sample = torch.cat([sample, mask, masked_image_latents], dim=1)
        residuals = rest
        return self.unet(
            sample,
            timestep,
            encoder_hidden_states=encoder_hidden_states,
            timestep_cond=timestep_cond,
            down_block_additional_residuals=residuals[:-1],
            mid_block_additional_residual=residuals[-1],
            added_cond_kwargs=_added(self.added, conditions),
            return_dict=False,
        )[0]


class SD3ControlNetGraph(nn.Module):
    """An SD3 ControlNet (SD3ControlNetModel) with unit conditioning scale.

    Inputs: sample, timestep, encoder_hidden_states, pooled_projections, controlnet_cond (the
    control image's latents, ``(z - shift) * scaling`` as the transformer's). Outputs: one residual
    per block, laid out on the patch grid [B, h, w, width] (diffusers' [B, h * w, width], row-major).
    A ControlNet that force_zeros_for_pooled_projection (InstantX's) gets zeros as its pooled
    projection and its latents without the shift (``shift`` = shift x scaling is added back), as
    diffusers' pipeline feeds it. One that takes no text (SD3.5-Large's: no context embedder) has
    no encoder_hidden_states input.
    """

    def __init__(self, controlnet: nn.Module, shift: float) -> None:
        super().__init__()
        self.controlnet = controlnet
        self.zero_pooled = bool(controlnet.config.force_zeros_for_pooled_projection)
        self.shift = shift if self.zero_pooled else 0.0
        self.patch = int(controlnet.config.patch_size)
        self.text = controlnet.context_embedder is not None

    def forward(self, sample, timestep, *rest):
        encoder_hidden_states, pooled_projections, controlnet_cond = rest if self.text else (None, *rest)
        if self.zero_pooled:
            pooled_projections = torch.zeros_like(pooled_projections)
            controlnet_cond = controlnet_cond + self.shift
        blocks = self.controlnet(
            hidden_states=sample,
            timestep=timestep,
            encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled_projections,
            controlnet_cond=controlnet_cond,
            conditioning_scale=1.0,
            return_dict=False,
        )[0]
        h, w = sample.shape[-2] // self.patch, sample.shape[-1] // self.patch
        return tuple(b.reshape(b.shape[0], h, w, b.shape[-1]) for b in blocks)


class SD3TransformerGraph(nn.Module):
    """SD3's transformer (SD3Transformer2DModel) with the ControlNet blocks' residuals as explicit
    inputs (zeros mean no control), laid out as SD3ControlNetGraph gives them.

    Inputs: sample, timestep, encoder_hidden_states, pooled_projections, block_res_0 … (none for
    a build without ControlNets). Output: noise_pred.
    """

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.transformer = transformer

    def forward(self, sample, timestep, encoder_hidden_states, pooled_projections, *residuals):
        blocks = [r.flatten(1, 2) for r in residuals] or None
        return self.transformer(
            hidden_states=sample,
            timestep=timestep,
            encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled_projections,
            block_controlnet_hidden_states=blocks,
            return_dict=False,
        )[0]


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> Flux's packed tokens [B, (h/2)(w/2), 4C], as diffusers' _pack_latents."""
    b, c, h, w = latents.shape
    packed = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return packed.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Flux's packed tokens [B, (h/2)(w/2), 4C] -> [B, C, h, w], as diffusers' _unpack_latents."""
    b, _, channels = tokens.shape
    latents = tokens.reshape(b, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(b, channels // 4, h, w)


def flux_ids(latents: torch.Tensor, text_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flux's rotary position ids for latents [B, C, h, w]: the text's (zeros [text_tokens, 3]) and
    the image tokens' ((0, row, column) [(h/2)(w/2), 3]), as diffusers' pipeline makes them. In
    fp32 whatever the latents' dtype: whole numbers, looked up by FluxRotaryTable (and ONNX's
    Range has no fp16)."""
    h, w = latents.shape[-2] // 2, latents.shape[-1] // 2
    rows = torch.arange(h, device=latents.device, dtype=torch.float32)[:, None].expand(h, w)
    cols = torch.arange(w, device=latents.device, dtype=torch.float32)[None, :].expand(h, w)
    image = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(h * w, 3)
    text = torch.zeros(text_tokens, 3, device=latents.device, dtype=torch.float32)
    return text, image


class FluxRotaryTable(nn.Module):
    """Flux's rotary embedding (FluxPosEmbed) as a table lookup: each axis' cos and sin for every
    whole position below ``positions``, computed once as diffusers computes them (float64, then
    float32), gathered by the ids. The same values, with no float64 and no shape-dependent
    repeat_interleave in the exported graph (which traces the sequence length as a constant)."""

    def __init__(self, pos_embed: nn.Module, positions: int = 1024) -> None:
        super().__init__()
        from diffusers.models.embeddings import get_1d_rotary_pos_embed

        cos, sin = [], []
        for dim in pos_embed.axes_dim:
            c, s = get_1d_rotary_pos_embed(
                dim,
                torch.arange(positions, dtype=torch.float32),
                theta=pos_embed.theta,
                repeat_interleave_real=True,
                use_real=True,
                freqs_dtype=torch.float64,
            )
            cos.append(c)
            sin.append(s)
        self.dims = list(pos_embed.axes_dim)
        self.positions = positions
        self.register_buffer("cos", torch.cat(cos, dim=-1), persistent=False)  # [positions, sum(dims)]
        self.register_buffer("sin", torch.cat(sin, dim=-1), persistent=False)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        index = ids.long()
        cos, sin, start = [], [], 0
        for axis, dim in enumerate(self.dims):
            rows = index[:, axis]
            cos.append(self.cos[:, start : start + dim][rows])
            sin.append(self.sin[:, start : start + dim][rows])
            start += dim
        return torch.cat(cos, dim=-1), torch.cat(sin, dim=-1)


def _tabled(model: nn.Module) -> nn.Module:
    """``model`` (a Flux transformer or ControlNet) with its rotary embedding as FluxRotaryTable."""
    if not isinstance(model.pos_embed, FluxRotaryTable) and model.pos_embed.__class__.__name__ == "FluxPosEmbed":
        model.pos_embed = FluxRotaryTable(model.pos_embed)
    return model


def _grid(blocks, h: int, w: int) -> tuple[torch.Tensor, ...]:
    """Block outputs [B, (h/2)(w/2), width] laid out on the patch grid [B, h/2, w/2, width]."""
    return tuple(b.reshape(b.shape[0], h // 2, w // 2, b.shape[-1]) for b in blocks or ())


class FluxControlNetGraph(nn.Module):
    """A Flux ControlNet (FluxControlNetModel: InstantX's, or XLabs' with an input hint block) with
    unit conditioning scale, on unpacked latents.

    Inputs: sample [B, C, h, w], timestep (the scheduler's, divided by 1000 here as diffusers'
    pipeline does), encoder_hidden_states (T5's), pooled_projections (CLIP's pooled output),
    guidance [B] (for ControlNets with guidance_embeds), controlnet_cond (the control image's
    latents [B, C, h, w], ``(z - shift) * scaling``; for an XLabs-style ControlNet the image
    [B, 3, H, W] in [-1, 1], which its input hint block embeds), and for a ControlNet-Union (num_mode)
    control_mode int64 [B, 1]. Latents are packed and the position ids made inside. Outputs: one
    residual per double-stream block, then one per single-stream block, each on the patch grid
    [B, h/2, w/2, width].
    """

    def __init__(self, controlnet: nn.Module) -> None:
        super().__init__()
        self.controlnet = _tabled(controlnet)
        self.guidance = bool(controlnet.config.guidance_embeds)
        self.union = controlnet.config.num_mode is not None
        self.hint = controlnet.input_hint_block is not None

    def forward(self, sample, timestep, encoder_hidden_states, pooled_projections, *rest):
        control_mode = rest[-1] if self.union else None
        rest = rest[:-1] if self.union else rest
        guidance, controlnet_cond = rest if self.guidance else (None, *rest)
        h, w = sample.shape[-2:]
        text_ids, image_ids = flux_ids(sample, encoder_hidden_states.shape[1])
        blocks, singles = self.controlnet(
            hidden_states=pack_latents(sample),
            controlnet_cond=controlnet_cond if self.hint else pack_latents(controlnet_cond),
            controlnet_mode=control_mode,
            conditioning_scale=1.0,
            timestep=timestep / 1000,
            guidance=guidance,
            pooled_projections=pooled_projections,
            encoder_hidden_states=encoder_hidden_states,
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )
        return (*_grid(blocks, h, w), *_grid(singles, h, w))


class FluxTransformerGraph(nn.Module):
    """Flux's transformer (FluxTransformer2DModel) on unpacked latents, with the ControlNet blocks'
    residuals as explicit inputs (zeros mean no control), laid out as FluxControlNetGraph gives them.

    Inputs: sample [B, C, h, w], timestep, encoder_hidden_states, pooled_projections, guidance [B]
    (a transformer with guidance_embeds), block_res_0 … (``doubles`` of them), single_block_res_0 ….
    Output: noise_pred [B, C, h, w] (unpacked). With ``repeat`` the double-stream residuals go to the
    blocks in turn (XLabs-style ControlNets: diffusers' controlnet_blocks_repeat).
    """

    def __init__(self, transformer: nn.Module, doubles: int, repeat: bool = False) -> None:
        super().__init__()
        self.transformer = _tabled(transformer)
        self.guidance = bool(transformer.config.guidance_embeds)
        self.doubles = doubles
        self.repeat = repeat

    def forward(self, sample, timestep, encoder_hidden_states, pooled_projections, *rest):
        guidance, residuals = (rest[0], rest[1:]) if self.guidance else (None, rest)
        h, w = sample.shape[-2:]
        text_ids, image_ids = flux_ids(sample, encoder_hidden_states.shape[1])
        blocks = [r.flatten(1, 2) for r in residuals[: self.doubles]] or None
        singles = [r.flatten(1, 2) for r in residuals[self.doubles :]] or None
        out = self.transformer(
            hidden_states=pack_latents(sample),
            timestep=timestep / 1000,
            guidance=guidance,
            pooled_projections=pooled_projections,
            encoder_hidden_states=encoder_hidden_states,
            controlnet_block_samples=blocks,
            controlnet_single_block_samples=singles,
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
            controlnet_blocks_repeat=self.repeat,
        )[0]
        return unpack_latents(out, h, w)


class VaeDecoderGraph(nn.Module):
    """Denoised latents (still scaled) -> image in [-1, 1].

    Unscaled as diffusers does: by the scaling factor (SD3's: ``latent / scaling_factor + shift``),
    or, for VAEs whose config has latents_mean and latents_std, ``latent * std / scaling_factor + mean``.
    """

    def __init__(self, vae: nn.Module, scaling_factor: float, shift_factor: float = 0.0) -> None:
        super().__init__()
        self.vae = vae
        self.scaling_factor = scaling_factor
        self.shift_factor = shift_factor
        config = getattr(vae, "config", None)
        mean = getattr(config, "latents_mean", None)
        std = getattr(config, "latents_std", None)
        self.latents_mean = None if mean is None else torch.tensor(mean).view(1, -1, 1, 1)
        self.latents_std = None if std is None else torch.tensor(std).view(1, -1, 1, 1)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        if self.latents_mean is not None and self.latents_std is not None:
            mean, std = self.latents_mean.to(latent), self.latents_std.to(latent)
            return self.vae.decode(latent * std / self.scaling_factor + mean, return_dict=False)[0]
        if self.shift_factor:
            return self.vae.decode(latent / self.scaling_factor + self.shift_factor, return_dict=False)[0]
        return self.vae.decode(latent / self.scaling_factor, return_dict=False)[0]


class VaeEncoderGraph(nn.Module):
    """Image in [-1, 1] -> the encoder's latents: the distribution's mean and log-variance for an
    AutoencoderKL (its moments, before diffusers clamps the log-variance), the latents themselves
    for an AutoencoderTiny. Neither sampled nor scaled (see specs.vae_encoder_spec)."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae
        self.samples = hasattr(vae, "quant_conv")  # AutoencoderKL: moments; AutoencoderTiny: latents

    def forward(self, image: torch.Tensor):
        if not self.samples:
            return self.vae.encode(image, return_dict=False)[0]
        moments = self.vae.encoder(image)
        if self.vae.quant_conv is not None:
            moments = self.vae.quant_conv(moments)
        mean, logvar = torch.chunk(moments, 2, dim=1)
        return mean, logvar


def cast_inputs(names: Sequence[str], args: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """Floating inputs in ``dtype``, but the timesteps: the modules embed them in fp32 (as diffusers
    runs them with ``torch_dtype``)."""
    if dtype == torch.float32:
        return args
    return [a.to(dtype) if a.is_floating_point() and n != "timestep" else a for n, a in zip(names, args, strict=True)]


class ComputeIn(nn.Module):
    """A graph module that computes in ``dtype`` (its weights already in it) behind fp32 inputs and
    outputs: what a 16-bit export traces, so that every precision's graph takes the same tensors."""

    def __init__(self, module: nn.Module, input_names: Sequence[str], dtype: torch.dtype) -> None:
        super().__init__()
        self.module = module
        self.input_names = list(input_names)
        self.dtype = dtype

    def forward(self, *args: torch.Tensor):
        result = self.module(*cast_inputs(self.input_names, list(args), self.dtype))
        if isinstance(result, torch.Tensor):
            return result.float()
        return tuple(r.float() for r in result)
