"""What `diffinstruct train | sample | eval | demo` do, given their parsed arguments (cli.py parses them).

Each returns the exit status (0); a bad config or input raises ConfigError or checkpoint.CheckpointError, which
the command line reports as `error: ...` with status 2, before any work starts wherever it can be checked then.
`eval` is one command for two reports: a checkpoint's own metrics (Problem.evaluate), or, with --images or
--prompts (or --metrics), reward statistics of images (scoring.py): a folder of images, or a generator's images
of a prompt set.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

from ..errors import ConfigError
from .builders import build_trainer
from .parse import load_config
from .problems import PROBLEMS, Built, Problem
from .spec import RunSpec
from .weights import load_weights

EVAL_SAMPLES = 1000  # `eval --checkpoint` without --n: samples for the problem's own metrics
# the options of `eval` that only reward statistics read, with their defaults (cli.py)
SCORING_ONLY = {"models_dir": None, "batch": 16, "save_images": None, "device": "cpu", "progress": False}


def _eval_fn(problem: Problem, built: Built, spec: RunSpec) -> Callable[[Any, int], dict[str, Any]]:
    from ..runner import ema_weights

    def evaluate(trainer: Any, completed: int) -> dict[str, Any]:
        with ema_weights(trainer):
            return problem.evaluate(built, spec, spec.eval_samples, spec.seed)

    return evaluate


@contextlib.contextmanager
def _plain_warnings(category: type[Warning]) -> Iterator[None]:
    """Show warnings of `category` as one "warning: ..." line each; Python's format adds a source line of ours
    that tells the user nothing (and reads like part of a traceback)."""
    with warnings.catch_warnings():
        shown = warnings.showwarning

        def show(message: Warning | str, cat: type[Warning], filename: str, lineno: int, file: TextIO | None = None,
                 line: str | None = None) -> None:
            if issubclass(cat, category):
                print(f"warning: {message}", file=sys.stderr, flush=True)
            else:
                shown(message, cat, filename, lineno, file, line)

        warnings.showwarning = show
        yield


def train(args: argparse.Namespace) -> int:
    # everything is validated before torch is even imported
    spec = load_config(args.config, reward=args.reward, models_dir=args.models_dir, generator_init=args.init_generator)
    if args.steps is not None:
        spec.steps = args.steps
    from .. import checkpoint, distributed, runner

    out = spec.out_dir
    # damaged checkpoints count: resuming either finds a usable one or stops (exit 2), never starts afresh
    resuming = args.resume and bool(checkpoint.checkpoint_dirs(out))
    if spec.generator_init and not resuming and not Path(spec.generator_init).expanduser().exists():
        raise ConfigError(f"[run] generator_init / --init-generator: {spec.generator_init} does not exist (expected "
                          "a checkpoint step-NNNNNN directory or a run directory written by `python -m diffinstruct "
                          "train`)")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"[run] out_dir {out} exists and is not a directory")
    if not args.resume and checkpoint.checkpoint_dirs(out):
        raise ConfigError(f"[run] out_dir {out} already holds a run (newest checkpoint "
                          f"{checkpoint.checkpoint_dirs(out)[-1][1].name}); pass --resume to continue it, "
                          "or choose another out_dir")
    problem = PROBLEMS[spec.problem]
    env = distributed.init_from_env()  # under torchrun: this rank of the job (gloo on the CPU)
    try:
        # data_parallel: DistributedDataParallel when world_size > 1; nothing otherwise
        trainer, built = build_trainer(spec, rank=env.rank, world_size=env.world_size,
                                       init_generator=not resuming, data_parallel=True)
        metadata = {"base_model": spec.base_model or problem.name, "problem": problem.name,
                    "run_config": spec.to_dict(), "config_file": spec.source}
        if env.world_size > 1:
            metadata["world_size"] = env.world_size  # effective batch = world_size * batch_size * grad_accum
        with _plain_warnings(checkpoint.CheckpointDamagedWarning):
            options = runner.RunOptions(spec.steps, out, spec.checkpoint_every, resume=args.resume, keep=spec.keep,
                                        eval_fn=_eval_fn(problem, built, spec) if spec.eval_every else None,
                                        eval_every=spec.eval_every, metadata=metadata)
            summary = runner.run(trainer, options, runner.ConsoleHooks(progress=not args.no_progress))
    finally:
        distributed.cleanup(env)
    if env.is_main:
        print(json.dumps(summary, indent=2, allow_nan=False))
    return 0


def sample(args: argparse.Namespace) -> int:
    out = Path(args.out)
    suffix = out.suffix.lower()
    if suffix == ".png":
        points, plot = out.with_suffix(".npy"), out
    elif suffix in (".npy", ".safetensors"):
        points, plot = out, out.with_suffix(".png")
    else:
        raise ConfigError(f"--out {out}: the name must end in .npy or .safetensors (points) or .png (plot)")
    ckpt, spec, meta, built = load_weights(args.checkpoint, args.config, args.weights)
    from ..plotting import plotting_available

    if not plotting_available():
        print("warning: matplotlib is not installed; writing the points without a plot", file=sys.stderr)
        plot = None
    result = PROBLEMS[spec.problem].sample(built, spec, args.n, args.seed, points, plot)
    print(json.dumps({"checkpoint": str(ckpt), "step": meta.get("step"), "weights": args.weights, **result},
                     indent=2, allow_nan=False))
    return 0


def evaluate(args: argparse.Namespace) -> int:
    """`eval` (and its old spelling `evaluate`, which always means reward statistics)."""
    scoring = args.command == "evaluate" or any(getattr(args, k) is not None for k in ("images", "prompts", "metrics"))
    if not scoring:
        given = [f"--{k.replace('_', '-')}" for k, default in SCORING_ONLY.items() if getattr(args, k) != default]
        if given:
            raise ConfigError(f"{', '.join(given)}: only for reward statistics (--images DIR, or --checkpoint with "
                              "--prompts); `eval --checkpoint` alone reports the problem's own metrics")
        return _problem_metrics(args)
    from ..atomic import write_text_atomic
    from ..metrics import jsonable
    from ..scoring import format_table

    rep = reward_statistics(args)
    text = json.dumps(jsonable(rep), indent=2, allow_nan=False)
    if args.out:
        write_text_atomic(Path(args.out), text + "\n")
    print(text if args.json else format_table(rep))
    return 0


def _problem_metrics(args: argparse.Namespace) -> int:
    from ..atomic import write_text_atomic
    from ..metrics import jsonable

    ckpt, spec, meta, built = load_weights(args.checkpoint, args.config, args.weights)
    n = EVAL_SAMPLES if args.n is None else args.n
    result = PROBLEMS[spec.problem].evaluate(built, spec, n, args.seed)
    report = {"checkpoint": str(ckpt), "step": meta.get("step"), "method": meta.get("method"),
              "alpha": meta.get("alpha"), "weights": args.weights, **result}
    text = json.dumps(jsonable(report), indent=2, allow_nan=False)
    if args.out:
        write_text_atomic(Path(args.out), text + "\n")
    print(text)
    return 0


def reward_statistics(args: argparse.Namespace) -> dict[str, Any]:
    """The reward-statistics report for parsed `eval` arguments with --images, or --checkpoint and --prompts."""
    from ..prompt_sets import PROMPT_SETS, image_items, load_prompts
    from ..scoring import METRICS, image_batches, load_metrics, report, score_batches

    metrics = "all" if args.metrics is None else args.metrics
    specs = [s.strip() for s in metrics.split(",") if s.strip()] if metrics != "all" else list(METRICS)
    if not specs:
        raise ConfigError("--metrics names no metric")
    opts: dict[str, Any] = {}
    if args.device != "cpu":
        opts["device"] = args.device
    if args.images is not None:
        if args.n is not None:
            raise ConfigError("--n applies to --checkpoint (a prompt set), not to --images")
        items = image_items(Path(args.images).expanduser(), args.prompts)
        have_prompts = any(it.prompt for it in items)
        source: dict[str, Any] = {"images": str(args.images), "n_images": len(items)}
    else:
        if args.prompts is None:
            raise ConfigError(f"--checkpoint needs --prompts (a prompt file, or one of {', '.join(PROMPT_SETS)}, "
                              f"hpsv2:STYLE)")
        items = load_prompts(args.prompts)
        if args.n is not None:
            items = items[:args.n]
        have_prompts = True
        source = {"prompts": args.prompts, "n_images": len(items)}
    scorers, skipped = load_metrics(specs, args.models_dir, have_prompts, **opts)
    if not scorers:
        raise ConfigError("no metric could be loaded: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    if args.images is not None:
        batches = image_batches(items, args.batch)
    else:
        save_dir = Path(args.save_images).expanduser() if args.save_images else None
        if save_dir is not None:
            save_dir.mkdir(parents=True, exist_ok=True)
        batches, info = _generated_batches(args, items, save_dir)
        source.update(info)
    if args.device != "cpu":
        batches = ((imgs.to(args.device), part) for imgs, part in batches)
    results = score_batches(scorers, batches, progress=args.progress, total=len(items))
    return report(results, skipped, **source)


def _generated_batches(args: argparse.Namespace, items: list[Any], save_dir: Path | None
                       ) -> tuple[Iterator[tuple[Any, list[Any]]], dict[str, Any]]:
    from ..scoring import save_png_atomic

    ckpt, spec, meta, built = load_weights(args.checkpoint, args.config, args.weights)
    problem = PROBLEMS[spec.problem]
    info = {"checkpoint": str(ckpt), "step": meta.get("step"), "weights": args.weights, "problem": spec.problem,
            "seed": args.seed}

    def gen() -> Iterator[tuple[Any, list[Any]]]:
        records = []
        for start in range(0, len(items), args.batch):
            part = items[start:start + args.batch]
            # seed + index of the first prompt: a prompt's image does not depend on --batch only if the problem
            # draws noise per sample from that seed; the default batch keeps runs comparable
            images = problem.generate_images(built, spec, [it.prompt for it in part], args.seed + start)
            if tuple(images.shape[1:2]) != (3,) or images.shape[0] != len(part):
                raise RuntimeError(f"problem {spec.problem!r} returned images of shape {tuple(images.shape)} for "
                                   f"{len(part)} prompts (expected [N, 3, H, W])")
            if save_dir is not None:
                for j, (img, it) in enumerate(zip(images, part, strict=True)):
                    name = f"{start + j:05d}.png"
                    save_png_atomic(img, save_dir / name)
                    records.append({"image": name, "prompt": it.prompt, "group": it.group})
            yield images, part
        if save_dir is not None:
            from ..atomic import write_text_atomic

            write_text_atomic(save_dir / "prompts.jsonl", "".join(json.dumps(r) + "\n" for r in records))

    return gen(), info


def demo(args: argparse.Namespace) -> int:
    """`diffinstruct demo` (`make demo`): the three stages on the tiny problem, then one summary line."""
    from dataclasses import replace

    from ..tiny.demo import QUICK, DemoConfig, run_demo

    cfg = QUICK if args.quick else DemoConfig()
    changes: dict[str, Any] = {}
    if args.alphas is not None:
        try:
            changes["alphas"] = tuple(float(a) for a in args.alphas.split(","))
        except ValueError:
            raise ConfigError(f"--alphas must be comma-separated numbers, got {args.alphas!r}") from None
    for key in ("threads", "di_steps", "sweep_steps", "alpha"):
        if getattr(args, key) is not None:
            changes[key] = getattr(args, key)
    cfg = replace(cfg, **changes).check()
    metrics = run_demo(args.out, cfg, args.weights)
    t, di, dipp = metrics["teacher"], metrics["di"], metrics["dipp"]
    print(f"reward (learned) DI {di['reward']:.2f} -> DI++ {dipp['reward']:.2f}; fidelity teacher "
          f"{t['attribute_accuracy']:.1f} %, DI {di['attribute_accuracy']:.1f} %, "
          f"DI++ {dipp['attribute_accuracy']:.1f} %; "
          f"one-step {metrics['speedup']:.0f}x faster; report: {Path(args.out) / 'report.md'}")
    return 0
