"""The tiny SDXL's CLIP tokenizer: a byte-level BPE vocabulary learned from a small English
corpus, written as a CLIPTokenizer folder (also the tokenizer of `builtin:tiny-clip`).

Apart from sdxl/tiny.py (the tiny networks) so that what needs only a tokenizer does not load
the model code.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from sdxl.models.configs import TINY_VOCAB_SIZE
from sdxl.utils import atomic_write_text

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
