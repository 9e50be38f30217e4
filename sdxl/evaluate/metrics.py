"""FID, KID and CLIP score from features, computed as torchmetrics computes them.

FID: Heusel et al. 2017 (https://arxiv.org/abs/1706.08500), torchmetrics'
`FrechetInceptionDistance` (float64 statistics, trace of sqrt(S1 S2) from its eigenvalues).
KID: Binkowski et al. 2018 (https://arxiv.org/abs/1801.01401), torchmetrics'
`KernelInceptionDistance` (cubic polynomial kernel, unbiased MMD^2 over random subsets).
CLIP score: Hessel et al. 2021 (https://arxiv.org/abs/2104.08718), torchmetrics' `CLIPScore`
(mean of 100 cos(image, prompt), floored at 0).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sdxl.utils import atomic_write_text


def fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Frechet distance of the Gaussians fitted to two (N, D) feature sets."""
    if len(real) < 2 or len(fake) < 2:
        raise ValueError("FID needs at least 2 images on each side")
    mu1, s1 = _gaussian(real.double())
    mu2, s2 = _gaussian(fake.double())
    trace_sqrt = torch.linalg.eigvals(s1 @ s2).sqrt().real.sum()
    return float((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * trace_sqrt)


def _gaussian(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = f.shape[0]
    mean = f.sum(0) / n
    cov = (f.T @ f - n * torch.outer(mean, mean)) / (n - 1)  # torchmetrics' running-sum form
    return mean, cov


def _poly_mmd(f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
    """Unbiased MMD^2 with k(x, y) = (x.y / D + 1)^3 (equal subset sizes)."""
    m, gamma = f1.shape[0], 1.0 / f1.shape[1]
    k11, k22 = (f1 @ f1.T * gamma + 1) ** 3, (f2 @ f2.T * gamma + 1) ** 3
    k12 = (f1 @ f2.T * gamma + 1) ** 3
    within = (k11.sum() - k11.diag().sum()) + (k22.sum() - k22.diag().sum())
    return within / (m * (m - 1)) - 2 * k12.sum() / m**2


def kid(real: torch.Tensor, fake: torch.Tensor, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float, int]:  # fmt: skip
    """(mean, std, subset size used) of the KID over `subsets` random subsets.

    The subsets are torchmetrics' (torch.randperm of real then fake, per subset) drawn from a
    generator seeded with `seed`; subset_size is capped at the smaller set.
    """
    size = min(subset_size, len(real), len(fake))
    if size < 2:
        raise ValueError("KID needs at least 2 images on each side")
    gen = torch.Generator().manual_seed(seed)
    real, fake = real.double(), fake.double()
    scores = []
    for _ in range(subsets):
        r = real[torch.randperm(len(real), generator=gen)[:size]]
        f = fake[torch.randperm(len(fake), generator=gen)[:size]]
        scores.append(_poly_mmd(r, f))
    scores = torch.stack(scores)
    return float(scores.mean()), float(scores.std(unbiased=False)), size


def clip_score(image_emb: torch.Tensor, text_emb: torch.Tensor) -> float:
    """Mean over images of 100 cos(image, prompt), floored at 0 as torchmetrics does."""
    cos = torch.nn.functional.cosine_similarity(image_emb.double(), text_emb.double(), dim=-1)
    return max(float(100 * cos.mean()), 0.0)


def write_metrics(path: str | Path, metrics: dict) -> None:
    """metrics.json, atomically; NaN/inf become null (JSON has no NaN)."""
    clean = json.loads(json.dumps(metrics, default=str), parse_constant=lambda _: None)
    atomic_write_text(path, json.dumps(clean, indent=2) + "\n")
