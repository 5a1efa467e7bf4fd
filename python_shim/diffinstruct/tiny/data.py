"""The tiny text-to-image problem: procedural 16x16 RGB images of one coloured shape, and their prompts.

A prompt names four attributes, e.g. "a large red circle at the top left":
  colour   red | green | blue | yellow
  shape    circle | square | triangle
  size     small | large
  position top left | top right | bottom left | bottom right   (the quadrant holding the shape)
4 * 3 * 2 * 4 = 96 prompts. Within a prompt, images vary in the grey level of the background (0.15-0.65),
the shape's exact centre (+-0.75 px) and radius; the shape's colour is fixed per colour word.
Images are rendered anti-aliased (4x supersampling) with numpy from a seed, so a seed always gives the same
images. Pixel values: [0, 1] ("images") or [-1, 1] ("data", what the diffusion models see).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from ..checks import check_int

SIZE = 16
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.92, 0.15, 0.12),
    "green": (0.15, 0.80, 0.22),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.85, 0.10),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
ATTRIBUTES: dict[str, tuple[str, ...]] = {"colour": tuple(COLOURS), "shape": SHAPES, "size": SIZES,
                                          "position": POSITIONS}
RADIUS = {"small": 1.9, "large": 3.2}
RADIUS_JITTER = {"small": 0.15, "large": 0.2}
CENTRE_JITTER = 0.75
BACKGROUND = (0.15, 0.65)
SUPERSAMPLE = 4

# Token vocabulary of the text encoder; id 0 pads (an all-padding prompt is the null / unconditional prompt).
WORDS = ("<pad>", "a", "at", "the", *SIZES, *COLOURS, *SHAPES, "top", "bottom", "left", "right")
TOKEN = {w: i for i, w in enumerate(WORDS)}
MAX_TOKENS = 8


@dataclass(frozen=True)
class Attributes:
    colour: str
    shape: str
    size: str
    position: str

    @property
    def prompt(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} at the {self.position}"

    def indices(self) -> tuple[int, int, int, int]:
        return (ATTRIBUTES["colour"].index(self.colour), SHAPES.index(self.shape), SIZES.index(self.size),
                POSITIONS.index(self.position))


def all_attributes() -> list[Attributes]:
    return [Attributes(c, s, z, p) for c, s, z, p in itertools.product(COLOURS, SHAPES, SIZES, POSITIONS)]


def all_prompts() -> list[str]:
    return [a.prompt for a in all_attributes()]


def parse_prompt(prompt: str) -> Attributes:
    """The attributes a prompt names; ValueError naming what is missing or unknown."""
    if not isinstance(prompt, str):
        raise ValueError(f"a prompt must be a string, got {type(prompt).__name__}")
    words = prompt.lower().split()
    unknown = [w for w in words if w not in TOKEN or w == "<pad>"]
    if unknown:
        raise ValueError(f"prompt {prompt!r}: unknown word(s) {', '.join(map(repr, unknown))}; the tiny vocabulary "
                         f"is {', '.join(WORDS[1:])}")

    def one(kind: str, options: tuple[str, ...]) -> str:
        found = [w for w in words if w in options]
        if len(found) != 1:
            raise ValueError(f"prompt {prompt!r} must name exactly one {kind} ({', '.join(options)})")
        return found[0]

    vertical = one("vertical position", ("top", "bottom"))
    horizontal = one("horizontal position", ("left", "right"))
    return Attributes(one("colour", tuple(COLOURS)), one("shape", SHAPES), one("size", SIZES),
                      f"{vertical} {horizontal}")


def tokenize(prompts: list[str] | tuple[str, ...]) -> torch.Tensor:
    """Token ids [B, MAX_TOKENS] (int64, 0-padded); "" is the null prompt (all padding)."""
    rows = []
    for p in prompts:
        words = p.lower().split() if isinstance(p, str) else None
        if words is None:
            raise ValueError(f"a prompt must be a string, got {type(p).__name__}")
        if words:
            parse_prompt(p)  # the same words in any order are fine, nonsense is not
        if len(words) > MAX_TOKENS:
            raise ValueError(f"prompt {p!r} has {len(words)} words; at most {MAX_TOKENS}")
        ids = [TOKEN[w] for w in words]
        rows.append(ids + [0] * (MAX_TOKENS - len(ids)))
    return torch.tensor(rows, dtype=torch.int64).reshape(len(rows), MAX_TOKENS)


def _coverage(attrs: list[Attributes], centres: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Anti-aliased shape coverage [B, SIZE, SIZE] in [0, 1]: the fraction of SUPERSAMPLE^2 sub-pixels inside."""
    n = SIZE * SUPERSAMPLE
    coords = (np.arange(n, dtype=np.float64) + 0.5) / SUPERSAMPLE  # sub-pixel centres in pixel units
    ys, xs = np.meshgrid(coords, coords, indexing="ij")
    out = np.empty((len(attrs), SIZE, SIZE), dtype=np.float64)
    for i, a in enumerate(attrs):
        dx, dy = xs - centres[i, 0], ys - centres[i, 1]
        r = radii[i]
        if a.shape == "circle":
            inside = dx * dx + dy * dy <= r * r
        elif a.shape == "square":
            inside = np.maximum(np.abs(dx), np.abs(dy)) <= 0.85 * r  # about the circle's area
        else:  # upward triangle: apex at -r, base at +0.8 r, base half-width r
            top, base = -r, 0.8 * r
            frac = (dy - top) / (base - top)
            inside = (dy >= top) & (dy <= base) & (np.abs(dx) <= frac * r)
        out[i] = inside.reshape(SIZE, SUPERSAMPLE, SIZE, SUPERSAMPLE).mean(axis=(1, 3))
    return out


