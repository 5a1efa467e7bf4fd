"""`make demo`: the whole DI++ workflow on the built-in tiny text-to-image problem, on a CPU, in minutes.

    python -m diffinstruct.tiny.demo --out runs/demo [--quick] [--threads N]

Stage 1  DI pre-training: a one-step generator g(z, c) = D(2.5 z, 2.5, c), initialised from the tiny teacher,
         distilled from the CFG teacher with DI (DI++ with alpha = 0).
Stage 2  reward modelling: a simulated rater with a hidden taste (darker backgrounds) labels pairs of images;
         the Bradley-Terry preference model (rewards/preference.py) learns a differentiable reward from them.
Stage 3  DI++ alignment from the stage-1 generator with that reward, for each alpha of a sweep (alpha = 0 is
         DI for as many steps, the baseline), and DI* (pseudo-Huber divergence) for its own alphas; then the
         report (tiny/report.py): report.md, grid.png, curves.png, tradeoff.png, metrics.json.

Learning rates (issue 17): the generator's lr is 1e-4, the TA's 1e-3 (10x), the EMA 0.99. With Adam's beta1 = 0
every weight moves about lr per step. At 2e-4 for both the generator's diversity swung between 60 and 105 % of
the teacher's within tens of steps. With the TA at 5x the generator's, DI++ at alpha = 10 kept 84 % of it. At 10x
the TA keeps up with the generator's samples, and every run of the sweep keeps at least 98 %. Stage 1 needs its
400 steps: the generator starts as the teacher's one-step denoiser, whose samples of one prompt are alike, and
after 150 steps it has 75 % of the teacher's diversity. Diversity is measured on distinct noise for every
(prompt, sample) pair, 96 prompts x 4 samples. Shared seeds across prompts had measured the same few noises
everywhere: 120 % for a generator that keeps 84 %.

Every stage trains with the engine (engine.build_engine, then runner.run: checkpoints, metrics.jsonl, resume), so
running the demo again on the same --out reuses finished stages.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import engine, runner
from ..checkpoint import write_text_atomic
from ..checks import check_int
from ..config import DIConfig
from ..denoisers import EDMDenoiser
from ..errors import ConfigError
from ..prompts import PromptList
from ..rewards.base import PixelReward
from ..rewards.preference import PreferenceModel
from ..trainer import DITrainer
from . import data, evaluate, models, report, sampling, taste

STAGE1 = "stage1-di"
STAGE2 = "stage2-reward"
REWARD_FILE = "reward.safetensors"
# DI*'s divergence gradient is not normalised per sample as DI++'s is (about 1/sqrt(elements) of it per element
# here), so its alpha weighs the reward on another scale
DISTAR_ALPHA = 0.03
GRID_PROMPTS = ("a large red circle at the top left", "a small blue square at the bottom right",
                "a large yellow triangle at the top right", "a small green circle at the bottom left",
                "a large blue triangle at the bottom left", "a small red triangle at the top right",
                "a large green square at the bottom right", "a small yellow circle at the top left")


@dataclass(frozen=True)
class DemoConfig:
    di_steps: int = 400
    sweep_steps: int = 150
    alphas: tuple[float, ...] = (0.0, 1.0, 3.0, 10.0)
    alpha: float = 10.0  # the DI++ run shown in the grid and the headline numbers
    batch_size: int = 16
    distar_alphas: tuple[float, ...] = (0.0, DISTAR_ALPHA)  # DI* runs of the sweep (its own alpha scale)
    lr: float = 1e-4  # the generator's
    lr_ta: float = 1e-3
    omega: float = 2.0  # CFG weight of the teacher, for DI and for the many-step reference samples
    ema_decay: float = 0.99
    heun_steps: int = 18
    eval_prompts: int = 96
    eval_seeds: int = 4  # samples per evaluation prompt, each from its own noise
    reward_images: int = 768
    reward_pairs: int = 3000
    reward_epochs: int = 60
    seed: int = 0
    threads: int = 1

    def check(self) -> DemoConfig:
        for name in ("di_steps", "sweep_steps", "batch_size", "heun_steps", "eval_prompts", "eval_seeds",
                     "reward_images", "reward_pairs", "reward_epochs", "threads"):
            check_int(name, getattr(self, name), 1)
        if self.eval_seeds < 2:
            raise ConfigError("eval_seeds must be >= 2 (diversity compares samples of one prompt)")
        if self.eval_prompts > len(data.all_prompts()):
            raise ConfigError(f"eval_prompts must be <= {len(data.all_prompts())} (the number of prompts)")
        for name in ("alphas", "distar_alphas"):
            values = getattr(self, name)
            if (name == "alphas" and not values) or any(
                    not (isinstance(a, int | float) and math.isfinite(a) and a >= 0) for a in values):
                raise ConfigError(f"{name} must be finite numbers >= 0, got {values!r}")
        if 0.0 not in self.alphas:
            raise ConfigError("alphas must include 0 (DI, the baseline DI++ is compared with)")
        if self.alpha not in self.alphas or self.alpha == 0:
            raise ConfigError(f"alpha ({self.alpha}) must be one of the non-zero alphas {self.alphas}")
        for name in ("lr", "lr_ta"):
            if not (getattr(self, name) > 0 and math.isfinite(getattr(self, name))):
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        return self


QUICK = DemoConfig(di_steps=400, sweep_steps=80, alphas=(0.0, 10.0), alpha=10.0, distar_alphas=(DISTAR_ALPHA,),
                   eval_prompts=48, eval_seeds=4, reward_images=384, reward_pairs=1500, reward_epochs=40)


@dataclass
class SampleSet:
    """Samples of the evaluation set (every prompt x eval_seeds), in [0, 1], with their prompts."""

    images: torch.Tensor
    prompts: list[str]
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------- helpers
def eval_prompts(cfg: DemoConfig) -> tuple[list[str], list[int]]:
    prompts = data.all_prompts()
    step = len(prompts) / cfg.eval_prompts
    chosen = [prompts[int(i * step)] for i in range(cfg.eval_prompts)]
    # every (prompt, sample) draws its own noise: with one seed list shared by all prompts, the samples of every
    # prompt differ by the same few noises, and diversity measures those few draws (issue 17: 120 % of the
    # teacher's with 2 shared seeds, 84 % with 4 distinct ones, for the same generator)
    rows = [(p, 1000 + i * cfg.eval_seeds + s) for s in range(cfg.eval_seeds) for i, p in enumerate(chosen)]
    return [r[0] for r in rows], [r[1] for r in rows]


def noise(seeds: Sequence[int]) -> torch.Tensor:
    """One unit-normal [3, 16, 16] per seed: the same seed gives the same noise to every sampler."""
    return torch.cat([sampling.noise_for(1, s) for s in seeds])


@torch.no_grad()
def one_step(generator_net: EDMDenoiser, prompts: Sequence[str], seeds: Sequence[int],
             sigma_init: float = 2.5) -> tuple[torch.Tensor, float]:
    z = noise(seeds)
    tokens = data.tokenize(list(prompts))
    start = time.perf_counter()
    s = torch.full((z.shape[0],), sigma_init)
    x = generator_net(sigma_init * z, s, tokens)
    return data.to_images(x).clamp(0, 1), time.perf_counter() - start


@torch.no_grad()
def many_step(teacher: EDMDenoiser, prompts: Sequence[str], seeds: Sequence[int], cfg: DemoConfig
              ) -> tuple[torch.Tensor, float]:
    z = noise(seeds)
    tokens = data.tokenize(list(prompts))
    start = time.perf_counter()
    x = sampling.heun_sample(teacher, tokens, z, steps=cfg.heun_steps, omega=cfg.omega)
    return data.to_images(x).clamp(0, 1), time.perf_counter() - start


def prompt_list() -> PromptList:
    return PromptList(data.all_prompts(), lambda p: data.tokenize([p]))


def di_config(cfg: DemoConfig, alpha: float, method: str = "dipp") -> DIConfig:
    return DIConfig(method=method, alpha=alpha, omega=cfg.omega, sigma_init=2.5, lr_generator=cfg.lr,
                    lr_ta=cfg.lr_ta, batch_size=cfg.batch_size, ema_decay=cfg.ema_decay, seed=cfg.seed,
                    p_mean=-1.0, p_std=1.4)


def _ema_state(trainer: DITrainer) -> dict[str, torch.Tensor]:
    with runner.ema_weights(trainer):
        return copy.deepcopy(trainer.models.generator.denoiser.state_dict())


def _train(teacher: EDMDenoiser, cfg: DemoConfig, out: Path, steps: int, alpha: float,
           reward: PixelReward | None, start: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None,
           label: str, method: str = "dipp") -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """One engine run (resumable); returns the generator's EMA weights, the TA's weights and the run summary."""
    init = None
    if start is not None:
        init = copy.deepcopy(teacher)
        init.load_state_dict(start[0])
    m = engine.assemble(teacher, (3, data.SIZE, data.SIZE), mode="full", sigma_init=2.5, generator_init=init)
    if start is not None:
        m.ta.load_state_dict(start[1])  # the stage-1 TA already tracks the generator's distribution
    trainer = engine.build_engine(m, prompt_list(), di_config(cfg, alpha, method), reward)
    print(f"{label}: {steps} steps -> {out}", file=sys.stderr, flush=True)
    options = runner.RunOptions(steps, out, checkpoint_every=steps, resume=True, keep=1, curves=True,
                                metadata={"base_model": "diffinstruct.tiny teacher", "demo_stage": label})
    summary = runner.run(trainer, options, runner.ConsoleHooks())
    return _ema_state(trainer), copy.deepcopy(m.ta.state_dict()), summary


def measure(name: str, images: torch.Tensor, prompts: list[str], seconds: float, clf: models.AttributeClassifier,
            reward: PreferenceModel, teacher_images: torch.Tensor) -> dict[str, Any]:
    with torch.no_grad():
        learned = float(reward(images).mean())
    diversity = evaluate.diversity(images, prompts)
    return {"name": name, "reward": learned, "taste": float(taste.hidden_taste(images).mean()),
            **evaluate.fidelity(clf, images, prompts), "diversity": diversity,
            "diversity_vs_teacher": diversity / evaluate.diversity(teacher_images, prompts),
            "mmd_to_teacher": evaluate.feature_mmd(clf, images, teacher_images),
            "pixel_distance_to_teacher": evaluate.mean_pixel_distance(images, teacher_images),
            "sample_seconds": seconds, "images": images.shape[0]}


# ---------------------------------------------------------------------------------------------------- the demo
def _check_out(out: Path, cfg: DemoConfig) -> None:
    saved = out / "demo_config.json"
    current = json.dumps(asdict(cfg), sort_keys=True)
    if saved.is_file():
        if json.loads(saved.read_text()) != json.loads(current):
            raise ConfigError(f"{out} holds a demo run with other settings ({saved}); choose another --out "
                              "or delete that folder")
    else:
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {out} exists and is not a folder")
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(saved, current)


def _reward_model(teacher: EDMDenoiser, gen1: dict[str, torch.Tensor], cfg: DemoConfig, out: Path
                  ) -> tuple[EDMDenoiser, PreferenceModel, dict[str, Any]]:
    """Stage 2: rate pairs of data and stage-1 generator images with the hidden taste, fit the preference model.
    Returns the stage-1 generator as a network, the model and its training record."""
    print("stage 2/3 reward modelling: rating pairs, training the preference model", file=sys.stderr, flush=True)
    net1 = copy.deepcopy(teacher)
    net1.load_state_dict(gen1)
    half = cfg.reward_images // 2
    real, _ = data.sample_batch(half, seed=cfg.seed + 77)
    fake_prompts = [data.all_prompts()[i % 96] for i in range(cfg.reward_images - half)]
    fake, _ = one_step(net1, fake_prompts, [5000 + i for i in range(len(fake_prompts))])
    reward_model, record = taste.fit_reward(torch.cat([real, fake]), cfg.reward_pairs, cfg.seed + 7,
                                            epochs=cfg.reward_epochs)
    reward_model.save(out / STAGE2 / REWARD_FILE, record)
    return net1, reward_model, record


Run = tuple[str, float]  # (method, alpha) of one stage-3 run


def _sweep(teacher: EDMDenoiser, cfg: DemoConfig, out: Path, reward_model: PreferenceModel,
           stage1: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]
           ) -> tuple[dict[Run, EDMDenoiser], dict[Run, Path]]:
    """Stage 3 from the stage-1 generator and TA: one DI++ run per alpha, one DI* run per DI* alpha; the
    generators and their run folders."""
    reward = PixelReward(reward_model, value_range=(-1.0, 1.0), name="preference")
    nets: dict[Run, EDMDenoiser] = {}
    dirs: dict[Run, Path] = {}
    runs = [("dipp", a) for a in cfg.alphas] + [("distar", a) for a in cfg.distar_alphas]
    for method, alpha in runs:
        run_dir = out / (f"stage3-alpha{alpha:g}" if method == "dipp" else f"stage3-distar-alpha{alpha:g}")
        gen, _, _ = _train(teacher, cfg, run_dir, cfg.sweep_steps, alpha, reward, stage1,
                           f"stage 3/3 {report.METHOD_NAMES[method]} alpha = {alpha:g}", method)
        net = copy.deepcopy(teacher)
        net.load_state_dict(gen)
        nets[method, alpha], dirs[method, alpha] = net, run_dir
    return nets, dirs


def _evaluate(teacher: EDMDenoiser, net1: EDMDenoiser, sweep_nets: dict[Run, EDMDenoiser], cfg: DemoConfig,
              clf: models.AttributeClassifier, reward_model: PreferenceModel, record: dict[str, Any]
              ) -> dict[str, Any]:
    """The teacher (many steps) and every generator (one step) on the evaluation prompts and seeds: the metrics."""
    print("report: sampling the teacher (many steps) and the generators (one step)", file=sys.stderr, flush=True)
    from tqdm.auto import tqdm

    prompts, seeds = eval_prompts(cfg)
    bar = tqdm(total=2 + len(sweep_nets), desc="evaluate", unit="sample set", file=sys.stderr, dynamic_ncols=True)
    t_images, t_sec = many_step(teacher, prompts, seeds, cfg)
    teacher_m = measure(f"teacher ({cfg.heun_steps}-step Heun, CFG {cfg.omega:g})", t_images, prompts, t_sec, clf,
                        reward_model, t_images)
    bar.update(1)
    images1, sec1 = one_step(net1, prompts, seeds)
    stage1_m = measure(f"DI stage 1 ({cfg.di_steps} steps)", images1, prompts, sec1, clf, reward_model, t_images)
    bar.update(1)
    sweep = []
    for (method, alpha), net in sweep_nets.items():
        images, sec = one_step(net, prompts, seeds)
        name = f"{report.METHOD_NAMES[method]} alpha = {alpha:g}" + (" (DI)" if (method, alpha) == ("dipp", 0)
                                                                     else "")
        sweep.append({"method": method, "alpha": alpha,
                      **measure(name, images, prompts, sec, clf, reward_model, t_images)})
        bar.update(1)
    bar.close()
    dipp_runs = [m for m in sweep if m["method"] == "dipp"]
    di = dict(next(m for m in dipp_runs if m["alpha"] == 0), name=f"DI (alpha = 0, +{cfg.sweep_steps} steps)")
    dipp = dict(next(m for m in dipp_runs if m["alpha"] == cfg.alpha), name=f"DI++ (alpha = {cfg.alpha:g})")
    nfe = 2 * cfg.heun_steps - 1
    return {
        "config": asdict(cfg), "teacher": teacher_m, "stage1": stage1_m, "di": di, "dipp": dipp,
        "sweep": sweep, "reward_model": record, "teacher_nfe": nfe * (2 if cfg.omega != 1 else 1),
        # the same images (prompts, seeds, batch): the whole Heun chain with CFG versus one network evaluation
        "speedup": t_sec / max(dipp["sample_seconds"], 1e-9),
        "reward_gain": dipp["reward"] - di["reward"],
        "fidelity_gap_to_teacher": teacher_m["attribute_accuracy"] - dipp["attribute_accuracy"],
        "diversity_floor": report.DIVERSITY_FLOOR,
        "diversity_floor_met": dipp["diversity_vs_teacher"] >= report.DIVERSITY_FLOOR,
    }


def _figures(teacher: EDMDenoiser, sweep_nets: dict[Run, EDMDenoiser], sweep_dirs: dict[Run, Path],
             cfg: DemoConfig, out: Path, metrics: dict[str, Any]) -> None:
    """grid.png (teacher, DI, DI++ on the grid prompts), curves.png and tradeoff.png."""
    grid_prompts = [p for p in GRID_PROMPTS for _ in range(2)]
    grid_seeds = [1 + i % 2 for i in range(len(grid_prompts))]
    rows = [(f"teacher\n{cfg.heun_steps}-step", many_step(teacher, grid_prompts, grid_seeds, cfg)[0]),
            ("DI\none-step", one_step(sweep_nets["dipp", 0.0], grid_prompts, grid_seeds)[0]),
            (f"DI++ α={cfg.alpha:g}\none-step",
             one_step(sweep_nets["dipp", cfg.alpha], grid_prompts, grid_seeds)[0])]
    report.grid(rows, out / "grid.png", grid_prompts, 2)
    report.curves(out / STAGE1, sweep_dirs, out / "curves.png")
    report.tradeoff(metrics, out / "tradeoff.png")


def run_demo(out: str | os.PathLike[str], cfg: DemoConfig, weights: str | os.PathLike[str] | None = None
             ) -> dict[str, Any]:
    """All three stages and the report; returns the metrics (also written to out/metrics.json)."""
    cfg.check()
    out = Path(out)
    teacher = models.load_teacher(weights)
    clf = models.load_classifier(weights)
    _check_out(out, cfg)
    torch.set_num_threads(cfg.threads)
    began = time.perf_counter()
    timing: dict[str, float] = {}

    t0 = time.perf_counter()  # stage 1: DI pre-training of the one-step generator
    gen1, ta1, _ = _train(teacher, cfg, out / STAGE1, cfg.di_steps, 0.0, None, None, "stage 1/3 DI pre-training")
    timing["stage1"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    net1, reward_model, record = _reward_model(teacher, gen1, cfg, out)
    timing["stage2"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    sweep_nets, sweep_dirs = _sweep(teacher, cfg, out, reward_model, (gen1, ta1))
    timing["stage3"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    metrics = _evaluate(teacher, net1, sweep_nets, cfg, clf, reward_model, record)
    _figures(teacher, sweep_nets, sweep_dirs, cfg, out, metrics)
    timing["report"] = time.perf_counter() - t0
    timing["total"] = time.perf_counter() - began
    metrics["timing"] = timing
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2))
    report.write_report(out, metrics)
    return metrics


if __name__ == "__main__":  # `python -m diffinstruct.tiny.demo ...` is `diffinstruct demo ...` (run/commands.py)
    from diffinstruct.cli import main

    raise SystemExit(main(["demo", *sys.argv[1:]]))
