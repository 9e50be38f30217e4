"""The SDXL UNet (Podell et al. 2023, arXiv:2307.01952) in plain PyTorch.

Attribute names are diffusers' `UNet2DConditionModel` checkpoint keys, so a diffusers `unet/`
folder loads with `load_state_dict(strict=True)` and no renames. Leaf modules come first, the
full model last. Shapes: B batch, C channels, H x W latent size, N = H*W tokens, T text tokens,
D widths.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from sdxl.lora import stacked_lora_delta
from sdxl.models.configs import UNetConfig

# ---------------------------------------------------------------------------------------------
# Leaf modules


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(N,) values -> (N, dim) fp32 [cos | sin] features (Vaswani et al. 2017; DDPM's time input)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / half)  # (half,)
    args = t[:, None].float() * freqs[None, :]  # (N, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, 2*half)
    return F.pad(emb, (0, dim % 2))


# Activation checkpointing modes of UNet2DConditionModel.set_gradient_checkpointing.
CHECKPOINTING = ("none", "full", "selective")
# The SDPA kernels (each backend's op): what "selective" keeps instead of recomputing.
_ATTENTION_OPS = frozenset(
    getattr(torch.ops.aten, name).default
    for name in (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_fused_attention_overrideable",
    )
)


def _save_attention(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Selective checkpointing policy: keep the attention outputs, recompute everything else."""
    return CheckpointPolicy.MUST_SAVE if op in _ATTENTION_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _maybe_checkpoint(module: nn.Module, fn, *args):
    """Run fn(*args), recomputing its activations in backward when checkpointing (saves memory).

    "selective" keeps the SDPA outputs (the most expensive op to recompute, ~12% of the FLOPs,
    and small: (B, heads, N, D) each) and recomputes the GEMMs, norms and activations around them.
    """
    mode = module.checkpointing if module.training else "none"
    if mode == "full":
        return checkpoint(fn, *args, use_reentrant=False)
    if mode == "selective":
        policy = functools.partial(create_selective_checkpoint_contexts, _save_attention)
        return checkpoint(fn, *args, use_reentrant=False, context_fn=policy)
    return fn(*args)


def checkpointing_mode(mode: bool | str) -> str:
    """One of CHECKPOINTING from a mode name or a bool (True = "full", False = "none")."""
    if isinstance(mode, bool):
        return "full" if mode else "none"
    if mode not in CHECKPOINTING:
        raise ValueError(
            f"gradient checkpointing {mode!r} is not one of {list(CHECKPOINTING)} (or true/false)"
        )
    return mode


class TimestepEmbedding(nn.Module):
    """Two-layer MLP from sinusoidal (or pooled-text + size) features to the time embedding."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv twice, with the time embedding added in between (DDPM resnet)."""

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None
        self.checkpointing = "none"  # a CHECKPOINTING mode

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return _maybe_checkpoint(self, self._forward, x, temb)

    def _forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


QKV = ("to_q", "to_k", "to_v")  # fused for self-attention: all read the same tokens
KV = ("to_k", "to_v")  # fused for cross-attention: both read the text context


