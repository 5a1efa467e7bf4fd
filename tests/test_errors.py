"""The package's one exception hierarchy (diffinstruct.errors) and the CLI's exit status built on it."""

import ast
import inspect
from pathlib import Path

import pytest

import diffinstruct
from diffinstruct import cli, errors

PACKAGE = Path(diffinstruct.__file__).parent
# the builtin bases each class had before the hierarchy: callers' `except ValueError` etc. must still catch them
BUILTIN_BASES = {
    "ConfigError": ValueError, "RunDirError": ValueError, "CheckpointError": RuntimeError,
    "CheckpointDamaged": RuntimeError, "NoUsableCheckpoint": RuntimeError,
    "RewardWeightsNotFound": FileNotFoundError, "UnsupportedModel": TypeError, "InstallError": RuntimeError,
    "BackendUnavailable": RuntimeError, "NoBackend": ImportError, "TrainingDiverged": RuntimeError,
    "NoExtensionWarning": RuntimeWarning, "CudaFallbackWarning": RuntimeWarning,
    "CheckpointDamagedWarning": UserWarning,
}


def _classes() -> dict[str, type]:
    return {n: c for n, c in vars(errors).items() if inspect.isclass(c) and c.__module__ == errors.__name__}


def test_every_class_is_in_the_hierarchy_and_keeps_its_builtin_base():
    classes = _classes()
    assert set(BUILTIN_BASES) <= set(classes)
    for name, cls in classes.items():
        assert issubclass(cls, (errors.DiffInstructError, errors.DiffInstructWarning)), name
    for name, base in BUILTIN_BASES.items():
        assert issubclass(classes[name], base), name


def test_no_exception_class_is_defined_outside_errors():
    """A new exception goes into errors.py (private helpers, named _X, excepted)."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                bases = {getattr(b, "id", getattr(b, "attr", "")) for b in node.bases}
                if any(b.endswith(("Error", "Exception", "Warning")) for b in bases):
                    offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}")
    assert offenders == []


def test_old_import_paths_still_work():
    from diffinstruct import checkpoint, config, kernels, rewards, trainer

    assert config.ConfigError is errors.ConfigError
    assert checkpoint.CheckpointError is errors.CheckpointError
    assert trainer.TrainingDiverged is errors.TrainingDiverged
    assert rewards.RewardWeightsNotFound is errors.RewardWeightsNotFound
    assert kernels.BackendUnavailable is errors.BackendUnavailable


@pytest.mark.parametrize("exc, status", [
    (errors.ConfigError("steps: bad"), cli.USAGE),
    (errors.NoUsableCheckpoint("all damaged"), cli.USAGE),
    (errors.RewardWeightsNotFound("no file"), cli.USAGE),
    (errors.BackendUnavailable("no cuda"), cli.USAGE),
    (errors.TrainingDiverged("nan"), cli.FAILURE),
    (errors.RunFailure("broke"), cli.FAILURE),
])
def test_cli_exit_status_follows_the_hierarchy(monkeypatch, capsys, exc, status):
    from diffinstruct.run import commands

    def boom(args):
        raise exc

    monkeypatch.setattr(commands, "sample", boom)
    assert cli.main(["sample", "--checkpoint", "x", "--out", "y.png"]) == status
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(exc) in err and "Traceback" not in err


def test_cli_lets_unexpected_errors_through():
    from diffinstruct.run import commands

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(commands, "sample", lambda args: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            cli.main(["sample", "--checkpoint", "x", "--out", "y.png"])
