"""An offline CLIP BPE tokenizer built from the vocabulary file that open_clip ships in its wheel.

Why: the tiny and toy models must tokenize exactly like Stable Diffusion's CLIP tokenizer (same 49,408 ids), but
hub downloads are impossible at run time. open_clip bundles OpenAI's BPE merges (bpe_simple_vocab_16e6.txt.gz); we
write the vocab.json / merges.txt pair that transformers' CLIPTokenizer expects and load it with from_pretrained.
(Passing vocab_file/merges_file to the CLIPTokenizer constructor in transformers 5 silently yields wrong ids, so we
always go through from_pretrained on a directory, and tests compare ids with open_clip's own tokenizer.)
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49152 - 256 - 2


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible byte -> printable unicode map (the standard construction)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def bpe_vocab_path() -> Path:
    """Locate open_clip's bundled BPE file without importing open_clip (which imports torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("open_clip_torch is not installed; it ships the CLIP BPE vocabulary: "
                           "pip install open_clip_torch")
    path = Path(next(iter(spec.submodule_search_locations))) / BPE_FILE
    if not path.exists():
        raise RuntimeError(f"open_clip is installed but {path} is missing")
    return path


def _cache_dir() -> Path:
    root = os.environ.get("BENCH_HOME") or Path.home() / ".cache" / "unlearn-bench"
    return Path(root) / "clip-tokenizer-v1"


def write_tokenizer_files(out_dir: Path) -> Path:
    """Write vocab.json, merges.txt and tokenizer_config.json for transformers' CLIPTokenizer (atomic per file)."""
    with gzip.open(bpe_vocab_path(), "rt", encoding="utf-8") as fh:
        merges = fh.read().split("\n")[1 : N_MERGES + 1]
    pairs = [tuple(m.split()) for m in merges]
    base = list(_bytes_to_unicode().values())
    vocab_list = base + [v + "</w>" for v in base] + ["".join(p) for p in pairs]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    files: dict[str, str] = {
        "vocab.json": json.dumps({tok: i for i, tok in enumerate(vocab_list)}, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "\n".join(" ".join(p) for p in pairs) + "\n",
        "tokenizer_config.json": json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "model_max_length": 77,
                "do_lower_case": True,
            }
        ),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        tmp = out_dir / f".{name}.{os.getpid()}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out_dir / name)
    return out_dir


@lru_cache(maxsize=8)
def _load(model_max_length: int) -> Any:
    from transformers import CLIPTokenizer

    d = _cache_dir()
    if not (d / "tokenizer_config.json").exists():
        write_tokenizer_files(d)
    return CLIPTokenizer.from_pretrained(str(d), model_max_length=model_max_length)


def load_clip_tokenizer(model_max_length: int = 77) -> Any:
    """Return a transformers CLIPTokenizer with SD's vocabulary, built offline (cached on disk)."""
    return _load(int(model_max_length))