class Attention(nn.Module):
    """Multi-head attention over tokens; keys/values come from `context` (cross) or x (self).

    After `fuse_projections` the projections that read the same input run as one GEMM (see there).
    """

    def __init__(self, query_dim: int, context_dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads = heads
        self.head_dim = head_dim
        inner = heads * head_dim
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        # a list so the key is to_out.0 (diffusers keeps a dropout at index 1)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim)])
        self.fused: tuple[str, ...] = ()  # QKV, KV or () (not fused)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if self.fused == QKV and context is not None:
            raise ValueError("this Attention's to_q/to_k/to_v are fused for self-attention")
        context = x if context is None else context
        if self.fused == QKV:
            q, k, v = self._fused_linear(x)  # (B, N, h*D) each
        elif self.fused == KV:
            q, (k, v) = self.to_q(x), self._fused_linear(context)  # k, v: (B, T, h*D)
        else:
            q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q, k, v = (self._split_heads(t) for t in (q, k, v))  # (B, h, N|T, D)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, D)
        out = out.transpose(1, 2).flatten(2)  # (B, N, h*D)
        return self.to_out[0](out)

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        """(B, L, h*D) -> (B, h, L, D)."""
        return t.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def fuse_projections(self, names: tuple[str, ...]) -> None:
        """Run the projections `names` (QKV for self-, KV for cross-attention) as one GEMM.

        Their weights become row slices of one tensor, the non-persistent buffer `fused_weight`
        (as FSDP's flat parameters do): the Parameters stay the same objects under the checkpoint
        names, so state_dict, load_state_dict, LoRA injection/merge and optimizers see no change,
        and every in-place write to a projection's weight is what the fused GEMM reads.
        """
        if names not in (QKV, KV):
            raise ValueError(f"fuse_projections takes {QKV} or {KV}, got {names!r}")
        if self.fused:
            raise ValueError(f"this Attention's {self.fused} are already fused")
        self.fused = names
        self._pack()
        self.register_load_state_dict_post_hook(_repack_after_load)

    def _pack(self) -> None:
        """Copy the fused projections' weights into one tensor and make them views of it."""
        weights = [getattr(self, n).weight for n in self.fused]
        fused = torch.cat([w.detach() for w in weights])  # (sum of out, in)
        self.register_buffer("fused_weight", fused, persistent=False)
        for w, rows in zip(weights, fused.split([w.shape[0] for w in weights]), strict=True):
            w.data = rows

    def _repack(self) -> None:
        """Share one tensor again if something gave a fused weight its own storage."""
        base = self.fused_weight.untyped_storage().data_ptr()
        weights = [getattr(self, n).weight for n in self.fused]
        if any(w.untyped_storage().data_ptr() != base for w in weights):
            self._pack()

    def _apply(self, fn, recurse: bool = True):
        # .to()/.half()/.cuda()/to_empty() convert each Parameter and buffer on its own.
        super()._apply(fn, recurse)
        if self.fused:
            self._repack()
        return self

    def _fused_linear(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The fused projections of x: one GEMM over fused_weight plus their LoRAs, stacked."""
        layers = [getattr(self, n) for n in self.fused]
        weight = self.fused_weight  # (sum of out, in)
        if any(m.weight.requires_grad for m in layers):
            weight = torch.cat([m.weight for m in layers])  # training the base: grads per Parameter
        y = F.linear(x, weight)  # (B, L, sum of out)
        delta = stacked_lora_delta(layers, x)
        if delta is not None:
            y = y + delta.to(y.dtype)
        return y.split([m.weight.shape[0] for m in layers], dim=-1)


def _repack_after_load(attention: Attention, incompatible_keys) -> None:
    """load_state_dict(assign=True) swaps the Parameters for the loaded tensors: share again."""
    attention._repack()


class GEGLU(nn.Module):
    """Gated GELU input layer of the feed-forward (Shazeer 2020, arXiv:2002.05202)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU to 4x width, then back."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        inner = dim * mult
        # index 1 is diffusers' dropout slot; it keeps the output Linear at ff.net.2
        self.net = nn.ModuleList([GEGLU(dim, inner), nn.Identity(), nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the text, feed-forward; each residual."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, dim, heads, head_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, context_dim, heads, head_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)
        self.checkpointing = "none"  # a CHECKPOINTING mode

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return _maybe_checkpoint(self, self._forward, x, context)

    def _forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))  # (B, N, D)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """Feature map -> tokens -> `depth` transformer blocks -> feature map, plus the input."""

    def __init__(self, channels: int, heads: int, depth: int, context_dim: int, groups: int):
        super().__init__()
        head_dim = channels // heads
        inner = heads * head_dim
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)  # diffusers fixes this eps
        self.proj_in = nn.Linear(channels, inner)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, head_dim, context_dim) for _ in range(depth)
        )
        self.proj_out = nn.Linear(inner, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x).permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, N, C)
        h = self.proj_in(h)  # (B, N, D)
        for block in self.transformer_blocks:
            h = block(h, context)
        h = self.proj_out(h)  # (B, N, C)
        h = h.reshape(B, H, W, C).permute(0, 3, 1, 2).contiguous()  # (B, C, H, W)
        return h + x


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv: halves H and W (rounding up)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour upsampling to the matching skip's size, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: torch.Size) -> torch.Tensor:
        # size = the skip's (H, W): exactly 2x when the latent divides evenly, else one row/col less
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


# ---------------------------------------------------------------------------------------------
# Blocks


@dataclass(frozen=True)
class _Level:
    """How one block is built: its resnet count and, when it attends, depth and heads."""

    num_layers: int
    depth: int  # transformer blocks per attention; 0 = no attention (DownBlock2D / UpBlock2D)
    heads: int
    context_dim: int
    temb_dim: int
    groups: int
    eps: float

    def resnet(self, in_ch: int, out_ch: int) -> ResnetBlock2D:
        return ResnetBlock2D(in_ch, out_ch, self.temb_dim, self.groups, self.eps)

    def attentions(self, channels: int) -> nn.ModuleList:
        """One Transformer2DModel per resnet, or none (an empty list has no keys)."""
        if not self.depth:
            return nn.ModuleList()
        return nn.ModuleList(
            Transformer2DModel(channels, self.heads, self.depth, self.context_dim, self.groups)
            for _ in range(self.num_layers)
        )


