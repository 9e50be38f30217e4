"""evaluate: merge the feature shards and write FID, KID and CLIP score to metrics.json."""

from typing import TYPE_CHECKING

from common import finish, start

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake

start(snakemake)

from sdxl.evaluate.run import evaluate_shards  # noqa: E402

shards = list(snakemake.input.generated)
kid = snakemake.params.kid
metrics = evaluate_shards(shards, list(snakemake.input.reference), snakemake.output.metrics,
                          kid["kid_subsets"], kid["kid_subset_size"],
                          images=f"results/generate ({len(shards)} shards)")  # fmt: skip
scores = {"FID": metrics["fid"], "KID": metrics["kid_mean"], "CLIP score": metrics["clip_score"]}
finish(snakemake, ", ".join(f"{k} {v:.4g}" for k, v in scores.items() if v is not None))
