"""validate_captions: decode every image, read every caption; write the manifest and problems."""

from typing import TYPE_CHECKING

from common import finish, start

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake

start(snakemake)

from sdxl.data.dataset import write_manifest, write_problems  # noqa: E402
from sdxl.dataset_config import subsets_from_list, validate_data  # noqa: E402
from sdxl.text import load_tokenizers  # noqa: E402

hp = snakemake.params.data
tokenizer = load_tokenizers(snakemake.input.model)[0] if hp["check_caption_length"] else None
options = {"min_size": hp["min_size"], "policy": hp["policy"], "tokenizer": tokenizer,
           "progress": True}  # fmt: skip
result = validate_data(hp["dir"], subsets_from_list(hp["subsets"]), **options)
write_problems(result, snakemake.output.problems, snakemake.output.html)
write_manifest(result, snakemake.output.manifest)
finish(snakemake, f"{len(result.items)} items kept, {len(result.errors)} files dropped")