def render(attrs: list[Attributes], rng: np.random.Generator,
           background: tuple[float, float] = BACKGROUND) -> torch.Tensor:
    """Images [B, 3, SIZE, SIZE] in [0, 1] (float32) of the given attributes; all randomness from `rng`.

    background: the range of the background's grey level (the classifier trains on a wider one than the data,
    so that it still reads the shapes on the darker backgrounds an aligned generator may prefer).
    """
    b = len(attrs)
    centres = np.empty((b, 2))
    radii = np.empty(b)
    bg_level = rng.uniform(background[0], background[1], size=b)
    jitter = rng.uniform(-CENTRE_JITTER, CENTRE_JITTER, size=(b, 2))
    unit = rng.uniform(-1.0, 1.0, size=b)
    quarter = SIZE / 4
    for i, a in enumerate(attrs):
        vertical, horizontal = a.position.split()
        centres[i] = (quarter * (1 if horizontal == "left" else 3), quarter * (1 if vertical == "top" else 3))
        radii[i] = RADIUS[a.size] + RADIUS_JITTER[a.size] * unit[i]
    centres += jitter
    cov = _coverage(attrs, centres, radii)[:, None]  # [B, 1, H, W]
    colour = np.array([COLOURS[a.colour] for a in attrs])[:, :, None, None]
    bg = bg_level[:, None, None, None]
    img = bg * (1.0 - cov) + colour * cov
    return torch.from_numpy(img.astype(np.float32))


def random_attributes(n: int, rng: np.random.Generator) -> list[Attributes]:
    choices = all_attributes()
    return [choices[i] for i in rng.integers(0, len(choices), size=n)]


def sample_batch(n: int, seed: int, background: tuple[float, float] = BACKGROUND,
                 ) -> tuple[torch.Tensor, list[Attributes]]:
    """n random images in [0, 1] with their attributes, a pure function of (n, seed, background)."""
    check_int("n", n, 1, ValueError)
    rng = np.random.default_rng(seed)
    attrs = random_attributes(n, rng)
    return render(attrs, rng, background), attrs


def to_data(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] images -> [-1, 1], the diffusion models' data space."""
    return images * 2.0 - 1.0


def to_images(data: torch.Tensor) -> torch.Tensor:
    """[-1, 1] data -> [0, 1] images (affine, not clamped, so gradients pass everywhere)."""
    return (data + 1.0) * 0.5


def labels(attrs: list[Attributes]) -> torch.Tensor:
    """Attribute indices [B, 4] (colour, shape, size, position), the classifier's targets."""
    return torch.tensor([a.indices() for a in attrs], dtype=torch.int64).reshape(len(attrs), 4)
