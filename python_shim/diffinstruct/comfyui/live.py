"""The live view of a training run in ComfyUI: every N steps a one-step sample grid and the curves of the reward,
the samples' diversity and their distance to the reference's samples, with a warning when diversity collapses.

Reward hacking shows as every sample of a prompt taking the same look. So the view fixes `samples_per_prompt`
noises per preview prompt, and measures, in image space ([0, 1] RGB):

* diversity: the mean RMS distance between two samples of the same prompt (over all pairs and prompts);
* distance: the mean RMS distance between a sample and the reference's sample from the same noise.

"The reference's samples" are the one-step samples of the generator the run started from (the reference MODEL
itself unless Train starts from another generator), drawn once, at the start. When diversity falls below
`warn_fraction` of theirs, the view warns (docs/COMFYUI.md section 10). Nothing here needs ComfyUI: the host
shows what `update` returns (comfyui/training.ComfyHooks).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..checks import check_finite, check_int
from ..errors import ConfigError
from ..prompts import _cat

TILE = 96  # pixels per sample in the grid
PLOT_W, PLOT_H = 320, 220


def pairwise_rms(images: torch.Tensor) -> float:
    """Mean RMS distance over the pairs of `images` [K, 3, H, W] (0 for one image)."""
    k = images.shape[0]
    if k < 2:
        return 0.0
    flat = images.reshape(k, -1).double()
    d2 = torch.cdist(flat, flat).pow(2) / flat.shape[1]
    i, j = torch.triu_indices(k, k, offset=1)
    return float(d2[i, j].sqrt().mean())


def diversity(images: torch.Tensor, per_prompt: int) -> float:
    """Mean pairwise RMS distance within each prompt's block of `per_prompt` consecutive images."""
    groups = images.reshape(-1, per_prompt, *images.shape[1:])
    return sum(pairwise_rms(g) for g in groups) / groups.shape[0]


