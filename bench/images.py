"""Image files for stage entries: lossless PNGs named by index, read back as uint8 NHWC arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def save_images(folder: Path, images: np.ndarray, start: int = 0) -> list[str]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, img in enumerate(images, start):
        name = f"{i:05d}.png"
        Image.fromarray(img).save(folder / name)
        names.append(name)
    return names


def load_images(folder: Path, names: list[str], size: int | None = None) -> np.ndarray:
    from PIL import Image

    out = []
    for name in names:
        im = Image.open(folder / name).convert("RGB")
        if size and im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.BICUBIC)
        out.append(np.asarray(im))
    return np.stack(out) if out else np.zeros((0, size or 0, size or 0, 3), np.uint8)


def read_caption_folder(folder: Path, size: int) -> tuple[np.ndarray, list[str]]:
    """A user folder of image + same-named .txt caption pairs (e.g. dog1.png + dog1.txt)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"attack data_dir {folder} is not a directory")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    missing = [p.name for p in files if not p.with_suffix(".txt").exists()]
    if not files or missing:
        raise ValueError(f"attack data_dir {folder}: needs image files each with a same-named .txt caption; "
                         f"{'no images found' if not files else f'captions missing for {missing[:5]}'}")
    captions = [p.with_suffix(".txt").read_text(encoding="utf-8").strip() for p in files]
    return load_images(folder, [p.name for p in files], size), captions
