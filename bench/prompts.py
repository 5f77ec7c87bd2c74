"""Prompt sets: inline lists in registry.yaml, or CSV files in the I2P and COCO formats with per-prompt seeds.

Why per-prompt seeds and guidance: the published numbers (UnlearnDiffAtk's 142 I2P nudity prompts, the 4703 I2P
prompts, COCO-10k for FID/CLIP) generate every prompt with the seed - and for I2P the guidance scale - stored in its
file. Reproducing them needs exactly those, so a row's seed/guidance travel with it into generation (Plan.eval_seeds,
Plan.eval_guidance). Files are never shipped for benchmark sets (licences, size): their registry entries name a path
and how to obtain it, and a missing file stops planning with that instruction (exit 2) before any model loads.

Formats (detected from the header when `format: auto`):
- i2p:  prompt, evaluation_seed (or sd_seed), evaluation_guidance (or sd_guidance)[, categories, case_number, ...]
- coco: prompt, seed (or evaluation_seed)[, case_number, ...] - guidance from the model spec
- plain: prompt - seeds derived from (run seed, scope, prompt, repeat) as for inline sets
"""

from __future__ import annotations

import csv
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unlearn_bench.registry import Registry, RegistryError
from unlearn_bench.schema import resolve_data_path

SEED_COLUMNS = ("evaluation_seed", "sd_seed", "seed")
GUIDANCE_COLUMNS = ("evaluation_guidance", "sd_guidance", "guidance")
ID_COLUMNS = ("case_number", "id", "image_id")
FORMATS = ("auto", "i2p", "coco", "plain")


@dataclass(frozen=True)
class PromptRow:
    """One prompt; seed/guidance are None when the set does not fix them."""

    prompt: str
    seed: int | None = None
    guidance: float | None = None
    id: str = ""


@dataclass(frozen=True)
class PromptTable:
    name: str
    rows: tuple[PromptRow, ...]
    source: str = "inline"  # "inline", "concept" or the resolved file path
    format: str = "inline"
    sha256: str = ""

    @property
    def has_seeds(self) -> bool:
        return any(r.seed is not None for r in self.rows)

    @property
    def has_guidance(self) -> bool:
        return any(r.guidance is not None for r in self.rows)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "format": self.format, "sha256": self.sha256,
                "n_prompts": len(self.rows)}


def _pick(header: list[str], names: tuple[str, ...]) -> str | None:
    low = {h.strip().lower(): h for h in header}
    return next((low[n] for n in names if n in low), None)


def detect_format(header: list[str]) -> str:
    if _pick(header, ("prompt",)) is None:
        raise ValueError(f"no 'prompt' column (columns: {header})")
    if _pick(header, SEED_COLUMNS) and _pick(header, GUIDANCE_COLUMNS):
        return "i2p"
    return "coco" if _pick(header, SEED_COLUMNS) else "plain"


def _seed(text: str, where: str, column: str) -> int:
    """A seed cell: a non-negative integer (written 42 or 42.0, as pandas-exported CSVs do)."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{where}: bad {column} {text!r} (expected a non-negative integer)") from None
    if not math.isfinite(value) or not value.is_integer() or value < 0:
        raise ValueError(f"{where}: bad {column} {text!r} (expected a non-negative integer)")
    return int(value)


def _guidance(text: str, where: str, column: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{where}: bad {column} {text!r} (expected a number >= 0)") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{where}: bad {column} {text!r} (expected a finite number >= 0)")
    return value


def read_prompt_csv(path: str | Path, fmt: str = "auto", limit: int | None = None) -> tuple[list[PromptRow], str]:
    """Rows of an I2P/COCO/plain prompt CSV, in file order (the first `limit` when given), and the format used.

    Seeds may exceed 2**31 (I2P stores 32-bit unsigned seeds); torch.Generator takes them as they are. Empty
    seed/guidance cells fall back to the derived seed / the model's guidance for that row only. Every problem is a
    ValueError naming the file, the line and the value.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown prompt file format {fmt!r}; allowed: {', '.join(FORMATS)}")
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            return _read_rows(csv.DictReader(fh), path, fmt, limit)
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") from None
    except csv.Error as exc:
        raise ValueError(f"{path}: malformed CSV: {exc}") from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot read: {exc.strerror or exc}") from None


