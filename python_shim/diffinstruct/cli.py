"""Command line: ``python -m diffinstruct train | sample | eval | evaluate``.

    python -m diffinstruct train  --config run.toml [--resume] [--steps N] [--no-progress]
                                  [--reward SPEC [--models-dir DIR]] [--init-generator CHECKPOINT]
    python -m diffinstruct sample --checkpoint DIR --out FILE [--n N] [--seed S] [--weights ema|generator]
    python -m diffinstruct eval   --checkpoint DIR [--n N] [--seed S] [--weights ema|generator]
    python -m diffinstruct evaluate (--images DIR | --checkpoint DIR --prompts coco1k|hpsv2|FILE) [--metrics ...]

A run is described by a TOML file with the sections
  [run]     problem, steps, out_dir, checkpoint_every, keep, seed, eval_every, eval_samples, base_model,
            generator_init (a checkpoint or run directory whose EMA generator weights the generator starts from)
  [train]   DIConfig's fields (config.py), validated by DIConfig.from_dict
  [<problem>] the problem's own options, e.g. [toy2d] classes, s2, hidden, sigma_init
  [reward]  name = "none" | "target" (target = [x, y]) | "image" (spec = "0.5*pickscore+aesthetic@/path",
            models_dir = ...; only for problems whose samples are images); the names a problem supports
`train --reward SPEC` replaces the [reward] section with name = "image", spec = SPEC; `--init-generator PATH`
sets [run] generator_init. `evaluate` lives in evaluate.py.
The whole file is validated before any work starts; a bad value exits with status 2 and a message naming
the key and what is allowed. Problems live in PROBLEMS (register_problem), rewards in REWARDS, so a
"diffusers" problem plugs in without touching the parser or the loop.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from .config import ConfigError, DIConfig, int_at_least

REQUIRED: Any = object()
KIND_NAMES = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
              "floats": "a list of numbers", "table": "a table", "any": "a value"}


# ============================================================================================== option checking
@dataclass(frozen=True)
class Option:
    """One key of a config section: its kind, default (REQUIRED when none), range or choices, and help."""

    kind: str
    default: Any = REQUIRED
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    choices: tuple[str, ...] | None = None
    length: int | None = None
    nullable: bool = False
    help: str = ""


def _toml_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "table"
    return type(value).__name__


def _toml_repr(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_repr(v) for v in value) + "]"
    return repr(value)


def _check_value(where: str, value: Any, opt: Option) -> Any:
    """`value` converted to the option's kind, or ConfigError naming `where` (e.g. "[toy2d] hidden")."""
    if value is None and (opt.nullable or opt.default is None):
        return None
    if opt.kind == "any":
        return value
    bad = f"{where} must be {KIND_NAMES[opt.kind]}, got {_toml_repr(value)} ({_toml_type(value)})"
    if opt.kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(bad)
        return value
    if opt.kind == "str":
        if not isinstance(value, str):
            raise ConfigError(bad)
        if opt.choices is not None and value not in opt.choices:
            raise ConfigError(f"{where} = {_toml_repr(value)} is not valid; choose one of {', '.join(opt.choices)}")
        return value
    if opt.kind == "table":
        if not isinstance(value, dict):
            raise ConfigError(bad)
        return value
    if opt.kind == "floats":
        if not isinstance(value, list) or not all(isinstance(v, int | float) and not isinstance(v, bool)
                                                  for v in value):
            raise ConfigError(bad)
        if opt.length is not None and len(value) != opt.length:
            raise ConfigError(f"{where} must have {opt.length} numbers, got {len(value)}")
        if not all(math.isfinite(v) for v in value):
            raise ConfigError(f"{where} must hold finite numbers, got {value!r}")
        return [float(v) for v in value]
    if opt.kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(bad)
    elif opt.kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(bad)
        if not math.isfinite(value):
            raise ConfigError(f"{where} must be a finite number, got {value!r}")
        value = float(value)
    else:  # pragma: no cover - programming error in an option table
        raise ValueError(f"unknown option kind {opt.kind!r}")
    if opt.low is not None and (value <= opt.low if opt.open_low else value < opt.low):
        raise ConfigError(f"{where} = {value!r} must be {'>' if opt.open_low else '>='} {opt.low:g}")
    if opt.high is not None and value > opt.high:
        raise ConfigError(f"{where} = {value!r} must be <= {opt.high:g}")
    return value


