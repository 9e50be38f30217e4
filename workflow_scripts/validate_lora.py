"""validate_lora: sample grids of the base model (step 0), the run's LoRA snapshots (every
validation_interval steps) and its final LoRA; grids of unchanged files are kept."""

from pathlib import Path
from typing import TYPE_CHECKING

from common import code_digest, finish, precision, start

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake

claim = start(snakemake, gpus=snakemake.resources.gpu)

from safetensors import safe_open  # noqa: E402

from sdxl.train.config import TrainConfig  # noqa: E402
from sdxl.train.snapshots import grid_files, list_snapshots  # noqa: E402
from sdxl.train.validation import validate_run  # noqa: E402
from sdxl.workflow_config import sample_prompt_lines  # noqa: E402

hp = dict(snakemake.params.validation)
hp["validation_prompts"] = sample_prompt_lines(hp)  # kohya's prompt file, if one is given
cfg = TrainConfig.from_dict({**hp, "data_dir": ""})  # the prompts with the run's defaults
final = Path(snakemake.input.lora)
with safe_open(str(final), "pt") as f:
    meta = f.metadata()
files = grid_files(list_snapshots(final.parent, snakemake.params.run), final, meta,
                   cfg.sample_interval, cfg.sample_every_n_epochs)  # fmt: skip
out = Path(snakemake.output.index).parent
index = validate_run(files, Path(snakemake.input.model), cfg.samples, out, claim.torch_device,
                     precision(claim, snakemake.config["train"]["precision"]),
                     code_digest(snakemake), snakemake.params.run)  # fmt: skip
finish(snakemake, f"{len(index['grids'])} validation grid(s) of run {snakemake.params.run}")
