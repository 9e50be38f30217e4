"""The SDXL VAE (diffusers' `AutoencoderKL`) in plain PyTorch, with diffusers' checkpoint keys.

Latent Diffusion autoencoder: Rombach et al. 2022, https://arxiv.org/abs/2112.10752.
Images are (B, 3, H, W) in [-1, 1]; latents are (B, 4, H/f, W/f) with f = 2 ** (levels - 1),
unscaled: callers multiply by `config.scaling_factor` before the UNet and divide after.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sdxl.models.configs import VAEConfig

_EPS = 1e-6  # every GroupNorm in the diffusers VAE
_DEFAULT_TILE = 64  # latent pixels per tile (512 image pixels) when tile_size is None

# ----------------------------------------------------------------------------- leaf modules


class ResnetBlock2D(nn.Module):
    """Pre-norm residual block without a time embedding (diffusers ResnetBlock2D, temb=None)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=_EPS)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=_EPS)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = (
            nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Attention(nn.Module):
    """Single-head spatial self-attention with a residual (the VAE mid-block attention)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=_EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # index 0 as in diffusers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, H*W, C)
        q, k, v = (proj(h).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))
        h = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # (B, H*W, C)
        h = self.to_out[0](h).transpose(1, 2).reshape(B, C, H, W)
        return x + h


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv after padding right/bottom by one (diffusers padding=0)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (B, C, H/2, W/2)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


class DownEncoderBlock2D(nn.Module):
    """One encoder level: resnets, then an optional downsampler."""

    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, down: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups)
            for i in range(layers)
        )
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels)]) if down else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock2D(nn.Module):
    """One decoder level: resnets, then an optional upsampler."""

    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, up: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups)
            for i in range(layers)
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if up else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class UNetMidBlock2D(nn.Module):
    """resnet -> attention -> resnet at the lowest resolution."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.attentions = nn.ModuleList([Attention(channels, groups)])
        self.resnets = nn.ModuleList(ResnetBlock2D(channels, channels, groups) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        x = self.attentions[0](x)
        return self.resnets[1](x)


# ----------------------------------------------------------------------------- encoder / decoder


class Encoder(nn.Module):
    """Image (B, in, H, W) -> moments (B, 2 * latent, H/f, W/f)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chans, groups = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, chans[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownEncoderBlock2D(
                chans[max(i - 1, 0)], c, cfg.layers_per_block, groups, down=i < len(chans) - 1
            )
            for i, c in enumerate(chans)
        )
        self.mid_block = UNetMidBlock2D(chans[-1], groups)
        self.conv_norm_out = nn.GroupNorm(groups, chans[-1], eps=_EPS)
        self.conv_out = nn.Conv2d(chans[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)  # (B, C0, H, W)
        for block in self.down_blocks:
            x = block(x)  # (B, Ci, H/2^i, W/2^i)
        x = self.mid_block(x)  # (B, C_last, H/f, W/f)
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # (B, 2 * latent, H/f, W/f)


class Decoder(nn.Module):
    """Latent (B, latent, h, w) -> image (B, out, h*f, w*f)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chans, groups = cfg.block_out_channels[::-1], cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, chans[0], 3, padding=1)
        self.up_blocks = nn.ModuleList(
            UpDecoderBlock2D(
                chans[max(i - 1, 0)], c, cfg.layers_per_block + 1, groups, up=i < len(chans) - 1
            )
            for i, c in enumerate(chans)
        )
        self.mid_block = UNetMidBlock2D(chans[0], groups)
        self.conv_norm_out = nn.GroupNorm(groups, chans[-1], eps=_EPS)
        self.conv_out = nn.Conv2d(chans[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))  # (B, C_last, h, w)
        for block in self.up_blocks:
            x = block(x)  # (B, Ci, h*2^i, w*2^i)
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # (B, out, h*f, w*f)


# ----------------------------------------------------------------------------- tiling helpers


def _blend(a: torch.Tensor, b: torch.Tensor, extent: int, dim: int) -> torch.Tensor:
    """Fade from the end of `a` into the start of `b` over `extent` rows/cols of `dim` (2 or 3)."""
    extent = min(a.shape[dim], b.shape[dim], extent)
    if extent == 0:
        return b
    w = torch.arange(extent, device=b.device, dtype=torch.float32) / extent  # ramp 0 -> 1
    w = w.view(-1, 1) if dim == 2 else w
    head = a.narrow(dim, a.shape[dim] - extent, extent) * (1 - w) + b.narrow(dim, 0, extent) * w
    return torch.cat([head.to(b.dtype), b.narrow(dim, extent, b.shape[dim] - extent)], dim)


# ----------------------------------------------------------------------------- the model


class AutoencoderKL(nn.Module):
    """The KL-regularised autoencoder; state_dict keys equal diffusers' AutoencoderKL."""

    config_class = VAEConfig  # what sdxl.weights reads config.json into

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        c = config.latent_channels
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1)
        self.post_quant_conv = nn.Conv2d(c, c, 1)

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' dtype; inputs are cast to it."""
        return self.quant_conv.weight.dtype

    def encode(self, x: torch.Tensor, *, slice: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [-1, 1] (B, 3, H, W) -> (mean, logvar), each (B, latent, H/f, W/f), unscaled.

        `slice=True` encodes one sample at a time to bound memory (same result).
        """
        x = x.to(self.dtype)
        if slice and x.shape[0] > 1:
            moments = torch.cat([self._moments(xi) for xi in x.split(1)])
        else:
            moments = self._moments(x)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)  # as diffusers' DiagonalGaussianDistribution

    def _moments(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder followed by quant_conv."""
        return self.quant_conv(self.encoder(x))  # (B, 2 * latent, H/f, W/f)

    def decode(
        self,
        z: torch.Tensor,
        *,
        tile: bool = False,
        tile_size: int | None = None,
        slice: bool = False,
    ) -> torch.Tensor:
        """Unscaled latents (B, latent, h, w) -> images (B, 3, h*f, w*f) in about [-1, 1].

        `slice=True` decodes one sample at a time (same result). `tile=True` decodes overlapping
        `tile_size` latent tiles (default 64, overlap a quarter) and blends the seams linearly,
        like diffusers' `tiled_decode`; latents that fit one tile are decoded whole.
        """
        z = z.to(self.dtype)
        if slice and z.shape[0] > 1:
            return torch.cat([self.decode(zi, tile=tile, tile_size=tile_size) for zi in z.split(1)])
        if tile:
            return self._tiled_decode(z, _DEFAULT_TILE if tile_size is None else tile_size)
        return self._decode(z)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        """post_quant_conv followed by the decoder."""
        return self.decoder(self.post_quant_conv(z))

    def _tiled_decode(self, z: torch.Tensor, tile_size: int) -> torch.Tensor:
        """Decode tiles of `tile_size` latents every `tile_size - tile_size // 4`, blending seams.

        Equals diffusers' tiled_decode when tile_size is a multiple of 4: each tile is blended
        with its already-blended upper and left neighbours, then cropped to the stride.
        """
        if tile_size < 4:
            raise ValueError(f"tile_size must be at least 4 latent pixels, got {tile_size}")
        if max(z.shape[-2:]) <= tile_size:
            return self._decode(z)
        H, W = z.shape[-2:]
        overlap = tile_size // 4
        stride, f = tile_size - overlap, self.config.downscale
        blend, keep = overlap * f, stride * f  # in image pixels
        rows, above = [], None
        for i in range(0, H, stride):
            row = []
            for j in range(0, W, stride):
                t = self._decode(z[:, :, i : i + tile_size, j : j + tile_size])
                if above is not None:
                    t = _blend(above[len(row)], t, blend, dim=2)
                if row:
                    t = _blend(row[-1], t, blend, dim=3)
                row.append(t)
            rows.append(torch.cat([t[:, :, :keep, :keep] for t in row], dim=3))
            above = row
        return torch.cat(rows, dim=2)  # (B, out, H*f, W*f)


def sample_latent(
    mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Draw z = mean + exp(logvar / 2) * eps, eps drawn like diffusers' latent_dist.sample().

    A CPU generator draws on the CPU (then moves), as diffusers' randn_tensor does.
    """
    device = mean.device if generator is None else generator.device
    eps = torch.randn(mean.shape, generator=generator, device=device, dtype=mean.dtype)
    return mean + torch.exp(0.5 * logvar) * eps.to(mean.device)