class DownBlock(nn.Module):
    """DownBlock2D / CrossAttnDownBlock2D: resnets (each with attention if any), then downsample."""

    def __init__(self, level: _Level, in_ch: int, out_ch: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            level.resnet(in_ch if i == 0 else out_ch, out_ch) for i in range(level.num_layers)
        )
        self.attentions = level.attentions(out_ch)
        self.downsamplers = nn.ModuleList([Downsample2D(out_ch)] if downsample else [])

    def forward(
        self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Return the output and the skips: one per resnet, plus one after downsampling."""
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions:
                x = self.attentions[i](x, context)
            skips.append(x)
        for down in self.downsamplers:
            x = down(x)  # (B, C, ceil(H/2), ceil(W/2))
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """UNetMidBlock2DCrossAttn: resnet, attention, resnet at the lowest resolution."""

    def __init__(self, level: _Level, channels: int):
        super().__init__()
        self.resnets = nn.ModuleList([level.resnet(channels, channels) for _ in range(2)])
        self.attentions = level.attentions(channels)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context)
        return self.resnets[1](x, temb)


class UpBlock(nn.Module):
    """UpBlock2D / CrossAttnUpBlock2D: concat a skip, resnet (+ attention), ..., then upsample."""

    def __init__(self, level: _Level, in_ch: int, prev_ch: int, out_ch: int, upsample: bool):
        super().__init__()
        n, resnets = level.num_layers, []
        for i in range(n):
            x_ch = prev_ch if i == 0 else out_ch  # from the level below, then from our resnets
            skip_ch = in_ch if i == n - 1 else out_ch  # the last skip was pushed before this level
            resnets.append(level.resnet(x_ch + skip_ch, out_ch))
        self.resnets = nn.ModuleList(resnets)
        self.attentions = level.attentions(out_ch)
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch)] if upsample else [])

    def forward(
        self,
        x: torch.Tensor,
        skips: list[torch.Tensor],
        temb: torch.Tensor,
        context: torch.Tensor,
        size: torch.Size | None,
    ) -> torch.Tensor:
        """`skips` in the order they are used (last pushed first); `size` is the next skip's (H, W)."""
        for i, (resnet, skip) in enumerate(zip(self.resnets, skips, strict=True)):
            x = torch.cat([x, skip], dim=1)  # (B, C + C_skip, H, W)
            x = resnet(x, temb)
            if self.attentions:
                x = self.attentions[i](x, context)
        for up in self.upsamplers:
            x = up(x, size)  # (B, C, H_next, W_next)
        return x


# ---------------------------------------------------------------------------------------------
# Full model


class UNet2DConditionModel(nn.Module):
    """Latent noise prediction eps(x_t, t, text, pooled text, size/crop ids) of SDXL."""

    config_class = UNetConfig  # what sdxl.weights reads config.json into

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        widths, temb_dim = cfg.block_out_channels, cfg.time_embed_dim
        n = len(widths)
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(widths[0], temb_dim)
        self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, temb_dim)

        self.down_blocks = nn.ModuleList()
        for i, kind in enumerate(cfg.down_block_types):
            level = self._level(i, cfg.layers_per_block[i], kind == "CrossAttnDownBlock2D")
            in_ch = widths[max(i - 1, 0)]
            self.down_blocks.append(DownBlock(level, in_ch, widths[i], downsample=i < n - 1))

        self.mid_block = MidBlock(self._level(n - 1, 1, attends=True), widths[-1])

        self.up_blocks = nn.ModuleList()
        for i, kind in enumerate(cfg.up_block_types):
            j = n - 1 - i  # the matching down level
            attends = kind == "CrossAttnUpBlock2D"
            level = self._level(j, cfg.layers_per_block[j] + 1, attends)  # one more resnet
            prev_ch, in_ch = widths[min(j + 1, n - 1)], widths[max(j - 1, 0)]
            self.up_blocks.append(UpBlock(level, in_ch, prev_ch, widths[j], upsample=i < n - 1))

        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, widths[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(widths[0], cfg.out_channels, 3, padding=1)

    def _level(self, i: int, num_layers: int, attends: bool) -> _Level:
        """Build parameters of level i (0 = full resolution) for a block with num_layers resnets."""
        cfg = self.config
        return _Level(
            num_layers=num_layers,
            depth=cfg.transformer_layers_per_block[i] if attends else 0,
            heads=cfg.num_attention_heads[i],
            context_dim=cfg.cross_attention_dim,
            temb_dim=cfg.time_embed_dim,
            groups=cfg.norm_num_groups,
            eps=cfg.norm_eps,
        )

    def set_gradient_checkpointing(self, mode: bool | str) -> None:
        """Recompute activations in backward (in training), per resnet and transformer block.

        mode: "none" (False), "full" (True: recompute each block's whole forward) or "selective"
        (transformer blocks keep their attention outputs and recompute the rest; resnets, which
        have no attention, recompute fully).
        """
        mode = checkpointing_mode(mode)
        for m in self.modules():
            if isinstance(m, BasicTransformerBlock):
                m.checkpointing = mode
            elif isinstance(m, ResnetBlock2D):
                m.checkpointing = "none" if mode == "none" else "full"

    def fuse_qkv(self) -> None:
        """Fuse each self-attention's to_q/to_k/to_v and each cross-attention's to_k/to_v.

        Call after loading the weights: one GEMM of N = 3 * inner per self-attention instead of
        three (fills the GPU at batch 1). The state dict keeps the checkpoint names and values;
        LoRAs on the fused projections run stacked (see Attention.fuse_projections).
        """
        for m in self.modules():
            if isinstance(m, BasicTransformerBlock):
                m.attn1.fuse_projections(QKV)
                m.attn2.fuse_projections(KV)

    def embed_time(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        text_embeds: torch.Tensor,
        time_ids: torch.Tensor,
    ) -> torch.Tensor:
        """(B, 4*C0) embedding of the timestep plus the pooled text and the size/crop ids."""
        B = sample.shape[0]
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(B)  # (B,)
        t_emb = timestep_embedding(t, self.config.block_out_channels[0]).to(sample.dtype)
        emb = self.time_embedding(t_emb)  # (B, 4*C0)
        ids = timestep_embedding(time_ids.flatten(), self.config.addition_time_embed_dim)
        add = torch.cat([text_embeds, ids.reshape(B, -1)], dim=-1).to(emb.dtype)  # (B, P)
        return emb + self.add_embedding(add)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor,
        time_ids: torch.Tensor,
    ) -> torch.Tensor:
        """Predict the noise in `sample` (B, C_in, H, W); timestep is a number, 0-d or (B,)."""
        self._check_inputs(sample, encoder_hidden_states, text_embeds, time_ids)
        context = encoder_hidden_states  # (B, T, D_ctx)
        emb = self.embed_time(sample, timestep, text_embeds, time_ids)  # (B, 4*C0)

        x = self.conv_in(sample)  # (B, C0, H, W)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, emb, context)
            skips.extend(block_skips)
        x = self.mid_block(x, emb, context)  # (B, C_last, H / 2^(n-1), W / 2^(n-1))
        for block in self.up_blocks:
            block_skips = [skips.pop() for _ in block.resnets]
            size = skips[-1].shape[-2:] if skips else None  # where the upsampler must land
            x = block(x, block_skips, emb, context, size)
        x = F.silu(self.conv_norm_out(x))  # (B, C0, H, W)
        return self.conv_out(x)  # (B, C_out, H, W)

    def _check_inputs(self, sample, context, text_embeds, time_ids) -> None:
        """Shape errors with names, instead of a matmul mismatch deep inside (shapes only: no sync)."""
        cfg = self.config
        pooled = cfg.projection_class_embeddings_input_dim
        if sample.ndim != 4 or sample.shape[1] != cfg.in_channels:
            raise ValueError(f"sample must be (B, {cfg.in_channels}, H, W), got {sample.shape}")
        if context.ndim != 3 or context.shape[-1] != cfg.cross_attention_dim:
            raise ValueError(
                f"encoder_hidden_states must be (B, T, {cfg.cross_attention_dim}), "
                f"got {tuple(context.shape)}"
            )
        width = text_embeds.shape[-1] + time_ids[0].numel() * cfg.addition_time_embed_dim
        if text_embeds.ndim != 2 or width != pooled:
            raise ValueError(
                f"text_embeds {tuple(text_embeds.shape)} and time_ids {tuple(time_ids.shape)} give "
                f"{width} added features; this UNet expects {pooled}"
            )