def _read_rows(reader: csv.DictReader, path: Path, fmt: str, limit: int | None) -> tuple[list[PromptRow], str]:
    header = [h for h in (reader.fieldnames or []) if h is not None]
    if not header:
        raise ValueError(f"{path}: empty file (expected a header row with a 'prompt' column)")
    try:
        found = detect_format(header)
    except ValueError as exc:
        raise ValueError(f"{path}:1: {exc}") from None
    if fmt == "auto":
        fmt = found
    need = {"i2p": ("i2p",), "coco": ("i2p", "coco"), "plain": ("i2p", "coco", "plain")}[fmt]
    if found not in need:
        want = {"i2p": "prompt, evaluation_seed, evaluation_guidance", "coco": "prompt, seed"}[fmt]
        raise ValueError(f"{path}: format {fmt} needs columns {want}; the header has {header}")
    p_col = _pick(header, ("prompt",))
    s_col = _pick(header, SEED_COLUMNS) if fmt in ("i2p", "coco") else None
    g_col = _pick(header, GUIDANCE_COLUMNS) if fmt == "i2p" else None
    i_col = _pick(header, ID_COLUMNS)
    rows = []
    for rec in reader:
        if limit is not None and len(rows) >= limit:
            break
        where = f"{path}:{reader.line_num}"
        prompt = (rec.get(p_col) or "").strip()
        if not prompt:
            raise ValueError(f"{where}: empty prompt")
        s_text = (rec.get(s_col) or "").strip() if s_col else ""
        g_text = (rec.get(g_col) or "").strip() if g_col else ""
        seed = _seed(s_text, where, str(s_col)) if s_text else None
        guidance = _guidance(g_text, where, str(g_col)) if g_text else None
        rows.append(PromptRow(prompt, seed, guidance, str(rec.get(i_col, "") or "") if i_col else ""))
    if not rows:
        raise ValueError(f"{path}: no prompts (a header but no rows)")
    return rows, fmt


def resolve_file(file: str, registry_path: Path) -> Path:
    """Absolute paths as given; relative ones under $BENCH_DATA when set, else beside registry.yaml."""
    return resolve_data_path(file, registry_path.parent)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def load_prompt_set(reg: Registry, name: str) -> PromptTable:
    """The prompt set `name` with `--set prompt_set.NAME.file=...` (and format, limit) applied.

    Raises RegistryError (exit 2 at plan time) when a file is missing, saying where to put it and how to get it.
    """
    reg.prompt_set(name)  # fields, types and --set keys checked against the prompt-set schema (bench.catalogue)
    raw = reg.entry("prompt_sets", name) | reg.overrides.get(("prompt_sets", name), {})
    limit = raw.get("limit")
    if not raw.get("file"):
        prompts = [str(p) for p in raw.get("prompts") or ()][:limit]
        if not prompts:
            raise RegistryError(f"prompt set {name}: needs `prompts` (a list) or `file` (a CSV)")
        return PromptTable(name, tuple(PromptRow(p) for p in prompts))
    path = resolve_file(str(raw["file"]), reg.path)
    if not path.is_file():
        how = str(raw.get("obtain", "")).strip()
        raise RegistryError(
            f"prompt set {name}: file not found: {path}\n"
            + (f"    how to get it: {how}\n" if how else "")
            + f"    put it there, or point at your copy: --set prompt_set.{name}.file=/path/to/file.csv "
            f"(relative paths resolve under $BENCH_DATA when set, else beside {reg.path.name})")
    try:
        rows, fmt = read_prompt_csv(path, str(raw.get("format", "auto")), limit)
        digest = _sha256(path)
    except (ValueError, KeyError, csv.Error, OSError) as exc:
        raise RegistryError(f"prompt set {name}: {exc}") from exc
    return PromptTable(name, tuple(rows), str(path), fmt, digest)


def expand(table: PromptTable, per_prompt: int, total: int | None = None) -> tuple[list[PromptRow], list[int]]:
    """One row per image and its repeat index: `per_prompt` images of each row, or `total` images cycling
    through the rows (the concept's params.images). The repeat index counts images of the same *row*, so two rows
    with the same prompt and seed give the same image, as the file says."""
    rows = list(table.rows)
    if total is not None:
        picked = [rows[i % len(rows)] for i in range(total)]
        repeats = [i // len(rows) for i in range(total)]
        return picked, repeats
    return [r for r in rows for _ in range(per_prompt)], [j for _ in rows for j in range(per_prompt)]
