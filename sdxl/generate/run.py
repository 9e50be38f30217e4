"""Generate a numbered image dataset with one worker per device, resuming where a run stopped.

Image i always gets prompt i and noise seed + i, so the dataset is the same whatever the batch
size, the number of workers, or how often the job was killed and rerun. Each image is written
by a background writer thread while the next batch is generated (PNG last, atomically), with its
parameters in a PNG text chunk; all writes finish before the dataset files are written. A rerun
keeps an image only if those parameters (prompt, seeds, size, sampler, steps, guidance,
precision, model and LoRA identities) are the ones asked for and regenerates the others, so a
folder reused with other settings ends up equal to a fresh one. One process writes a folder at a
time (a lock in it), and worker processes die with the process that started them.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from sdxl.errors import EXPECTED, UserError, one_line
from sdxl.generate.prompts import index_width
from sdxl.generate.writers import (
    BackgroundWriter,
    is_done,
    remove_foreign_items,
    sync_sidecars,
    write_item,
)
from sdxl.procs import die_with_parent, folder_lock
from sdxl.progress import Progress
from sdxl.utils import remove_stale_temps

log = logging.getLogger(__name__)

WRITE_THREADS = 2  # PNG encoders running beside generation (0: write in the generating thread)


@dataclass(frozen=True)
class GenerateConfig:
    """Everything that determines the generated images."""

    pretrained_model: str
    output_dir: str
    prompts: tuple[str, ...]
    # Where each prompt came from (a COCO captions file: coco_image_id, coco_file_name, coco_url
    # of its image), recorded in the image's metadata and captions.json; empty for text prompts.
    prompt_sources: tuple[dict, ...] = ()
    # Which captions of a COCO prompt file the prompts are (first, all or random; see
    # sdxl/generate/coco_prompts.py): the images record the prompts and sources, not this.
    coco_captions: str = "first"
    negative_prompt: str = ""
    width: int = 1024
    height: int = 1024
    num_inference_steps: int = 30
    guidance_scale: float = 7.5
    sampler: str = "euler"
    seed: int = 0
    batch_size: int = 1
    precision: str = "bf16"
    device: str = "auto"
    save_metadata: bool = False
    output_format: str = "coco"
    webdataset_shard_size: int = 1000  # images per tar (output_format webdataset); not in them
    loras: tuple[tuple[str, float], ...] = ()
    merge_loras: bool = True
    # Speed only, not in the images' metadata (kernel choices, like batch size; see FastPath):
    compile: bool | None = None  # torch.compile + CUDA graphs; None: on for CUDA, off on CPU
    channels_last: bool = False  # NHWC UNet/VAE weights
    fused_qkv: bool = False  # one GEMM for each attention's q/k/v
    # File name zero-padding (0: from the prompt count). The workflow fixes it for the whole
    # dataset, as each job sees only the prompts up to its own last image.
    index_width: int = 0
    # The generating code's version (the workflow's digest of it), recorded in every image: a
    # kept image must be one today's code would make. Empty: not recorded (the CLI).
    code_version: str = ""

    def __post_init__(self):
        from sdxl.generate.coco_prompts import check_coco_mode
        from sdxl.pipeline import check_image_size
        from sdxl.sampling.samplers import check_sampler

        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.num_inference_steps < 1:
            raise ValueError(
                f"--num-inference-steps must be at least 1, got {self.num_inference_steps}"
            )
        if self.output_format not in ("coco", "simple", "webdataset"):
            raise ValueError(
                f"--output-format must be coco, simple or webdataset, got {self.output_format!r}"
            )
        if self.webdataset_shard_size < 1:
            raise ValueError(f"--shard-size must be at least 1, got {self.webdataset_shard_size}")
        empty = [i for i, p in enumerate(self.prompts) if not p.strip()]
        if empty:
            raise ValueError(f"prompts {empty[:10]} are empty; remove them or write a prompt")
        assert not self.prompt_sources or len(self.prompt_sources) == len(self.prompts)
        check_coco_mode(self.coco_captions)
        check_sampler(self.sampler)
        check_image_size(self.width, self.height)
        for path, _ in self.loras:
            if not Path(path).is_file():
                raise FileNotFoundError(f"--lora-checkpoint {path}: file not found")

    @functools.cached_property
    def identity(self) -> dict:
        """What identifies the weights: the model's fingerprint and each LoRA file's sha256.

        Computed once per config (LoRA files are hashed, the model's files only stat'ed, see
        `sdxl.weights.model_identity`): a path alone misses a file replaced in place.
        """
        from sdxl.generate.infotext import lora_short_hash, model_short_hash
        from sdxl.utils import sha256_file
        from sdxl.weights import model_identity

        out: dict = {
            "model_id": model_identity(self.pretrained_model),
            "model_hash": model_short_hash(self.pretrained_model),  # A1111's (infotext.py)
        }
        if self.loras:
            out["loras"] = [
                {
                    "file": Path(p).name,
                    "scale": s,
                    "sha256": sha256_file(Path(p)),
                    "a1111_hash": lora_short_hash(p),
                }
                for p, s in self.loras
            ]
            out["lora_merged"] = self.merge_loras  # merged weights round differently
        return out

    @property
    def caption_files(self) -> bool:
        """Whether NNNNN.txt captions go beside the images (the COCO layout, not 'simple')."""
        return self.output_format in ("coco", "webdataset")

    @property
    def json_files(self) -> bool:
        """Whether NNNNN.json per-image metadata goes beside the images."""
        return self.save_metadata and self.output_format in ("coco", "webdataset")

    @property
    def stem_width(self) -> int:
        return self.index_width or index_width(len(self.prompts))

    def file_stem(self, index: int) -> str:
        return f"{index:0{self.stem_width}d}"


def resolve_devices(device: str, num_workers: int | None) -> list[str]:
    """One device string per worker. CPU workers are processes on the same CPU (for tests)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return ["cpu"] * (num_workers or 1)
    available = torch.cuda.device_count()
    if available == 0:
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    n = num_workers or available
    if n > available:
        raise ValueError(f"--num-gpus {n} asked for, but only {available} GPU(s) are visible")
    return [f"cuda:{i}" for i in range(n)]


