"""A run's TOML file -> RunSpec: every section checked, with errors that name the section and key.

A run is described by a TOML file with the sections
  [run]     problem, steps, out_dir, checkpoint_every, keep, seed, eval_every, eval_samples, base_model,
            generator_init (a checkpoint or run directory whose EMA generator weights the generator starts from)
  [train]   DIConfig's fields (config.py), validated by DIConfig.from_dict
  [<problem>] the problem's own options, e.g. [toy2d] classes, s2, hidden, sigma_init
  [reward]  name = "none" | "target" (target = [x, y]) | "image" (spec = "0.5*pickscore+aesthetic@/path",
            models_dir = ...; only for problems whose samples are images); the names a problem supports
The command line's `train --reward SPEC` replaces the [reward] section with name = "image", spec = SPEC, and
`--init-generator PATH` sets [run] generator_init (apply_overrides).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import DIConfig
from ..errors import ConfigError
from .options import _toml_repr, _toml_type, check_section
from .plugins import load_plugin, problem_names
from .problems import PROBLEMS, REWARDS, Problem, takes_image_rewards
from .spec import RUN_OPTIONS, RunSpec, train_section_options


def _run_section(data: dict[str, Any]) -> tuple[dict[str, Any], Problem]:
    """The checked [run] section and the problem it names (that problem's plugin imported)."""
    if "run" not in data:
        raise ConfigError("missing section [run] (it needs at least problem, steps and out_dir)")
    run_table = data["run"]
    if isinstance(run_table, dict) and "problem" in run_table:
        problem_name = run_table["problem"]
        if not isinstance(problem_name, str):
            raise ConfigError(f"[run] problem must be a string, got {_toml_repr(problem_name)} "
                              f"({_toml_type(problem_name)})")
        load_plugin(problem_name)
        if problem_name not in PROBLEMS:
            raise ConfigError(f"[run] problem = {_toml_repr(problem_name)} is not valid; choose one of "
                              f"{', '.join(problem_names())}")
    run = check_section("run", run_table, RUN_OPTIONS)
    return run, PROBLEMS[run["problem"]]


def _train_config(train_table: Any, seed: int) -> DIConfig:
    checked = check_section("train", train_table, train_section_options())
    given = {k: checked[k] for k in train_table}
    given.setdefault("seed", seed)
    try:
        return DIConfig.from_dict(given)
    except ConfigError as exc:
        raise ConfigError(f"[train] {exc}") from None
    except TypeError as exc:
        raise ConfigError(f"[train] {exc}") from None


def _reward_section(data: dict[str, Any], problem: Problem) -> tuple[dict[str, Any], list[str]]:
    """The checked [reward] section (name first), and the reward names this problem allows."""
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
    options = check_section("reward", {k: v for k, v in reward_table.items() if k != "name"}, REWARDS[name].options)
    return {"name": name, **options}, allowed


def parse_config(data: dict[str, Any], source: str | None = None) -> RunSpec:
    """Validate a parsed TOML document; every error names the section and key, and what is allowed."""
    if not isinstance(data, dict):
        raise ConfigError("the config must be a TOML document with [run] and [train] sections")
    run, problem = _run_section(data)
    sections = ("run", "train", problem.name, "reward")
    unknown = sorted(set(data) - set(sections))
    if unknown:
        raise ConfigError(f"unknown section(s) {', '.join(f'[{u}]' for u in unknown)}; valid sections for "
                          f"problem {problem.name!r}: {', '.join(sections)}")
    train = _train_config(data.get("train", {}), run["seed"])
    problem_options = check_section(problem.name, data.get(problem.name, {}), problem.options)
    reward, allowed = _reward_section(data, problem)

    spec = RunSpec(problem=problem.name, steps=run["steps"], out_dir=Path(run["out_dir"]),
                   checkpoint_every=run["checkpoint_every"], keep=run["keep"], seed=run["seed"],
                   eval_every=run["eval_every"], eval_samples=run["eval_samples"], base_model=run["base_model"],
                   train=train, problem_options=problem_options, reward=reward, source=source,
                   generator_init=run["generator_init"])
    if train.alpha != 0.0 and reward["name"] == "none":
        raise ConfigError(f"[train] alpha = {train.alpha:g} needs a reward: set [reward] name to one of "
                          f"{', '.join(r for r in allowed if r != 'none') or '(none available)'}")
    kind = REWARDS[reward["name"]]
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
            load_plugin(name)
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