def check_section(name: str, table: Any, options: dict[str, Option]) -> dict[str, Any]:
    """Validate one TOML table against its options: unknown keys, kinds, ranges, required keys; fills defaults."""
    if not isinstance(table, dict):
        raise ConfigError(f"[{name}] must be a table (a [{name}] section), got {_toml_type(table)}")
    unknown = sorted(set(table) - set(options))
    if unknown:
        raise ConfigError(f"[{name}] unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(options)}")
    out = {}
    for key, opt in options.items():
        if key not in table:
            if opt.default is REQUIRED:
                hint = f" ({opt.help})" if opt.help else ""
                raise ConfigError(f"[{name}] {key} is required{hint}")
            out[key] = opt.default
        else:
            out[key] = _check_value(f"[{name}] {key}", table[key], opt)
    return out


# ============================================================================================== registries
@dataclass
class Built:
    """What a problem builds for training or sampling."""

    models: Any  # trainer.Models
    prompts: Any  # prompts.PromptList
    reward: Any  # rewards.Reward | None
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RewardKind:
    """A reward selectable by [reward] name = ...; `build(options, spec)` returns a Reward (or None)."""

    name: str
    options: dict[str, Option]
    build: Callable[[dict[str, Any], RunSpec], Any]
    check: Callable[[dict[str, Any], RunSpec], None] | None = None


class Problem:
    """A training problem: its [<name>] options, and how to build, sample and evaluate it.

    Subclasses set `name`, `options`, `rewards` and implement the methods; `register_problem` adds one.
    Methods receive the validated RunSpec. `evaluate` and `sample` use the generator weights in place
    (the CLI loads EMA weights into them first).
    """

    name: str = ""
    options: dict[str, Option] = {}
    rewards: tuple[str, ...] = ("none",)

    def check(self, spec: RunSpec) -> None:
        """Cross-field checks (raise ConfigError); called before any work starts."""

    def data_numel(self, spec: RunSpec) -> int | None:
        """Elements per sample, for rewards whose options depend on it (None when unknown before building)."""
        return None

    def build(self, spec: RunSpec) -> Built:
        raise NotImplementedError

    def evaluate(self, built: Built, spec: RunSpec, n: int, seed: int) -> dict[str, Any]:
        raise NotImplementedError

    def sample(self, built: Built, spec: RunSpec, n: int, seed: int, points_path: Path,
               plot_path: Path | None) -> dict[str, Any]:
        raise NotImplementedError

    def image_reward(self, scorer: Any, spec: RunSpec) -> Any:
        """The trainer's Reward for an image scorer (images [B, 3, H, W] in [0, 1] + prompts -> [B], e.g. from
        rewards.load_spec). Problems whose samples are images override this (rewards.PixelReward for pixel-space
        generators, rewards.LatentToImageReward with a differentiable decoder for latent ones)."""
        raise ConfigError(f"problem {self.name!r} takes no image rewards (its samples are not images); its rewards: "
                          f"{', '.join(self.rewards)}")

    def generate_images(self, built: Built, spec: RunSpec, prompts: Sequence[str], seed: int) -> Any:
        """One image per prompt from the generator, a tensor [N, 3, H, W] in [0, 1] (for `evaluate`)."""
        raise ConfigError(f"problem {self.name!r} cannot generate images for prompts, so `evaluate --checkpoint` "
                          "does not apply to it; use `eval` for its own metrics")


def takes_image_rewards(problem: Problem) -> bool:
    """True when the problem overrides Problem.image_reward (its samples are images)."""
    return type(problem).image_reward is not Problem.image_reward


PROBLEMS: dict[str, Problem] = {}
REWARDS: dict[str, RewardKind] = {}