def image_meta(cfg: GenerateConfig, index: int) -> dict:
    """Per-image metadata: enough to regenerate exactly this image, and to know it is the same."""
    return {
        "index": index,
        "file_name": f"{cfg.file_stem(index)}.png",
        "prompt": cfg.prompts[index],
        **(cfg.prompt_sources[index] if cfg.prompt_sources else {}),  # COCO: the source image
        "negative_prompt": cfg.negative_prompt,
        "seed": cfg.seed + index,
        "base_seed": cfg.seed,
        "sampler": cfg.sampler,
        "steps": cfg.num_inference_steps,
        "cfg_scale": cfg.guidance_scale,
        "size": f"{cfg.width}x{cfg.height}",
        "width": cfg.width,
        "height": cfg.height,
        "model": cfg.pretrained_model,
        "lora": ", ".join(f"{Path(p).name}:{s:g}" for p, s in cfg.loras),
        "precision": cfg.precision,
        **cfg.identity,
        # Fused q/k/v GEMMs round differently (a pixel may move by 1/255): recorded, so a rerun
        # never mixes images of both kinds. Compile and CUDA graphs leave fp32 pixels as they are.
        **({"fused_qkv": True} if cfg.fused_qkv else {}),
        **({"code": cfg.code_version} if cfg.code_version else {}),
    }


