"""A deterministic tiny SDXL in diffusers layout, for tests and the demo pipeline.

Same architecture as SDXL base (dual CLIP, text_time conditioning, 3-level UNet, 4-level VAE),
with small widths (`sdxl.models.configs.TINY`) and seeded random weights, written exactly as
`StableDiffusionXLPipeline.save_pretrained` would so that diffusers loads the folder too.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from sdxl.models.configs import (
    MODEL_INDEX,
    SCHEDULER,
    TINY,
    TINY_VOCAB_SIZE,
    CLIPTextConfig,
    UNetConfig,
    VAEConfig,
)
from sdxl.utils import atomic_path, atomic_write_text

START, END = "<|startoftext|>", "<|endoftext|>"

# Words the tiny BPE vocabulary is learned from: enough English for demo captions and prompts.
_CORPUS = """
a an the of on in with and at to by for from over under near its is are this that photo picture
image painting drawing sketch render illustration close up view background foreground white
black red green blue yellow orange purple pink brown gray grey cyan magenta gold silver dark light
bright pale small large big tiny huge round square circle triangle star heart diamond hexagon
ring cross line stripe dot dots shape shapes pattern gradient plain simple colorful striped
sky sea beach city street house tree forest mountain river lake flower garden dog cat bird horse
car boat train bridge road portrait person man woman child face eyes hair smiling standing
sitting walking running night day sunset sunrise morning evening winter summer spring autumn
snow rain cloud clouds sun moon stars water fire stone wood glass metal paper cloth sand grass
south north east west san francisco high quality detailed sharp blurry style art digital oil
watercolor pencil cartoon anime realistic cinematic lighting soft hard shadow shadows centered
beautiful landscape architecture building kitchen bedroom window table chair bottle vegetable
fruit apple banana orange strawberry elephant giraffe zebra butterfly rainbow waterfall desert
volcano castle lighthouse harbor airplane bicycle motorcycle umbrella
"""


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable unicode map (the base of byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def _learn_merges(words: list[str], num_merges: int) -> list[tuple[str, str]]:
    """Plain BPE on `words` (each ending in </w> as CLIP does), most frequent pair first."""
    byte_map = _bytes_to_unicode()
    seqs = Counter(
        tuple([byte_map[b] for b in w.encode()][:-1] + [byte_map[w.encode()[-1]] + "</w>"])
        for w in words
    )
    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges:
        pairs: Counter = Counter()
        for seq, n in seqs.items():
            for pair in zip(seq, seq[1:], strict=False):
                pairs[pair] += n
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))  # deterministic tie-break
        merges.append(best)
        seqs = Counter({_merge(seq, best): n for seq, n in seqs.items()})
    return merges


def _merge(seq: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(seq):
        if i + 1 < len(seq) and (seq[i], seq[i + 1]) == pair:
            out.append(seq[i] + seq[i + 1])
            i += 2
        else:
            out.append(seq[i])
            i += 1
    return tuple(out)


def write_tokenizer(folder: str | Path, pad_token: str = END) -> None:
    """Write a CLIPTokenizer folder with a byte-level BPE vocabulary of TINY_VOCAB_SIZE tokens.

    SDXL's tokenizer pads with <|endoftext|>, tokenizer_2 with "!"; pass `pad_token` to match.
    """
    folder = Path(folder)
    byte_chars = list(_bytes_to_unicode().values())
    base = byte_chars + [c + "</w>" for c in byte_chars]
    words = re.findall(r"[a-z]+", _CORPUS)
    # Repeat the corpus with weights so merges favour whole common words deterministically.
    merges = _learn_merges(words * 3 + ["".join(sorted(set(_CORPUS)))], TINY_VOCAB_SIZE)
    merges = merges[: TINY_VOCAB_SIZE - len(base) - 2]
    tokens = base + ["".join(m) for m in merges] + [START, END]
    tokens = list(dict.fromkeys(tokens))
    if len(tokens) != TINY_VOCAB_SIZE:
        raise RuntimeError(f"tiny vocabulary has {len(tokens)} tokens, expected {TINY_VOCAB_SIZE}")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    atomic_write_text(folder / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    atomic_write_text(folder / "merges.txt", "\n".join(lines) + "\n")
    config = {
        "add_prefix_space": False,
        "bos_token": START,
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "eos_token": END,
        "errors": "replace",
        "model_max_length": 77,
        "pad_token": pad_token,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": END,
    }
    atomic_write_text(folder / "tokenizer_config.json", json.dumps(config, indent=2))
    special = {"bos_token": START, "eos_token": END, "pad_token": pad_token, "unk_token": END}
    atomic_write_text(folder / "special_tokens_map.json", json.dumps(special, indent=2))


COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def _build(name: str, config: dict) -> torch.nn.Module:
    from sdxl.models.clip import CLIPTextModel
    from sdxl.models.unet import UNet2DConditionModel
    from sdxl.models.vae import AutoencoderKL

    if name == "unet":
        return UNet2DConditionModel(UNetConfig.from_dict(config))
    if name == "vae":
        return AutoencoderKL(VAEConfig.from_dict(config))
    return CLIPTextModel(CLIPTextConfig.from_dict(config))


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _save_component(folder: Path, name: str, config: dict, module: torch.nn.Module) -> None:
    if name in ("unet", "vae"):
        config = {**config, "_diffusers_version": "0.42.1"}
        weights = "diffusion_pytorch_model.safetensors"
    else:
        config = {**config, "transformers_version": "5.24.0"}
        weights = "model.safetensors"
    atomic_write_text(folder / name / "config.json", json.dumps(config, indent=2))
    state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    with atomic_path(folder / name / weights) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})


def write_random_sdxl(
    folder: str | Path,
    configs: dict = TINY,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Path:
    """Write an SDXL of `configs` with seeded random weights in diffusers layout.

    One network at a time (full size fits in memory), initialised in `dtype` on `device`;
    tokenizers are the tiny byte-level BPE, so text encoder vocab sizes must be TINY_VOCAB_SIZE.
    """
    folder = Path(folder)
    for k, name in enumerate(COMPONENTS):
        with torch.random.fork_rng(devices=[]), _default_dtype(dtype), torch.device(device):
            torch.manual_seed(seed + k)
            module = _build(name, configs[name])
        _save_component(folder, name, configs[name], module)
        del module
    write_tokenizer(folder / "tokenizer", pad_token=END)
    write_tokenizer(folder / "tokenizer_2", pad_token="!")
    scheduler = dict(SCHEDULER, _diffusers_version="0.42.1")
    atomic_write_text(
        folder / "scheduler" / "scheduler_config.json", json.dumps(scheduler, indent=2)
    )
    index = dict(MODEL_INDEX, _diffusers_version="0.42.1")
    atomic_write_text(folder / "model_index.json", json.dumps(index, indent=2))  # last: marks done
    return folder


def write_tiny_sdxl(folder: str | Path, seed: int = 0) -> Path:
    """Write the complete tiny SDXL (weights, configs, tokenizers, scheduler) into `folder`."""
    return write_random_sdxl(folder, TINY, seed)


def default_tiny_dir() -> Path:
    """Where `builtin:tiny` lives: $SDXL_TINY_DIR, else the user cache."""
    import os

    root = os.environ.get("SDXL_TINY_DIR")
    if root:
        return Path(root)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "sdxl-pipeline" / "tiny-v1"


def ensure_tiny_sdxl(folder: str | Path | None = None) -> Path:
    """Return the tiny SDXL folder, writing it first if it is missing or incomplete."""
    folder = Path(folder) if folder is not None else default_tiny_dir()
    if not (folder / "model_index.json").exists():
        write_tiny_sdxl(folder)
    return folder