# Problems defined outside this module, imported on first use (they import torch and a host library).
PLUGINS: dict[str, str] = {"diffusers": f"{__package__}.hosts.diffusers"}


def _load_plugin(name: str) -> None:
    if name not in PROBLEMS and name in PLUGINS:
        import importlib

        importlib.import_module(PLUGINS[name])


def register_problem(problem: Problem) -> Problem:
    PROBLEMS[problem.name] = problem
    return problem


def register_reward(kind: RewardKind) -> RewardKind:
    REWARDS[kind.name] = kind
    return kind


# ============================================================================================== run spec
RUN_OPTIONS: dict[str, Option] = {
    "problem": Option("str", help="which problem to train, e.g. \"toy2d\""),
    "steps": Option("int", low=1, help="total training steps"),
    "out_dir": Option("str", help="directory for checkpoints and metrics (relative to the working directory)"),
    "checkpoint_every": Option("int", 100, low=1),
    "keep": Option("int", 3, low=0, help="newest checkpoints to keep; 0 keeps all"),
    "seed": Option("int", 0, low=0, help="model initialisation; also [train] seed unless that is set"),
    "eval_every": Option("int", 0, low=0, help="evaluate every N steps (0: never during training)"),
    "eval_samples": Option("int", 1000, low=1),
    "base_model": Option("str", "", help="free-form name of the base model, stored in checkpoints"),
    "generator_init": Option("str", "", help="a checkpoint or run directory (from `train`) whose EMA generator "
                                             "weights the generator starts from; empty: the problem's own init"),
}


def _train_options() -> dict[str, Option]:
    """Options of [train], derived from DIConfig's fields (kinds from their annotations; values by validate())."""
    simple = {"str": "str", "float": "float", "int": "int", "bool": "bool"}
    options = {}
    for f in dataclasses.fields(DIConfig):
        t = str(f.type).replace(" ", "")
        base = t.removesuffix("|None").removeprefix("None|")
        kind = simple.get(base, "table" if base.startswith("dict") else "any")
        options[f.name] = Option(kind, None, nullable="None" in t)
    return options