def distance(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean RMS distance between each image and the reference image from the same noise."""
    diff = (images.double() - reference.double()).reshape(images.shape[0], -1)
    return float(diff.pow(2).mean(dim=1).sqrt().mean())


@dataclass
class LiveSettings:
    every: int = 10  # steps between previews; 0: none while training
    samples_per_prompt: int = 4
    prompts: int = 2  # preview prompts (the first ones of the run)
    warn_fraction: float = 0.5  # warn when diversity < warn_fraction * the reference's; 0: never

    def check(self) -> LiveSettings:
        check_int("preview_every", self.every, 0)
        check_int("preview samples_per_prompt", self.samples_per_prompt, 2)
        check_int("preview prompts", self.prompts, 1)
        check_finite("diversity_warning", self.warn_fraction)
        if not 0.0 <= self.warn_fraction <= 1.0:
            raise ConfigError(f"diversity_warning must be a fraction in [0, 1], got {self.warn_fraction:g}")
        return self


@dataclass
class Snapshot:
    step: int
    reward: float | None
    diversity: float
    distance: float


@dataclass
class Update:
    """What the host shows: the picture (a PIL image), the status lines and whether they hold a warning."""

    image: Any
    lines: list[str]
    warning: bool


@dataclass
class LiveView:
    """sample(z, cond) -> latents; decode(latents) -> images [B, 3, H, W] in [0, 1]."""

    sample: Callable[[torch.Tensor, Any], torch.Tensor]
    decode: Callable[[torch.Tensor], torch.Tensor]
    z: torch.Tensor
    cond: Any
    labels: list[str]
    settings: LiveSettings
    reference: torch.Tensor
    history: list[Snapshot] = field(default_factory=list)
    first_reward: float | None = None  # the run's first finite reward (of any step, not only previewed ones)

    @property
    def reference_diversity(self) -> float:
        return diversity(self.reference, self.settings.samples_per_prompt)

    def due(self, completed: int, steps: int) -> bool:
        every = self.settings.every
        return completed == steps or (every > 0 and completed % every == 0)

    def observe(self, record: dict[str, Any]) -> float | None:
        """The step's finite reward (None if it has none), remembered when it is the run's first."""
        reward = record.get("reward")
        if not (isinstance(reward, int | float) and not isinstance(reward, bool) and math.isfinite(reward)):
            return None
        if self.first_reward is None:
            self.first_reward = float(reward)
        return float(reward)

    def update(self, completed: int, record: dict[str, Any]) -> Update:
        """Sample, measure and draw now (the host calls it when `due`)."""
        with torch.no_grad():
            images = self.decode(self.sample(self.z, self.cond)).float().clamp(0, 1).cpu()
        snap = Snapshot(completed, self.observe(record),
                        diversity(images, self.settings.samples_per_prompt), distance(images, self.reference))
        self.history.append(snap)
        lines, warning = self.status(snap)
        banner = lines[-1].split(": the samples")[0] + ": reward hacking?" if warning else None
        return Update(render(images, self.settings.samples_per_prompt, self.history, self.reference_diversity,
                             banner), lines, warning)

    def status(self, snap: Snapshot) -> tuple[list[str], bool]:
        ref = self.reference_diversity
        first = self.first_reward if self.first_reward is not None else snap.reward
        lines = [f"step {snap.step}"]
        if snap.reward is not None and first is not None:
            lines.append(f"reward {first:.4g} -> {snap.reward:.4g} ({snap.reward - first:+.4g})")
        ratio = snap.diversity / ref if ref > 0 else math.inf
        lines.append(f"diversity {snap.diversity:.4f} ({100 * ratio:.0f}% of the reference's {ref:.4f})"
                     if ref > 0 else f"diversity {snap.diversity:.4f}")
        lines.append(f"distance to the reference's samples {snap.distance:.4f}")
        warning = ref > 0 and ratio < self.settings.warn_fraction
        if warning:
            lines.append(f"WARNING: diversity fell to {100 * ratio:.0f}% of the reference's (below "
                         f"{100 * self.settings.warn_fraction:.0f}%): the samples of a prompt look alike (reward "
                         "hacking?); lower alpha or stop early")
        return lines, warning


def start(sample: Callable[[torch.Tensor, Any], torch.Tensor], reference_sample: Callable[[torch.Tensor, Any],
          torch.Tensor], decode: Callable[[torch.Tensor], torch.Tensor], labels: Sequence[str],
          table: dict[str, Any], latent_shape: Sequence[int], seed: int, device: torch.device,
          settings: LiveSettings) -> LiveView:
    """A LiveView over the first `settings.prompts` labels, its reference samples drawn now."""
    chosen = list(labels[:settings.prompts]) or list(labels[:1])
    k = settings.samples_per_prompt
    gen = torch.Generator().manual_seed(int(seed) + 7919)  # the previews' own noise: the run's is untouched
    z = torch.randn((len(chosen) * k, *latent_shape), generator=gen).to(device)
    cond = _cat([table[p] for p in chosen for _ in range(k)])
    with torch.no_grad():
        reference = decode(reference_sample(z, cond)).float().clamp(0, 1).cpu()
    return LiveView(sample, decode, z, cond, chosen, settings, reference)


# ============================================================================================== the picture
def render(images: torch.Tensor, per_prompt: int, history: Sequence[Snapshot], reference_diversity: float,
           warning: str | None) -> Any:
    """The sample grid (one row per prompt) beside the curves, a red banner under them when warning."""
    from PIL import Image, ImageDraw

    rows = images.shape[0] // per_prompt
    grid_w, grid_h = per_prompt * TILE, max(rows * TILE, PLOT_H)
    banner = 28 if warning else 0
    canvas = Image.new("RGB", (grid_w + PLOT_W, grid_h + banner), (24, 24, 28))
    pixels = (images.movedim(1, -1).numpy() * 255).round().astype("uint8")
    for i, px in enumerate(pixels):
        tile = Image.fromarray(px).resize((TILE, TILE), Image.NEAREST)
        canvas.paste(tile, ((i % per_prompt) * TILE, (i // per_prompt) * TILE))
    canvas.paste(plot(history, reference_diversity), (grid_w, 0))
    if warning:
        draw = ImageDraw.Draw(canvas)
        draw.rectangle([0, grid_h, canvas.width, canvas.height], fill=(170, 30, 30))
        draw.text((6, grid_h + 8), warning[:100], fill=(255, 255, 255))
    return canvas


def _polyline(draw: Any, xs: Sequence[float], ys: Sequence[float | None], box: tuple[int, int, int, int],
              span: tuple[float, float], color: tuple[int, int, int]) -> None:
    pts = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
    if not pts:
        return
    left, top, right, bottom = box
    x0, x1 = min(xs), max(max(xs), min(xs) + 1)
    lo, hi = span
    scaled = [(left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - lo) / (hi - lo) * (bottom - top))
              for x, y in pts]
    if len(scaled) == 1:
        scaled.append((right, scaled[0][1]))
    draw.line(scaled, fill=color, width=2)


def _span(values: Sequence[float | None]) -> tuple[float, float]:
    finite = [v for v in values if v is not None]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    pad = (hi - lo) * 0.08 or max(abs(hi) * 0.05, 1e-6)
    return lo - pad, hi + pad


def plot(history: Sequence[Snapshot], reference_diversity: float) -> Any:
    """Reward, diversity (the reference's as a grey level on the same scale) and distance over the steps, each on
    its own scale; the labels carry the latest values."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (PLOT_W, PLOT_H), (36, 36, 42))
    draw = ImageDraw.Draw(image)
    xs = [float(s.step) for s in history]
    series = [("reward", [s.reward for s in history], (250, 200, 60)),
              ("diversity", [s.diversity for s in history], (90, 200, 250)),
              ("distance to reference", [s.distance for s in history], (230, 110, 200))]
    for i, (name, ys, color) in enumerate(series):
        box = (8, 22 + i * 66, PLOT_W - 8, 22 + i * 66 + 46)
        draw.rectangle(box, outline=(70, 70, 80))
        level = name == "diversity" and reference_diversity > 0
        span = _span([*ys, reference_diversity] if level else ys)
        if level:
            _polyline(draw, [xs[0], xs[-1] + 1], [reference_diversity] * 2, box, span, (120, 120, 130))
        _polyline(draw, xs, ys, box, span, color)
        last = next((y for y in reversed(ys) if y is not None), None)
        label = f"{name} {last:.4g}" if last is not None else name
        draw.text((box[0], box[1] - 13), label + (f" (reference {reference_diversity:.4g})" if level else ""),
                  fill=color)
    draw.text((8, PLOT_H - 14), f"steps {int(xs[0]) if xs else 0}-{int(xs[-1]) if xs else 0}", fill=(200, 200, 200))
    return image