def pending_indices(cfg: GenerateConfig, indices: list[int]) -> list[int]:
    """The indices whose PNG is missing, cut short, or was made with other parameters.

    The folder is listed once, so a missing image costs a set lookup, not a file open and its
    metadata: planning a fresh dataset of a million images takes seconds.
    """
    out = Path(cfg.output_dir)
    present = {entry.name for entry in os.scandir(out)} if out.is_dir() else set()

    def done(i: int) -> bool:
        name = f"{cfg.file_stem(i)}.png"
        return name in present and is_done(out / name, image_meta(cfg, i))

    return [i for i in indices if not done(i)]


def _prepare(cfg: GenerateConfig, indices: list[int]) -> list[int]:
    """The indices still to make; the finished ones get their .txt/.json brought up to date.

    A folder first written with --save-metadata or in the simple format keeps its images, and
    its sidecar files become what a fresh run with today's flags writes.
    """
    todo = pending_indices(cfg, indices)
    pending, out = set(todo), Path(cfg.output_dir)
    for i in (i for i in indices if i not in pending):
        sync_sidecars(out, cfg.file_stem(i), image_meta(cfg, i), cfg.caption_files, cfg.json_files)
    return todo


def load_generation_pipeline(cfg: GenerateConfig, device: str):
    """The pipeline on `device` (fp32 on CPU) with the LoRAs applied, merged for speed, and the
    fast path (compile, CUDA graphs) that `cfg.compile` asks for."""
    from sdxl.lora_formats import load_lora_file
    from sdxl.pipeline import FastPath, load_pipeline
    from sdxl.text_lora import apply_component_loras

    dtype = "fp32" if device == "cpu" else cfg.precision
    pipe = load_pipeline(cfg.pretrained_model, device=device, dtype=dtype)
    if cfg.fused_qkv:
        pipe.unet.fuse_qkv()  # before the LoRAs: merging writes into the fused weight
    if cfg.loras:  # UNet and text-encoder parts (kohya lora_te1_/lora_te2_)
        states = [(load_lora_file(path, pipe.unet, text_encoders=True)[0], scale)
                  for path, scale in cfg.loras]  # fmt: skip
        networks = dict(zip(("unet", "text_encoder", "text_encoder_2"),
                            (pipe.unet, *pipe.text_encoders), strict=True))  # fmt: skip
        apply_component_loras(networks, states, merge=cfg.merge_loras)
    # After the LoRAs: compiled kernels and CUDA graphs read the merged weights in place.
    pipe.use_fast_path(FastPath.default(device, cfg.compile, cfg.channels_last))
    return pipe


@contextlib.contextmanager
def dataset_lock(cfg: GenerateConfig) -> Iterator[Path]:
    """Hold the output folder's lock for the block, after clearing temp files of killed runs."""
    out = Path(cfg.output_dir)
    with folder_lock(out, "this dataset"):
        removed = remove_stale_temps(out)
        if removed:
            log.info("removed %d temp file(s) a killed run left in %s", len(removed), out)
        yield out


def generate_indices(cfg: GenerateConfig, indices: list[int], device: str = "cpu",
                     pipe=None, position: int = 0) -> int:  # fmt: skip
    """Make the images at `indices` that are not done yet on one device; return how many.

    The entry point of one job (a workflow shard, whose folder holds exactly `indices`): it
    holds the folder's lock throughout, so a rerun never writes beside a survivor of a killed
    run. Finished images are left as they are (same file, same mtime).
    """
    with dataset_lock(cfg):
        return generate_on(cfg, indices, [device], pipe, position)


def generate_on(cfg: GenerateConfig, indices: list[int], devices: list[str], pipe=None,
                position: int = 0) -> int:  # fmt: skip
    """Under the lock: bring `indices` up to date, then drop the numbered files of no image."""
    todo = _prepare(cfg, indices)
    if len(devices) > 1 and todo:
        run_workers(cfg, todo, devices)
    else:
        _make_images(cfg, todo, devices[0], pipe, position)
    removed = remove_foreign_items(Path(cfg.output_dir), set(indices), cfg.stem_width)
    if removed:
        log.info("removed %d file(s) of images beyond this dataset", len(removed))
    return len(todo)