@dataclass
class RunSpec:
    """A validated run description (the TOML file, checked and with defaults filled)."""

    problem: str
    steps: int
    out_dir: Path
    checkpoint_every: int
    keep: int
    seed: int
    eval_every: int
    eval_samples: int
    base_model: str
    train: DIConfig
    problem_options: dict[str, Any]
    reward: dict[str, Any]
    source: str | None = None
    generator_init: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The TOML structure again (stored in checkpoints, so `sample`/`eval` need no config file)."""
        train = self.train.to_dict()
        if not train.get("extra"):
            train.pop("extra", None)
        return {
            "run": {"problem": self.problem, "steps": self.steps, "out_dir": str(self.out_dir),
                    "checkpoint_every": self.checkpoint_every, "keep": self.keep, "seed": self.seed,
                    "eval_every": self.eval_every, "eval_samples": self.eval_samples,
                    "base_model": self.base_model, "generator_init": self.generator_init},
            "train": {k: v for k, v in train.items() if v is not None},
            self.problem: dict(self.problem_options),
            "reward": dict(self.reward),
        }


def parse_config(data: dict[str, Any], source: str | None = None) -> RunSpec:
    """Validate a parsed TOML document; every error names the section and key, and what is allowed."""
    if not isinstance(data, dict):
        raise ConfigError("the config must be a TOML document with [run] and [train] sections")
    if "run" not in data:
        raise ConfigError("missing section [run] (it needs at least problem, steps and out_dir)")
    run_table = data["run"]
    if isinstance(run_table, dict) and "problem" in run_table:
        problem_name = run_table["problem"]
        if not isinstance(problem_name, str):
            raise ConfigError(f"[run] problem must be a string, got {_toml_repr(problem_name)} "
                              f"({_toml_type(problem_name)})")
        _load_plugin(problem_name)
        if problem_name not in PROBLEMS:
            raise ConfigError(f"[run] problem = {_toml_repr(problem_name)} is not valid; choose one of "
                              f"{', '.join([*PROBLEMS, *(p for p in PLUGINS if p not in PROBLEMS)])}")
    run = check_section("run", run_table, RUN_OPTIONS)
    problem = PROBLEMS[run["problem"]]
    sections = ("run", "train", problem.name, "reward")
    unknown = sorted(set(data) - set(sections))
    if unknown:
        raise ConfigError(f"unknown section(s) {', '.join(f'[{u}]' for u in unknown)}; valid sections for "
                          f"problem {problem.name!r}: {', '.join(sections)}")

    train_table = data.get("train", {})
    train_options = _train_options()
    checked = check_section("train", train_table, train_options)
    given = {k: checked[k] for k in train_table}
    given.setdefault("seed", run["seed"])
    try:
        train = DIConfig.from_dict(given)
    except ConfigError as exc:
        raise ConfigError(f"[train] {exc}") from None
    except TypeError as exc:
        raise ConfigError(f"[train] {exc}") from None

    problem_options = check_section(problem.name, data.get(problem.name, {}), problem.options)

    reward_table = data.get("reward", {"name": "none"})
    if not isinstance(reward_table, dict):
        raise ConfigError(f"[reward] must be a table, got {_toml_type(reward_table)}")
    name = reward_table.get("name", "none")
    if not isinstance(name, str):
        raise ConfigError(f"[reward] name must be a string, got {_toml_repr(name)} ({_toml_type(name)})")
    allowed = [r for r in problem.rewards if r in REWARDS]
    if takes_image_rewards(problem) and "image" not in allowed:
        allowed.append("image")
    if name not in allowed:
        raise ConfigError(f"[reward] name = {_toml_repr(name)} is not valid for problem {problem.name!r}; "
                          f"choose one of {', '.join(allowed)}")
    kind = REWARDS[name]
    reward = {"name": name, **check_section("reward", {k: v for k, v in reward_table.items() if k != "name"},
                                            kind.options)}

    spec = RunSpec(problem=problem.name, steps=run["steps"], out_dir=Path(run["out_dir"]),
                   checkpoint_every=run["checkpoint_every"], keep=run["keep"], seed=run["seed"],
                   eval_every=run["eval_every"], eval_samples=run["eval_samples"], base_model=run["base_model"],
                   train=train, problem_options=problem_options, reward=reward, source=source,
                   generator_init=run["generator_init"])
    if train.alpha != 0.0 and name == "none":
        raise ConfigError(f"[train] alpha = {train.alpha:g} needs a reward: set [reward] name to one of "
                          f"{', '.join(r for r in allowed if r != 'none') or '(none available)'}")
    if kind.check is not None:
        kind.check(reward, spec)
    problem.check(spec)
    return spec


def _load_toml(path: Path) -> dict[str, Any]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ImportError as exc:
            raise ConfigError("reading TOML needs Python >= 3.11 or the tomli package") from exc
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    if not path.is_file():
        raise ConfigError(f"config file {path} is not a file")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None


def apply_overrides(data: dict[str, Any], reward: str | None = None, models_dir: str | None = None,
                    generator_init: str | None = None) -> dict[str, Any]:
    """The parsed TOML with the command line's overrides: `reward` replaces [reward] by an image-reward spec,
    `generator_init` sets [run] generator_init. Problems that take no image rewards refuse `reward`."""
    data = dict(data)
    if models_dir is not None and reward is None:
        raise ConfigError("--models-dir applies to --reward; pass --reward SPEC too (or set [reward] models_dir)")
    if reward is not None:
        run = data.get("run")
        name = run.get("problem") if isinstance(run, dict) else None
        if isinstance(name, str):
            _load_plugin(name)
            if name in PROBLEMS and not takes_image_rewards(PROBLEMS[name]):
                raise ConfigError(f"--reward {reward!r}: problem {name!r} takes no image rewards (its samples are "
                                  f"not images); set [reward] to one of {', '.join(PROBLEMS[name].rewards)} instead")
        data["reward"] = {"name": "image", "spec": reward, **({"models_dir": models_dir} if models_dir else {})}
    if generator_init is not None:
        if not isinstance(data.get("run"), dict):
            raise ConfigError("missing section [run] (it needs at least problem, steps and out_dir)")
        data["run"] = {**data["run"], "generator_init": generator_init}
    return data


def load_config(path: str | Path, **overrides: Any) -> RunSpec:
    """The validated run of a TOML file; `overrides` as in apply_overrides (reward, models_dir, generator_init)."""
    p = Path(path)
    data = _load_toml(p)
    if any(v is not None for v in overrides.values()):
        data = apply_overrides(data, **overrides)
    return parse_config(data, source=str(p))


def build(spec: RunSpec) -> Built:
    return PROBLEMS[spec.problem].build(spec)


def build_reward(spec: RunSpec) -> Any:
    return REWARDS[spec.reward["name"]].build({k: v for k, v in spec.reward.items() if k != "name"}, spec)


def load_generator_init(spec: RunSpec, built: Built) -> Any:
    """Copies the EMA generator weights of the checkpoint [run] generator_init names into the generator.

    The checkpoint must come from a run of the same generator architecture (same problem options, memory mode and
    LoRA rank); anything else is refused with CheckpointError naming the mismatch. Returns the CheckpointInfo."""
    from . import checkpoint

    path = Path(spec.generator_init).expanduser()
    if not path.exists():
        raise ConfigError(f"[run] generator_init / --init-generator: {path} does not exist (expected a checkpoint "
                          "step-NNNNNN directory or a run directory written by `python -m diffinstruct train`)")
    try:
        return checkpoint.load_params(path, "ema", built.models.generator_params)
    except checkpoint.CheckpointError as exc:
        raise checkpoint.CheckpointError(f"[run] generator_init / --init-generator {path}: cannot start the "
                                         f"generator from it: {exc}") from None


def build_trainer(spec: RunSpec, rank: int = 0, world_size: int = 1,
                  init_generator: bool = True) -> tuple[Any, Built]:
    """rank / world_size: this process's place in a torchrun job (its random streams are keyed by rank).
    init_generator=False skips [run] generator_init (a resumed run restores its own weights instead)."""
    from .trainer import DITrainer

    built = build(spec)
    if spec.generator_init and init_generator:  # before the trainer exists, so its EMA starts there too
        built.extras["generator_init"] = str(load_generator_init(spec, built).path)
    return DITrainer(spec.train, built.models, built.prompts, reward=built.reward, rank=rank,
                     world_size=world_size), built


# ============================================================================================== built-in rewards
def _target_check(options: dict[str, Any], spec: RunSpec) -> None:
    n = PROBLEMS[spec.problem].data_numel(spec)
    if n is not None and len(options["target"]) != n:
        raise ConfigError(f"[reward] target must have {n} numbers (one per data element of problem "
                          f"{spec.problem!r}), got {len(options['target'])}")


def _target_build(options: dict[str, Any], spec: RunSpec) -> Any:
    import torch

    from .rewards import TargetReward

    return TargetReward(torch.tensor(options["target"], dtype=torch.float32))


def _image_check(options: dict[str, Any], spec: RunSpec) -> None:
    from .rewards.registry import check_spec

    try:
        check_spec(options["spec"])
    except ValueError as exc:
        raise ConfigError(f"[reward] spec = {options['spec']!r}: {exc}") from None
    if options["models_dir"] and not Path(options["models_dir"]).expanduser().is_dir():
        raise ConfigError(f"[reward] models_dir = {options['models_dir']!r} is not a directory")


def _image_build(options: dict[str, Any], spec: RunSpec) -> Any:
    from .rewards import RewardWeightsNotFound, load_spec

    try:
        scorer = load_spec(options["spec"], models_dir=options["models_dir"] or None)
    except (RewardWeightsNotFound, ValueError, NotImplementedError) as exc:
        raise ConfigError(f"[reward] spec = {options['spec']!r}: {exc}") from None
    return PROBLEMS[spec.problem].image_reward(scorer, spec)


register_reward(RewardKind("none", {}, lambda options, spec: None))
register_reward(RewardKind("image", {
    "spec": Option("str", help="reward spec, terms [WEIGHT*]NAME[@PATH] joined by '+', e.g. "
                               "\"0.5*pickscore+aesthetic@/weights/aes.safetensors\""),
    "models_dir": Option("str", "", help="models folder for reward weights (default: $DIFFINSTRUCT_MODELS_DIR or "
                                         "ComfyUI's)")}, _image_build, _image_check))
register_reward(RewardKind("target", {"target": Option("floats", help="the point samples are pulled to, e.g. "
                                                                        "[1.0, 1.0]")},
                           _target_build, _target_check))


# ============================================================================================== toy2d problem
class Toy2D(Problem):
    """The 2-D class-conditional Gaussian mixture of toy.py: exact reference, MLP generator and TA."""

    name = "toy2d"
    options = {
        "classes": Option("int", 4, low=1, high=1000),
        "s2": Option("float", 0.05, low=0.0, open_low=True, help="per-class variance"),
        "hidden": Option("int", 128, low=1, high=1 << 16),
        "sigma_init": Option("float", None, low=0.0, open_low=True, help="generator sigma_init (default 2.5)"),
    }
    rewards = ("none", "target")

    def check(self, spec: RunSpec) -> None:
        a, b = spec.problem_options["sigma_init"], spec.train.sigma_init
        if a is not None and b is not None and a != b:
            raise ConfigError(f"sigma_init is set in both [toy2d] ({a:g}) and [train] ({b:g}); set it in one place")

    def data_numel(self, spec: RunSpec) -> int:
        return 2

    def _sigma_init(self, spec: RunSpec) -> float:
        for v in (spec.problem_options["sigma_init"], spec.train.sigma_init):
            if v is not None:
                return float(v)
        return 2.5

    def build(self, spec: RunSpec) -> Built:
        from . import toy

        opts = spec.problem_options
        mixture = toy.GaussianMixture(toy.default_means(opts["classes"]), s2=opts["s2"])
        models = toy.build_models(mixture, hidden=opts["hidden"], seed=spec.seed, sigma_init=self._sigma_init(spec))
        return Built(models=models, prompts=toy.class_prompts(opts["classes"]), reward=build_reward(spec),
                     extras={"mixture": mixture})

    def _draw(self, built: Built, n: int, seed: int) -> tuple[Any, Any]:
        import torch

        from . import toy

        labels = torch.arange(n) % built.extras["mixture"].classes
        return toy.generate(built.models, labels, seed), labels

    def evaluate(self, built: Built, spec: RunSpec, n: int, seed: int) -> dict[str, Any]:
        import torch

        from . import toy

        mixture = built.extras["mixture"]
        x, labels = self._draw(built, n, seed)
        ref = mixture.sample(labels, generator=torch.Generator().manual_seed(seed + 1))
        ref2 = mixture.sample(labels, generator=torch.Generator().manual_seed(seed + 2))
        per_class = []
        for k in range(mixture.classes):
            sel = labels == k
            per_class.append(float((x[sel].mean(0) - mixture.means[k]).norm()) if bool(sel.any()) else math.nan)
        finite = [d for d in per_class if math.isfinite(d)]
        out: dict[str, Any] = {
            "mmd": toy.mmd(x, ref),
            "class_mean_distance": sum(finite) / len(finite) if finite else math.nan,
            "mmd_reference_floor": toy.mmd(ref2, ref),
            "per_class_mean_distance": per_class,
            "n": n,
        }
        if built.reward is not None:
            with torch.no_grad():
                prompts = [f"class {k}" for k in labels.tolist()]
                out["reward_mean"] = float(built.reward(x, prompts, labels).float().mean())
        return out

    def sample(self, built: Built, spec: RunSpec, n: int, seed: int, points_path: Path,
               plot_path: Path | None) -> dict[str, Any]:
        import numpy as np

        x, labels = self._draw(built, n, seed)
        points_path.parent.mkdir(parents=True, exist_ok=True)
        if points_path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file({"samples": x.detach().float().contiguous(), "labels": labels.contiguous()}, points_path,
                      metadata={"problem": self.name, "n": str(n), "seed": str(seed)})
        else:
            np.save(points_path, x.detach().float().numpy())
        result: dict[str, Any] = {"samples": str(points_path), "n": n, "seed": seed}
        if plot_path is not None:
            from .plotting import plot_samples

            mixture = built.extras["mixture"]
            import torch

            reference = mixture.sample(labels, generator=torch.Generator().manual_seed(seed + 1))
            target = spec.reward.get("target") if spec.reward["name"] == "target" else None
            plot_samples(x.numpy(), labels.numpy(), plot_path, means=mixture.means.numpy(), target=target,
                         reference=reference.numpy(), title=f"{spec.train.method}, alpha={spec.train.alpha:g}")
            result["plot"] = str(plot_path)
        return result


register_problem(Toy2D())


# ============================================================================================== commands
def _eval_fn(problem: Problem, built: Built, spec: RunSpec) -> Callable[[Any, int], dict[str, Any]]:
    from .runner import ema_weights

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


def cmd_train(args: argparse.Namespace) -> int:
    # everything is validated before torch is even imported
    spec = load_config(args.config, reward=args.reward, models_dir=args.models_dir, generator_init=args.init_generator)
    if args.steps is not None:
        spec.steps = args.steps
    from . import checkpoint, distributed, runner

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
        trainer, built = build_trainer(spec, rank=env.rank, world_size=env.world_size,
                                       init_generator=not resuming)
        distributed.wrap_trainer(trainer)  # DistributedDataParallel when world_size > 1; else nothing
        metadata = {"base_model": spec.base_model or problem.name, "problem": problem.name,
                    "run_config": spec.to_dict(), "config_file": spec.source}
        if env.world_size > 1:
            metadata["world_size"] = env.world_size  # effective batch = world_size * batch_size * grad_accum
        with _plain_warnings(checkpoint.CheckpointDamagedWarning):
            summary = runner.run(trainer, spec.steps, out, spec.checkpoint_every, resume=args.resume,
                                 keep=spec.keep, progress=not args.no_progress,
                                 eval_fn=_eval_fn(problem, built, spec) if spec.eval_every else None,
                                 eval_every=spec.eval_every, metadata=metadata)
    finally:
        distributed.cleanup(env)
    if env.is_main:
        print(json.dumps(summary, indent=2, allow_nan=False))
    return 0


def _spec_for_checkpoint(path: str, config: str | None) -> tuple[Path, RunSpec, dict[str, Any]]:
    from . import checkpoint

    ckpt = checkpoint.find_checkpoint(path)
    meta = checkpoint.read_meta(ckpt)
    if config is not None:
        return ckpt, load_config(config), meta
    run_config = meta.get("metadata", {}).get("run_config")
    if not isinstance(run_config, dict):
        raise ConfigError(f"{ckpt / checkpoint.META} records no run config (it was not written by "
                          "`python -m diffinstruct train`); pass --config with the run's TOML file")
    try:
        spec = parse_config(run_config, source=str(ckpt / checkpoint.META))
    except ConfigError as exc:
        raise ConfigError(f"the run config stored in {ckpt / checkpoint.META} is not valid here: {exc}") from None
    return ckpt, spec, meta


def _load_weights(args: argparse.Namespace) -> tuple[Path, RunSpec, dict[str, Any], Built]:
    from . import checkpoint

    ckpt, spec, meta = _spec_for_checkpoint(args.checkpoint, args.config)
    built = build(spec)
    checkpoint.load_params(ckpt, "ema" if args.weights == "ema" else "generator", built.models.generator_params)
    return ckpt, spec, meta, built


def cmd_sample(args: argparse.Namespace) -> int:
    out = Path(args.out)
    suffix = out.suffix.lower()
    if suffix == ".png":
        points, plot = out.with_suffix(".npy"), out
    elif suffix in (".npy", ".safetensors"):
        points, plot = out, out.with_suffix(".png")
    else:
        raise ConfigError(f"--out {out}: the name must end in .npy or .safetensors (points) or .png (plot)")
    ckpt, spec, meta, built = _load_weights(args)
    from .plotting import plotting_available

    if not plotting_available():
        print("warning: matplotlib is not installed; writing the points without a plot", file=sys.stderr)
        plot = None
    result = PROBLEMS[spec.problem].sample(built, spec, args.n, args.seed, points, plot)
    print(json.dumps({"checkpoint": str(ckpt), "step": meta.get("step"), "weights": args.weights, **result},
                     indent=2, allow_nan=False))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .metrics import jsonable

    ckpt, spec, meta, built = _load_weights(args)
    result = PROBLEMS[spec.problem].evaluate(built, spec, args.n, args.seed)
    report = {"checkpoint": str(ckpt), "step": meta.get("step"), "method": meta.get("method"),
              "alpha": meta.get("alpha"), "weights": args.weights, **result}
    text = json.dumps(jsonable(report), indent=2, allow_nan=False)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


_positive = int_at_least(1)
_non_negative = int_at_least(0)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m diffinstruct",
                                     description="Diff-Instruct / DI++ / DI* training engine")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train (or resume) a run described by a TOML file")
    train.add_argument("--config", required=True, help="the run's TOML file")
    train.add_argument("--resume", action="store_true",
                       help="continue from out_dir's latest complete checkpoint, skipping damaged ones with a "
                            "warning (from step 0 when there is none; exit status 2 when every one is damaged)")
    train.add_argument("--steps", type=_positive, default=None, help="override [run] steps (total, not additional)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("--reward", default=None, metavar="SPEC",
                       help="image reward replacing the config's [reward], e.g. \"0.5*pickscore+aesthetic@/path\" "
                            "(terms [WEIGHT*]NAME[@PATH] joined by '+'; for problems whose samples are images)")
    train.add_argument("--models-dir", default=None, help="models folder for --reward's weights (default: "
                                                          "$DIFFINSTRUCT_MODELS_DIR or ComfyUI's models folder)")
    train.add_argument("--init-generator", default=None, metavar="PATH",
                       help="start the generator from this checkpoint's (or run directory's latest) EMA weights; "
                            "overrides [run] generator_init")
    train.set_defaults(func=cmd_train)

    for name, func, helptext in (("sample", cmd_sample, "generate samples from a checkpoint"),
                                 ("eval", cmd_eval, "evaluate a checkpoint; prints JSON")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--checkpoint", required=True, help="a step-NNNNNN directory, or a run directory (latest)")
        p.add_argument("--config", default=None,
                       help="the run's TOML file, when the checkpoint does not record its run config")
        p.add_argument("--n", type=_positive, default=1000, help="number of samples")
        p.add_argument("--seed", type=_non_negative, default=0, help="sampling seed")
        p.add_argument("--weights", choices=("ema", "generator"), default="ema",
                       help="which generator weights (default: the EMA)")
        if name == "sample":
            p.add_argument("--out", required=True, help="points file (.npy or .safetensors) or plot (.png); "
                                                        "the other is written beside it")
        else:
            p.add_argument("--out", default=None, help="also write the JSON report to this file")
        p.set_defaults(func=func)

    from .evaluate import add_parser as add_evaluate

    add_evaluate(sub)
    return parser


def _is_instance(exc: BaseException, module: str, name: str) -> bool:
    """isinstance against a class of a module only if that module was imported (so errors need no torch)."""
    mod = sys.modules.get(module)
    cls = getattr(mod, name, None) if mod is not None else None
    return isinstance(cls, type) and isinstance(exc, cls)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status: 0 done, 1 training diverged, 2 bad usage/config, 130 interrupted."""
    args = make_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if isinstance(exc, ConfigError) or _is_instance(exc, f"{__package__}.checkpoint", "CheckpointError"):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if _is_instance(exc, f"{__package__}.trainer", "TrainingDiverged"):
            print(f"error: training diverged: {exc}", file=sys.stderr)
            return 1
        raise
