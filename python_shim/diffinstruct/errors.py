"""Every exception and warning the package raises on purpose, in one hierarchy.

    DiffInstructError
    ├── UsageError                 bad input the user can fix: the CLI exits 2, a ComfyUI node shows the message
    │   ├── ConfigError            (also ValueError) a configuration value; names the key and what is allowed
    │   │   └── RunDirError        an output folder that holds another run, or is ahead of `steps`
    │   ├── CheckpointError        (also RuntimeError) a checkpoint missing, unusable or not fitting the model
    │   │   ├── CheckpointDamaged  one file of a checkpoint is damaged (`file`, `reason`); resume skips it
    │   │   └── NoUsableCheckpoint every checkpoint of a run folder is damaged
    │   ├── RewardWeightsNotFound  (also FileNotFoundError) a reward's weight file or folder is missing
    │   ├── UnsupportedModel       (also TypeError) a MODEL of a kind the engine cannot train
    │   ├── InstallError           (also RuntimeError) a ComfyUI folder the pack cannot be installed into
    │   ├── PathNotAllowed         (also PermissionError) a node's path outside ComfyUI's folders
    │   └── BackendUnavailable     (also RuntimeError) a kernel backend asked for that cannot run here
    │       └── NoBackend          (also ImportError) no backend here can run an op
    └── RunFailure                 the work failed while running: the CLI exits 1 with the message, no traceback
        └── TrainingDiverged       (also RuntimeError) too many steps in a row produced non-finite values

    DiffInstructWarning (UserWarning)
    ├── CheckpointDamagedWarning   a damaged checkpoint was skipped for an older one
    ├── NoExtensionWarning         (also RuntimeWarning) the C extension is not built: kernels run on the reference
    └── CudaFallbackWarning        (also RuntimeWarning) CUDA tensors went to the reference

Each class keeps the builtin base it had before the hierarchy existed, so `except ValueError` and the like in
callers' code still catch what they caught. Argument checks of the kernel API raise plain TypeError/ValueError
naming the argument, as the C extension does, so both backends raise the same thing.

This module imports nothing: the CLI tests exceptions against it without pulling in torch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


class DiffInstructError(Exception):
    """Base of every error the package raises on purpose."""


class UsageError(DiffInstructError):
    """Bad usage or input the user can fix; the message says what and how."""


class RunFailure(DiffInstructError):
    """The work failed while running for a reason the message states in full (no traceback needed)."""


class ConfigError(UsageError, ValueError):
    """A configuration value is wrong; the message names the key and what is allowed."""


class RunDirError(ConfigError):
    """out_dir cannot be used as asked (it holds another run, or is ahead of `steps`)."""


class CheckpointError(UsageError, RuntimeError):
    """A checkpoint is missing, incomplete, corrupt, or does not fit the model; the message says which file."""


class CheckpointDamaged(CheckpointError):
    """One file of a checkpoint is missing, cut short, corrupt, or (meta.json) breaks the schema.

    Resuming skips such a checkpoint with a warning and takes an older one; `file` and `reason` say what is wrong.
    """

    def __init__(self, file: str | os.PathLike[str], reason: str) -> None:
        self.file = Path(file)
        self.reason = reason
        super().__init__(f"{self.file}: {reason}")

    def __reduce__(self) -> tuple[Any, ...]:  # picklable although __init__ takes two arguments
        return type(self), (self.file, self.reason)


class NoUsableCheckpoint(CheckpointError):
    """A run directory holds checkpoints, but every one of them is damaged."""


class RewardWeightsNotFound(UsageError, FileNotFoundError):
    """A reward's weight file or folder is missing; the message names the path and where to put the files."""


class UnsupportedModel(UsageError, TypeError):
    """The MODEL is of a kind the engine cannot train; the message names what is supported."""


class InstallError(UsageError, RuntimeError):
    """The ComfyUI folder is not usable; the message says why."""


class PathNotAllowed(UsageError, PermissionError):
    """A path a ComfyUI node would write or read lies outside the folders ComfyUI allows; the message names the
    input, the folders allowed and the opt-in."""


class BackendUnavailable(UsageError, RuntimeError):
    """A backend was asked for (use_backend, DIPP_BACKEND) that cannot run here, or none can run an op."""


class NoBackend(BackendUnavailable, ImportError):
    """No backend here can run an op (e.g. a host-side table without the C extension). An ImportError
    too: before the registry, calling into the missing extension raised one."""


class TrainingDiverged(RunFailure, RuntimeError):
    """Too many steps in a row produced non-finite values."""


class DiffInstructWarning(UserWarning):
    """Base of every warning the package issues."""


class CheckpointDamagedWarning(DiffInstructWarning):
    """A damaged checkpoint was skipped in favour of an older one."""


class NoExtensionWarning(DiffInstructWarning, RuntimeWarning):
    """The C extension is not built: every kernel runs on the (slower) PyTorch reference."""


class CudaFallbackWarning(DiffInstructWarning, RuntimeWarning):
    """A CUDA tensor went to the PyTorch reference because no CUDA kernels were built."""
