"""How long the workflow's assemble step takes at dataset scale (default: a million images).

Fakes the generate jobs' output (shard folders of tiny numbered files, their .txt captions and
shard-K.json markers, a tiny model folder and LoRA file for the image identities), then times
`assemble_dataset` twice: the first assembly (every file linked) and a rerun after one more shard
was added (only the new files are linked; the others are checked with one stat each).

    uv run python benchmarks/bench_assemble.py --num-images 1000000 --work /tmp/assemble
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from PIL import Image

from sdxl.generate.assemble import assemble_dataset
from sdxl.generate.prompts import index_width
from sdxl.generate.run import GenerateConfig
from sdxl.generate.shard_marker import write_shard_marker
from sdxl.tiny import write_tiny_sdxl


def fake_shard(root: Path, k: int, indices: range, cfg_of, data: bytes) -> Path:
    """Shard k's folder of tiny files named as generate names them, and its marker."""
    folder = root / "generate" / f"shard-{k}"
    folder.mkdir(parents=True)
    cfg = cfg_of(folder, indices.stop)
    for i in indices:
        (folder / f"{cfg.file_stem(i)}.png").write_bytes(data)
        (folder / f"{cfg.file_stem(i)}.txt").write_text(cfg.prompts[i])
    marker = root / "generate" / f"shard-{k}.json"
    write_shard_marker(marker, cfg, indices, made=len(indices), seconds=1.0, device="cpu",
                       peak_mem_gb=None)  # fmt: skip
    return marker


def config(model: Path, lora: Path, out: Path, count: int, num_images: int) -> GenerateConfig:
    prompts = tuple(f"prompt {i % 1000}" for i in range(count))
    return GenerateConfig(pretrained_model=str(model), output_dir=str(out), prompts=prompts,
                          loras=((str(lora), 1.0),), index_width=index_width(num_images),
                          code_version="bench")  # fmt: skip


def fake_model(root: Path) -> tuple[Path, Path]:
    """The tiny SDXL folder and a file as the LoRA: assemble only fingerprints them."""
    lora = root / "lora.safetensors"
    lora.write_bytes(b"not a real LoRA: only hashed")
    return write_tiny_sdxl(root / "model"), lora


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=1_000_000)
    parser.add_argument("--images-per-shard", type=int, default=10_000)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp)")
    args = parser.parse_args()
    root = Path(args.work or tempfile.mkdtemp(prefix="bench-assemble-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        model, lora = fake_model(root)
        n, per = args.num_images, args.images_per_shard
        png = root / "tiny.png"
        Image.new("RGB", (8, 8), "gray").save(png)

        def cfg_of(out: Path, count: int) -> GenerateConfig:
            return config(model, lora, out, count, n)

        shards = [range(s, min(s + per, n)) for s in range(0, n, per)]
        began = time.perf_counter()
        markers = [
            fake_shard(root, k, r, cfg_of, png.read_bytes()) for k, r in enumerate(shards[:-1])
        ]
        print(f"made {shards[-1].start:,} fake images in {time.perf_counter() - began:.1f} s")
        for label, count in (("first assembly", shards[-1].start), ("rerun, one shard more", n)):
            if count == n:
                markers.append(
                    fake_shard(root, len(shards) - 1, shards[-1], cfg_of, png.read_bytes())
                )
            began = time.perf_counter()
            assemble_dataset(cfg_of(root / "dataset", count), markers, root / "dataset")
            seconds = time.perf_counter() - began
            print(f"{label}: {count:,} images in {seconds:.1f} s ({count / seconds:,.0f} images/s)")
    finally:
        if args.work is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
