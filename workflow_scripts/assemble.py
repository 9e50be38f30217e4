"""assemble: link every shard's images into one folder and write the COCO dataset files."""

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

from common import generation_config, start

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake

start(snakemake)

from sdxl.generate.run import finalize_dataset  # noqa: E402
from sdxl.prepare import link_file  # noqa: E402

out = Path(snakemake.output.captions).parent
for old in (p for p in out.glob("*") if re.fullmatch(r"\d+\.(png|txt|json)", p.name)):
    old.unlink()  # images of an earlier, different run
for marker in snakemake.input.shards:
    folder = Path(json.loads(Path(marker).read_text())["folder"])
    for path in (p for p in folder.iterdir() if re.fullmatch(r"\d+\.(png|txt|json)", p.name)):
        link_file(path, out / path.name)
cfg = generation_config(snakemake.params.generate, snakemake.input, out)
finalize_dataset(cfg, list(range(len(cfg.prompts))), out)
