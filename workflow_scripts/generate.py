"""generate: make one shard's share of the images (one GPU); a rerun skips finished images."""

import json
from pathlib import Path
from typing import TYPE_CHECKING

from common import generation_config, job_fingerprint, resume_or_restart, shard_indices, start

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake

claim = start(snakemake, gpus=snakemake.resources.gpu)

from sdxl.generate.run import generate_indices  # noqa: E402

out = Path(snakemake.output.done).with_suffix("")  # results/generate/shard-K/
resume_or_restart(out, job_fingerprint(snakemake))
cfg = generation_config(snakemake.params.generate, snakemake.input, out, claim.torch_device)
shard, shards = int(snakemake.wildcards.shard), snakemake.params.generate["shards"]
indices = shard_indices(len(cfg.prompts), shard, shards)
generate_indices(cfg, indices, claim.torch_device)
done = {"shard": shard, "folder": str(out), "files": [cfg.file_stem(i) + ".png" for i in indices]}
Path(snakemake.output.done).write_text(json.dumps(done, indent=1) + "\n")
