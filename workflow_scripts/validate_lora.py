"""validate_lora: validation grids of the run's LoRA snapshots (every validation_interval steps)
and of its final LoRA; grids of unchanged files are kept."""

from pathlib import Path
from typing import TYPE_CHECKING

from common import code_digest, precision, start

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake

claim = start(snakemake, gpus=snakemake.resources.gpu)

from safetensors import safe_open  # noqa: E402

from sdxl.train.snapshots import list_snapshots  # noqa: E402
from sdxl.train.validation import validate_run  # noqa: E402

hp = snakemake.params.validation
final = Path(snakemake.input.lora)
with safe_open(str(final), "pt") as f:
    final_step = int(f.metadata()["ss_steps"])
every = hp["validation_interval"]
files = {step: path for step, path in list_snapshots(final.parent, snakemake.params.run).items()
         if every and step % every == 0 and step <= final_step}  # fmt: skip
files.setdefault(final_step, final)  # the snapshot of the last step is the same LoRA
validate_run(files, Path(snakemake.input.model), hp["validation_prompts"][: hp["num_validation_images"]],
             hp["image_size"], hp["validation_guidance_scale"], hp["validation_steps"], hp["seed"],
             Path(snakemake.output.index).parent, claim.torch_device,
             precision(claim, snakemake.config["train"]["precision"]), code_digest(snakemake),
             snakemake.params.run)  # fmt: skip
