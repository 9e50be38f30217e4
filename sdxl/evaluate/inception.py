"""The FID InceptionV3 (TensorFlow's 2015-12-05 graph), as torch-fidelity ports it.

Attribute names are torch-fidelity's `FeatureExtractorInceptionV3` keys, so its converted
weights (`weights-inception-2015-12-05-6726825d.pth`, the FID weights of Heusel et al. 2017,
https://arxiv.org/abs/1706.08500) load with strict=True. Preprocessing is its exact one: uint8
images, TF1-style bilinear resize to 299, (x - 128) / 128. `width` scales every channel count
for the tiny random-weight variant the tests and the demo use (`builtin:tiny-inception`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sdxl.errors import UserError

INPUT_SIZE = 299
WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
    "weights-inception-2015-12-05-6726825d.pth"
)
WEIGHTS_FILE = WEIGHTS_URL.rsplit("/", 1)[1]
TINY_INCEPTION = "builtin:tiny-inception"
DEFAULT_INCEPTION = "default"
RESIZES = ("tf1", "antialias")


@dataclass(frozen=True)
class InceptionConfig:
    """Only the channel multiplier varies: 1.0 is the FID network (2048-d features)."""

    width: float = 1.0
    resize: str = "tf1"  # "tf1": torch-fidelity / TF FID; "antialias": torchmetrics' default

    def __post_init__(self):
        if not 0 < self.width <= 1:
            raise ValueError(f"inception width must be in (0, 1], got {self.width}")
        if self.resize not in RESIZES:
            raise ValueError(f"unknown resize {self.resize!r}; use one of {list(RESIZES)}")

    def ch(self, n: int) -> int:
        return max(1, round(n * self.width))


TINY_CONFIG = InceptionConfig(width=0.125)


class BasicConv2d(nn.Module):
    def __init__(self, cin: int, cout: int, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)
        self.out_channels = cout

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg3(x):
    # TensorFlow's average pool leaves the zero padding out of the mean.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int, c: InceptionConfig):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, c.ch(64), kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, c.ch(48), kernel_size=1)
        self.branch5x5_2 = BasicConv2d(c.ch(48), c.ch(64), kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, c.ch(64), kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(c.ch(64), c.ch(96), kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(c.ch(96), c.ch(96), kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, c.ch(pool_features), kernel_size=1)
        self.out_channels = 2 * c.ch(64) + c.ch(96) + c.ch(pool_features)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg3(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int, c: InceptionConfig):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, c.ch(384), kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, c.ch(64), kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(c.ch(64), c.ch(96), kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(c.ch(96), c.ch(96), kernel_size=3, stride=2)
        self.out_channels = c.ch(384) + c.ch(96) + cin

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin: int, channels_7x7: int, c: InceptionConfig):
        super().__init__()
        c7, c192 = c.ch(channels_7x7), c.ch(192)
        self.branch1x1 = BasicConv2d(cin, c192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, c192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, c192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, c192, kernel_size=1)
        self.out_channels = 4 * c192

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = self.branch7x7dbl_1(x)
        d = self.branch7x7dbl_5(self.branch7x7dbl_4(self.branch7x7dbl_3(self.branch7x7dbl_2(d))))
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg3(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int, c: InceptionConfig):
        super().__init__()
        c192 = c.ch(192)
        self.branch3x3_1 = BasicConv2d(cin, c192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(c192, c.ch(320), kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, c192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(c192, c192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(c192, c192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(c192, c192, kernel_size=3, stride=2)
        self.out_channels = c.ch(320) + c192 + cin

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_1(x)
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(b7)))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """Mixed_7b (average pool) and Mixed_7c (max pool: what the TF graph does, not the paper)."""

    def __init__(self, cin: int, c: InceptionConfig, max_pool: bool):
        super().__init__()
        c384 = c.ch(384)
        self.branch1x1 = BasicConv2d(cin, c.ch(320), kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, c384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(c384, c384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(c384, c384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, c.ch(448), kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(c.ch(448), c384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(c384, c384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(c384, c384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, c.ch(192), kernel_size=1)
        self.max_pool = max_pool
        self.out_channels = c.ch(320) + 4 * c384 + c.ch(192)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pool)], 1)


class InceptionV3(nn.Module):
    """uint8 (B, 3, H, W) images -> (B, D) pool features (D = 2048 at full width)."""

    def __init__(self, config: InceptionConfig = InceptionConfig()):
        super().__init__()
        c = self.config = config
        self.Conv2d_1a_3x3 = BasicConv2d(3, c.ch(32), kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(c.ch(32), c.ch(32), kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(c.ch(32), c.ch(64), kernel_size=3, padding=1)
        self.MaxPool_1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Conv2d_3b_1x1 = BasicConv2d(c.ch(64), c.ch(80), kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(c.ch(80), c.ch(192), kernel_size=3)
        self.MaxPool_2 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Mixed_5b = InceptionA(c.ch(192), 32, c)
        self.Mixed_5c = InceptionA(self.Mixed_5b.out_channels, 64, c)
        self.Mixed_5d = InceptionA(self.Mixed_5c.out_channels, 64, c)
        self.Mixed_6a = InceptionB(self.Mixed_5d.out_channels, c)
        self.Mixed_6b = InceptionC(self.Mixed_6a.out_channels, 128, c)
        self.Mixed_6c = InceptionC(self.Mixed_6b.out_channels, 160, c)
        self.Mixed_6d = InceptionC(self.Mixed_6c.out_channels, 160, c)
        self.Mixed_6e = InceptionC(self.Mixed_6d.out_channels, 192, c)
        self.Mixed_7a = InceptionD(self.Mixed_6e.out_channels, c)
        self.Mixed_7b = InceptionE(self.Mixed_7a.out_channels, c, max_pool=False)
        self.Mixed_7c = InceptionE(self.Mixed_7b.out_channels, c, max_pool=True)
        self.AvgPool = nn.AdaptiveAvgPool2d(output_size=(1, 1))
        self.num_features = self.Mixed_7c.out_channels
        self.fc = nn.Linear(self.num_features, 1008)  # ImageNet logits; unused, kept for the keys

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"expected uint8 (B, 3, H, W) images, got {images.dtype} {tuple(images.shape)}"
            )
        return self.features(resize_299(images.to(self.fc.weight.dtype), self.config.resize))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Resized float images in [0, 255], (B, 3, 299, 299) -> (B, D) features."""
        x = (x - 128) / 128
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1"):
            x = getattr(self, name)(x)  # (B, 64w, 73, 73)
        for name in ("Conv2d_3b_1x1", "Conv2d_4a_3x3", "MaxPool_2"):
            x = getattr(self, name)(x)  # (B, 192w, 35, 35)
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c"):
            x = getattr(self, name)(x)
        for name in ("Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(self, name)(x)  # (B, 2048w, 8, 8)
        return torch.flatten(self.AvgPool(x), 1).float()  # (B, D)


def resize_299(x: torch.Tensor, mode: str) -> torch.Tensor:
    """Float (B, C, H, W) in [0, 255] -> (B, C, 299, 299), as torch-fidelity / torchmetrics do."""
    if mode == "antialias":
        size = (INPUT_SIZE, INPUT_SIZE)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    return tf1_bilinear(x, INPUT_SIZE, INPUT_SIZE)


def tf1_bilinear(x: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """TensorFlow 1.x bilinear resize (align_corners=False, no half-pixel centres).

    torch-fidelity's `interpolate_bilinear_2d_like_tensorflow1x` (method "slow"), which its
    authors checked bit-exact against TF on CPU; the grid is computed the same way.
    """
    in_h, in_w = x.shape[2], x.shape[3]

    def grid(n_out: int, n_in: int):
        pos = torch.arange(0, n_out, 1, dtype=x.dtype, device=x.device)
        pos = pos * torch.tensor(n_in / n_out, dtype=torch.float32)
        lo = pos.long()
        return lo, (lo + 1).clamp_max(n_in - 1), pos - lo.float()

    y_lo, y_hi, dy = grid(out_h, in_h)
    x_lo, x_hi, dx = grid(out_w, in_w)
    top, bottom = x[:, :, y_lo, :], x[:, :, y_hi, :]
    in_00, in_01 = top[:, :, :, x_lo], top[:, :, :, x_hi]
    in_10, in_11 = bottom[:, :, :, x_lo], bottom[:, :, :, x_hi]
    in_0 = in_00 + (in_01 - in_00) * dx.view(1, 1, 1, out_w)
    in_1 = in_10 + (in_11 - in_10) * dx.view(1, 1, 1, out_w)
    return in_0 + (in_1 - in_0) * dy.view(1, 1, out_h, 1)


def random_state_dict(config: InceptionConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random weights whose activations keep their scale through the depth (He init)."""
    model = InceptionV3(config)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            state[key] = value
        elif key.endswith("conv.weight") or key == "fc.weight":
            std = math.sqrt(2.0 / (value[0].numel()))
            state[key] = torch.randn(value.shape, generator=gen) * std
        elif key.endswith("running_var"):
            state[key] = 0.5 + torch.rand(value.shape, generator=gen)
        elif key.endswith("bn.weight"):
            state[key] = torch.ones_like(value)
        else:  # running_mean, bn.bias, fc.bias
            state[key] = 0.1 * torch.randn(value.shape, generator=gen)
    return state


def cache_dir() -> Path:
    """$SDXL_CACHE_DIR, else ~/.cache/sdxl-pipeline (XDG_CACHE_HOME honoured)."""
    root = os.environ.get("SDXL_CACHE_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sdxl-pipeline"


def fid_weights_path() -> Path:
    """The FID Inception weights, downloaded into the cache on first use."""
    path = cache_dir() / WEIGHTS_FILE
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    try:  # downloads to a temp file and renames it: never a partial file at `path`
        torch.hub.download_url_to_file(WEIGHTS_URL, str(path), progress=True)
    except Exception as err:  # urllib raises URLError, HTTPError, timeouts, ...
        raise UserError(
            f"cannot download the FID Inception weights ({err}); offline, download {WEIGHTS_URL} "
            f"elsewhere and put it at {path} (or set SDXL_CACHE_DIR)"
        ) from None
    return path


def load_inception(name: str, device: str | torch.device = "cpu") -> InceptionV3:
    """`default` (the FID weights), `builtin:tiny-inception`, or a path to a weights file."""
    if name == TINY_INCEPTION:
        model, state = InceptionV3(TINY_CONFIG), random_state_dict(TINY_CONFIG)
    else:
        path = fid_weights_path() if name == DEFAULT_INCEPTION else Path(name)
        if not path.is_file():
            raise UserError(
                f"inception {name!r}: no such weights file; use {DEFAULT_INCEPTION!r}, "
                f"{TINY_INCEPTION!r} or the path of {WEIGHTS_FILE}"
            )
        model, state = InceptionV3(), torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.requires_grad_(False).eval().to(device)
