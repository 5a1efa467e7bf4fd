"""The tiny demo's report: report.md, grid.png (samples), curves.png (training) and tradeoff.png (the sweep).

tradeoff.png and the report's trade-off table put every stage-3 run (method, alpha) against the three things a
reward-aligned generator trades: the learned reward, prompt fidelity and diversity (as a share of the teacher's),
in the spirit of DI++'s Table 2.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .. import runner
from ..checkpoint import write_text_atomic

METHOD_NAMES = {"dipp": "DI++", "distar": "DI*"}
DIVERSITY_FLOOR = 0.9  # the share of the teacher's diversity a demo generator must keep (issue 17)


def grid(rows: list[tuple[str, torch.Tensor]], path: Path, prompts: Sequence[str], seeds: int) -> Path:
    import numpy as np

    from ..plotting import _figure, _save

    scale, gap = 4, 2
    tiles = []
    for _, images in rows:
        ims = (images.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
        ims = ims.repeat(scale, axis=1).repeat(scale, axis=2)
        side = ims.shape[1]
        row = np.full((side, len(ims) * (side + gap) - gap, 3), 255, np.uint8)
        for i, im in enumerate(ims):
            row[:, i * (side + gap):i * (side + gap) + side] = im
        tiles.append(row)
    side = tiles[0].shape[0]
    canvas = np.full((len(tiles) * (side + gap) - gap, tiles[0].shape[1], 3), 255, np.uint8)
    for r, row in enumerate(tiles):
        canvas[r * (side + gap):r * (side + gap) + side] = row
    w, h = canvas.shape[1] / 100, canvas.shape[0] / 100  # one canvas pixel per figure pixel (dpi 100)
    left, top, pad = 1.1, 0.45, 0.05
    fig = _figure(left + w + pad, top + h + pad)
    ax = fig.add_axes((left / (left + w + pad), pad / (top + h + pad), w / (left + w + pad), h / (top + h + pad)))
    ax.imshow(canvas, interpolation="nearest")
    ax.set_yticks([r * (side + gap) + side / 2 for r in range(len(rows))], [name for name, _ in rows], fontsize=9)
    cols = len(prompts) // seeds
    ax.set_xticks([(c * seeds + seeds / 2) * (side + gap) - gap / 2 for c in range(cols)],
                  ["\n".join(p.removeprefix("a ").split(" at the ")) for p in prompts[:cols * seeds:seeds]],
                  fontsize=7)
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    for s in ax.spines.values():
        s.set_visible(False)
    return _save(fig, path)


def curves(stage1: Path, sweep: dict[tuple[str, float], Path], path: Path) -> Path:
    from ..metrics import read_jsonl
    from ..plotting import _figure, _save, _smooth

    def line(ax: Any, rec: list[dict[str, Any]], key: str, colour: str, label: str | None = None,
             style: str = "-") -> None:
        # raw values faintly, a moving average (a tenth of the run) on top: batches of 16 are noisy
        steps, values = [r["step"] for r in rec], [float(r[key]) for r in rec]
        ax.plot(steps, values, lw=0.5, alpha=0.3, color=colour, ls=style)
        ax.plot(steps, _smooth(values, max(1, len(values) // 10)), lw=1.5, color=colour, label=label, ls=style)

    fig = _figure(11.0, 6.5)
    axes = fig.subplots(2, 2)
    rec1 = read_jsonl(stage1 / runner.METRICS_FILE)
    for ax, key, title in ((axes[0, 0], "ta_loss", "stage 1 (DI): TA loss"),
                           (axes[0, 1], "gap", "stage 1 (DI): |D_TA - D_teacher|")):
        line(ax, rec1, key, "C0")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for i, ((method, alpha), run) in enumerate(sorted(sweep.items())):
        rec = read_jsonl(run / runner.METRICS_FILE)
        label, style = f"{METHOD_NAMES[method]} alpha = {alpha:g}", "-" if method == "dipp" else "--"
        line(axes[1, 0], rec, "reward", f"C{i}", label, style)
        # DI* has no |D_TA - D_ref| diagnostic; its TA loss says as much about how well the TA tracks
        line(axes[1, 1], rec, "ta_loss", f"C{i}", label, style)
    axes[1, 0].set_title("stage 3: learned reward of generator samples", fontsize=10)
    axes[1, 1].set_title("stage 3: TA loss", fontsize=10)
    for ax in axes[1]:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def tradeoff(metrics: dict[str, Any], path: Path) -> Path:
    """Reward, fidelity and diversity (share of the teacher's) against alpha, one line per method."""
    from ..plotting import _figure, _save

    teacher = metrics["teacher"]
    fig = _figure(11.0, 3.4)
    axes = fig.subplots(1, 3)
    panels = (("reward", "learned reward", teacher["reward"]),
              ("attribute_accuracy", "prompt fidelity (% attributes)", teacher["attribute_accuracy"]),
              ("diversity_vs_teacher", "diversity (share of the teacher's)", 1.0))
    for ax, (key, title, ref) in zip(axes, panels, strict=True):
        for i, method in enumerate(METHOD_NAMES):
            rows = sorted((r for r in metrics["sweep"] if r["method"] == method), key=lambda r: r["alpha"])
            if rows:
                ax.plot([r["alpha"] for r in rows], [r[key] for r in rows], marker="o", color=f"C{i}",
                        label=METHOD_NAMES[method])
        ax.axhline(ref, color="0.3", lw=1, ls=":", label="teacher")
        if key == "diversity_vs_teacher":
            ax.axhline(DIVERSITY_FLOOR, color="C3", lw=1, ls="--", label=f"floor ({DIVERSITY_FLOOR:.0%})")
        ax.set_xscale("symlog", linthresh=0.01)  # alpha = 0 (the baselines) stays on the axis, DI*'s small alphas apart
        ax.set_xlabel("alpha")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def _row(m: dict[str, Any]) -> str:
    return (f"| {m['name']} | {m['reward']:.2f} | {m['taste']:.3f} | {m['attribute_accuracy']:.1f} | "
            f"{m['prompt_accuracy']:.1f} | {m['diversity']:.3f} ({100 * m['diversity_vs_teacher']:.0f} %) | "
            f"{m['mmd_to_teacher']:.4f} | {m['pixel_distance_to_teacher']:.3f} |")


HEAD = ("| samples | learned reward | hidden taste | fidelity (attr. %) | prompts fully right % | diversity (vs "
        "teacher) | MMD to teacher | pixel dist. to teacher |\n|---|---|---|---|---|---|---|---|")


def write_report(out: Path, metrics: dict[str, Any]) -> Path:
    t, di, dipp, cfg = metrics["teacher"], metrics["di"], metrics["dipp"], metrics["config"]
    floor = "met" if dipp["diversity_vs_teacher"] >= DIVERSITY_FLOOR else "NOT met"
    lines = [
        "# DI++ on the tiny text-to-image problem", "",
        f"Teacher: {cfg['heun_steps']}-step EDM Heun with CFG omega = {cfg['omega']} "
        f"({metrics['teacher_nfe']} network evaluations per image); DI, DI++ and DI*: one step. "
        f"Same prompts and seeds in every row.", "",
        "![grid](grid.png)", "",
        f"DI++ alpha = {cfg['alpha']:g}: learned reward {di['reward']:.2f} -> {dipp['reward']:.2f} "
        f"(hidden taste {di['taste']:.3f} -> {dipp['taste']:.3f}); prompt fidelity {dipp['attribute_accuracy']:.1f} % "
        f"vs the teacher's {t['attribute_accuracy']:.1f} %; diversity {100 * dipp['diversity_vs_teacher']:.0f} % of "
        f"the teacher's (floor {DIVERSITY_FLOOR:.0%}: {floor}); one-step sampling {metrics['speedup']:.0f}x faster "
        f"than the teacher ({dipp['sample_seconds'] * 1000:.0f} ms vs {t['sample_seconds'] * 1000:.0f} ms for "
        f"{t['images']} images).", "",
        "## Samples", "", HEAD, _row(t), _row(metrics["stage1"]), _row(di), _row(dipp), "",
        f"## Trade-off: alpha sweep of DI++ and DI* (from the stage-1 generator, {cfg['sweep_steps']} steps each)",
        "", "![trade-off](tradeoff.png)", "", HEAD, *[_row(m) for m in metrics["sweep"]], "",
        "## Reward model (stage 2)", "",
        f"{metrics['reward_model']['pairs']} pairs rated by the hidden taste; validation accuracy "
        f"{100 * metrics['reward_model']['val_accuracy']:.1f} %, agreement with the noise-free taste "
        f"{100 * metrics['reward_model']['agreement_with_taste']:.1f} %.", "",
        "![curves](curves.png)", "",
        "Fidelity = % of attributes (colour, shape, size, position) the classifier reads as prompted. Diversity = "
        "mean RMS pixel distance between samples of one prompt (in brackets: as a share of the teacher's). MMD: "
        "on the classifier's features, against the teacher's samples. Learned reward: the stage-2 preference "
        "model; hidden taste: 1 - median luma. DI* alphas are on another scale than DI++'s (its divergence "
        "term is not normalised per sample), so compare the methods at equal reward, not at equal alpha.", "",
        f"Times: {', '.join(f'{k} {v:.0f} s' for k, v in metrics['timing'].items())}.", "",
    ]
    path = out / "report.md"
    write_text_atomic(path, "\n".join(lines))
    return path
