"""The synthetic captioned world the toy text-to-image model and its detector are trained on.

One saturated shape on a black background per 32x32 image, captioned "a <colour> <shape>". Everything is a
pure function of a seed (numpy only, no torch), so the model, the detector and every test can regenerate the
same data without shipping any of it.

Why these choices (see shared/TOY-NOTES.md for the measurements behind them):
- Colours are saturated and far apart in RGB so that "which colour" is never ambiguous to the detector, while
  orange sits between red and yellow on purpose: the *related* concept that unlearning "red" should spare.
- The background is black rather than grey: anti-aliased edges then only darken a colour (hue stays put)
  instead of desaturating it towards grey, and every colour in the palette has strong contrast against it.
- Shapes are large (radius 0.30-0.36 of the side): small shapes made circle / square / triangle hard to tell
  apart in generated images, which capped shape accuracy in the first experiment.
"""

from __future__ import annotations

import re
from collections import OrderedDict

import numpy as np

RESOLUTION = 32
BACKGROUND: tuple[int, int, int] = (0, 0, 0)

COLOURS: OrderedDict[str, tuple[int, int, int]] = OrderedDict(
    [
        ("red", (235, 20, 20)),
        ("orange", (255, 140, 0)),
        ("yellow", (250, 235, 20)),
        ("green", (20, 200, 40)),
        ("blue", (30, 80, 255)),
    ]
)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

# Size of a shape as a fraction of the image side, drawn from this range and scaled per shape in render()
# (TOY-NOTES: 0.30-0.36 made shapes unambiguous).
RADIUS_RANGE: tuple[float, float] = (0.30, 0.36)
_SUPERSAMPLE = 4  # 4x4 samples per pixel: anti-aliased edges, like the ones a diffusion model produces


def _colour_rgb(colour: str) -> tuple[int, int, int]:
    try:
        return COLOURS[colour]
    except KeyError:
        raise ValueError(f"unknown colour {colour!r}; known: {', '.join(COLOURS)}") from None


def _coverage(shape: str, cx: float, cy: float, radius: float, resolution: int) -> np.ndarray:
    """Fraction of each pixel covered by the shape, from a 4x4 grid of sample points per pixel.

    Plain numpy geometry rather than a rasteriser, so the data are the same on every platform and version.
    Units are pixels; (cx, cy) is the centre, radius the circle's radius / square's half-side / triangle's
    circumradius.
    """
    s = _SUPERSAMPLE
    u = (np.arange(resolution * s) + 0.5) / s
    x, y = u[None, :], u[:, None]
    if shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= radius**2
    elif shape == "square":
        inside = (np.abs(x - cx) <= radius) & (np.abs(y - cy) <= radius)
    else:  # apex-up equilateral triangle: below the two slanted edges and above the base
        half_w = radius * np.sqrt(3) / 2
        base = cy + radius / 2
        slope = (base - (cy - radius)) / half_w  # rise of a slanted edge per unit of horizontal distance
        inside = (y <= base) & (y >= cy - radius + slope * np.abs(x - cx))
    return inside.reshape(resolution, s, resolution, s).mean(axis=(1, 3))


def render(colour: str, shape: str, rng: np.random.Generator, resolution: int = RESOLUTION) -> np.ndarray:
    """Draw one shape at a random size and position; returns uint8 [resolution, resolution, 3].

    The shape always lies wholly inside the image with a clear pixel to spare (a clipped triangle can look
    like a square). The three shapes get comparable visual sizes from the same radius draw.
    """
    rgb = np.array(_colour_rgb(colour), dtype=np.float64)
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    radius = float(rng.uniform(*RADIUS_RANGE)) * resolution
    if shape == "square":
        radius *= 0.9
        left = right = up = down = radius
    elif shape == "triangle":
        radius *= 1.2
        left = right = radius * np.sqrt(3) / 2
        up, down = radius, radius / 2
    else:
        left = right = up = down = radius
    margin = 1.0  # one clear pixel: shapes never touch the border
    cx = rng.uniform(left + margin, resolution - right - margin)
    cy = rng.uniform(up + margin, resolution - down - margin)
    cover = _coverage(shape, cx, cy, radius, resolution)
    background = np.array(BACKGROUND, dtype=np.float64)
    img = background + cover[..., None] * (rgb - background)
    return np.round(img).astype(np.uint8)


def caption(colour: str, shape: str) -> str:
    """The one caption template the model is trained on: "a red circle", "an orange square"."""
    article = "an" if colour[:1] in "aeiou" else "a"
    return f"{article} {colour} {shape}"


_WORD = re.compile(r"[a-z]+")


def parse_caption(text: str) -> tuple[str | None, str | None]:
    """Recover (colour, shape) from a caption or prompt; None for whichever is absent.

    Used to know what a prompt asked for, so a generated image can be judged against it. The first colour word
    and the first shape word win; plurals ("circles") count.
    """
    colour: str | None = None
    shape: str | None = None
    for word in _WORD.findall(text.lower()):
        if colour is None and word in COLOURS:
            colour = word
        stem = word[:-1] if word.endswith("s") and word[:-1] in SHAPES else word
        if shape is None and stem in SHAPES:
            shape = stem
    return colour, shape


def make_dataset(
    n: int,
    seed: int,
    colours: list[str] | tuple[str, ...] | None = None,
    shapes: list[str] | tuple[str, ...] | None = None,
) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray]:
    """Render n captioned images, balanced over the (colour, shape) pairs, in a seeded random order.

    Returns (images uint8 [n, 32, 32, 3], captions, colour_idx, shape_idx). The indices always refer to the
    full COLOURS / SHAPES order, also when a subset is asked for, so labels mean the same thing everywhere.
    Balance: each pair appears floor(n / pairs) or that + 1 times.
    """
    colours = list(COLOURS) if colours is None else list(colours)
    shapes = list(SHAPES) if shapes is None else list(shapes)
    for c in colours:
        _colour_rgb(c)
    for s in shapes:
        if s not in SHAPES:
            raise ValueError(f"unknown shape {s!r}; known: {', '.join(SHAPES)}")
    if n < 0 or not colours or not shapes:
        raise ValueError("make_dataset needs n >= 0 and at least one colour and one shape")
    colour_names = list(COLOURS)
    pairs = [(colour_names.index(c), SHAPES.index(s)) for c in colours for s in shapes]
    rng = np.random.default_rng(seed)
    # Which pairs get the extra image when n is not a multiple is itself seeded.
    order = np.concatenate(
        [np.arange(n // len(pairs) * len(pairs)) % len(pairs), rng.permutation(len(pairs))[: n % len(pairs)]]
    ).astype(np.int64)
    order = order[rng.permutation(n)]
    colour_idx = np.array([pairs[i][0] for i in order], dtype=np.int64)
    shape_idx = np.array([pairs[i][1] for i in order], dtype=np.int64)
    images = np.empty((n, RESOLUTION, RESOLUTION, 3), dtype=np.uint8)
    captions: list[str] = []
    for k in range(n):
        c, s = colour_names[colour_idx[k]], SHAPES[shape_idx[k]]
        images[k] = render(c, s, rng)
        captions.append(caption(c, s))
    return images, captions, colour_idx, shape_idx
