"""train_lora: train the UNet LoRA on the caches; more than one GPU runs DDP via torchrun.

A rerun continues from the run's newest usable checkpoint (the library decides which and logs
"resuming from step N" or "starting from step 0", see sdxl/train/loop.py); the folder is
emptied first only when what is learned changed.
"""

from pathlib import Path
from typing import TYPE_CHECKING

from common import finish, job_fingerprint, resume_or_restart, start

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake

claim = start(snakemake, gpus=snakemake.resources.gpu)

from safetensors import safe_open  # noqa: E402

from sdxl.errors import UserError  # noqa: E402
from sdxl.train import config as settings  # noqa: E402

asked, given = snakemake.params.train["gpus"], snakemake.resources.gpu
if given < asked:  # snakemake caps a job's gpu=N at --resources gpu without a word
    raise UserError(f"train.gpus is {asked} but this job was given {given} GPU(s); run "
                    f"snakemake with --resources gpu={asked} (or more), or set train.gpus: {given}")  # fmt: skip
from sdxl.train.launch import run_training  # noqa: E402

out = Path(snakemake.output.lora).parent
learned = snakemake.params.train
# The library continues across a change of length or snapshots; anything else starts over.
continuable = {*settings.LENGTH_SETTINGS, *settings.SNAPSHOT_SETTINGS}
same_run = {k: v for k, v in learned.items() if k not in continuable}
resume_or_restart(out, job_fingerprint(snakemake, same_run))
runtime = {k: v for k, v in snakemake.config["train"].items() if k in settings.RUNTIME_SETTINGS}
hp = {k: v for k, v in learned.items() if k != "gpus"}  # the devices claimed say how many
cfg = settings.TrainConfig.from_dict({
    **hp, **runtime, "output_name": snakemake.params.run,
    "data_dir": str(Path(snakemake.input.latents).parents[1]), "output_dir": str(out),
    "pretrained_model": snakemake.input.model, "device": claim.torch_device, "resume_from": "auto",
})  # fmt: skip
run_training(cfg, num_gpus=len(claim.devices))
with safe_open(snakemake.output.lora, "pt") as f:  # the steps done, in the file's header
    done = f"LoRA rank {cfg.lora_rank}, {f.metadata()['ss_steps']} steps"
finish(snakemake, done, [snakemake.output.lora, snakemake.output.lora_pt])
