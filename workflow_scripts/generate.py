"""generate: make one fixed range of images (one GPU); finished images are kept untouched."""

import time
from pathlib import Path
from typing import TYPE_CHECKING

from common import code_digest, finish, start
from generation import generation_config

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake

claim = start(snakemake, gpus=snakemake.resources.gpu)

import torch  # noqa: E402

from sdxl.generate.run import generate_indices  # noqa: E402
from sdxl.generate.shard_marker import write_shard_marker  # noqa: E402

out = Path(snakemake.output.done).with_suffix("")  # results/generate/shard-K/
first, stop = snakemake.params.indices
speed = {k: snakemake.config["generate"][k] for k in ("compile", "channels_last")}
cfg = generation_config(snakemake.params.generate, snakemake.input, out, stop,
                        snakemake.params.index_width, claim.torch_device, code_digest(snakemake),
                        speed)  # fmt: skip
indices = range(first, stop)
began = time.perf_counter()
made = generate_indices(cfg, list(indices), claim.torch_device)
cuda = claim.torch_device == "cuda"
peak = round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None
write_shard_marker(Path(snakemake.output.done), cfg, indices, made=made,
                   seconds=time.perf_counter() - began, device=claim.torch_device,
                   peak_mem_gb=peak)  # fmt: skip
finish(snakemake, f"images {first} to {stop - 1}: {made} made, {len(indices) - made} kept",
       [f"{out}/", snakemake.output.done])  # fmt: skip