def _make_images(cfg: GenerateConfig, todo: list[int], device: str, pipe=None,
                 position: int = 0) -> None:  # fmt: skip
    """Generate and write exactly the images at `todo` (the caller did the resume check)."""
    from sdxl.pipeline import SampleSettings

    if not todo:
        return
    pipe = pipe or load_generation_pipeline(cfg, device)
    out = Path(cfg.output_dir)
    # fp32 (always on CPU): bit-identical images for any batch size; bf16/fp16 on GPU: batched.
    exact = pipe.dtype == torch.float32
    # One batch is encoded and written while the next one is generated.
    writer = BackgroundWriter(WRITE_THREADS, max_pending=2 * cfg.batch_size)
    bar = Progress(len(todo), f"images[{device}]", "image", position=position)
    settings = SampleSettings(negative_prompt=cfg.negative_prompt, width=cfg.width,
                              height=cfg.height, num_inference_steps=cfg.num_inference_steps,
                              guidance_scale=cfg.guidance_scale, sampler=cfg.sampler,
                              seed=cfg.seed)  # fmt: skip
    with writer, bar:
        for start in range(0, len(todo), cfg.batch_size):
            batch = todo[start : start + cfg.batch_size]
            images = pipe.generate([cfg.prompts[i] for i in batch], settings, indices=batch,
                                   batch_invariant=exact)  # fmt: skip
            for i, image in zip(batch, images, strict=True):
                writer.submit(write_item, out, cfg.file_stem(i), image, image_meta(cfg, i),
                              cfg.json_files, caption=cfg.caption_files)  # fmt: skip
            bar.update(len(batch))


class WorkerFailed(UserError):
    """A worker stopped on an expected error (a bad LoRA file, an unwritable image, ...)."""


def _worker(cfg: GenerateConfig, indices: list[int], device: str, rank: int, threads: int,
            parent: int, errors) -> None:  # fmt: skip
    """Entry point of one worker process; reports its failure to the parent.

    It dies with the parent, so a killed command leaves no worker writing on. A CPU worker uses
    the parent's thread count: the matmul blocking, and with it the last bit of some pixels,
    depends on the thread count, and a dataset must not depend on the number of workers.
    """
    die_with_parent(parent)
    try:
        if device == "cpu":
            torch.set_num_threads(threads)
        _make_images(cfg, indices, device, position=rank)
    except BaseException as err:
        message = one_line(err) if isinstance(err, EXPECTED) else None
        errors.put((rank, message, traceback.format_exc()))
        raise SystemExit(1) from None


def run_workers(cfg: GenerateConfig, indices: list[int], devices: list[str]) -> None:
    """One process per device over a strided share of `indices`; the first failure stops all."""
    import multiprocessing as mp
    import queue

    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    common = (torch.get_num_threads(), os.getpid(), errors)
    procs = [
        ctx.Process(target=_worker, args=(cfg, indices[w :: len(devices)], dev, w, *common))
        for w, dev in enumerate(devices)
    ]
    for p in procs:
        p.start()
    failed = None
    while any(p.is_alive() for p in procs) and failed is None:
        for p in procs:
            p.join(timeout=0.2)
            if p.exitcode not in (None, 0):
                failed = p
                break
    for p in procs:
        if p.is_alive():
            p.terminate()
        p.join()
    bad = [(w, p.exitcode) for w, p in enumerate(procs) if p.exitcode != 0]
    if failed is not None or bad:
        try:
            rank, message, tb = errors.get(timeout=1.0)
        except queue.Empty:
            rank, message, tb = bad[0][0], None, f"exit code {bad[0][1]} (killed?)"
        head = f"generation worker {rank} ({devices[rank]}) failed"
        if message is not None:  # one line for the user; the worker's traceback goes to the log
            raise WorkerFailed(f"{head}: {message}\n{tb}")
        raise RuntimeError(f"{head}:\n{tb}")
