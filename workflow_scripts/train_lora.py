"""train_lora: train the UNet LoRA on the caches; more than one GPU runs DDP via torchrun."""

from pathlib import Path
from typing import TYPE_CHECKING

from common import job_fingerprint, resume_or_restart, start

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake

claim = start(snakemake, gpus=snakemake.resources.gpu)

from sdxl.train.config import TrainConfig  # noqa: E402
from sdxl.train.launch import run_training  # noqa: E402

out = Path(snakemake.output.lora).parent
resume_or_restart(out, job_fingerprint(snakemake))  # a rerun of the same job resumes
hp = {k: v for k, v in snakemake.params.train.items() if k != "gpus"}  # the devices claimed
cfg = TrainConfig.from_dict({
    **hp, "data_dir": str(Path(snakemake.input.latents).parents[1]),
    "output_dir": str(out), "pretrained_model": snakemake.input.model,
    "device": claim.torch_device, "resume_from": "auto",
})  # fmt: skip
run_training(cfg, num_gpus=len(claim.devices))
