"""The command line: one `diffinstruct` command (also `python -m diffinstruct`) with a subcommand per job.

    diffinstruct train  --config run.toml [--resume] [--steps N] [--no-progress]
                        [--reward SPEC [--models-dir DIR]] [--init-generator CHECKPOINT]
    diffinstruct sample --checkpoint DIR --out FILE [--n N] [--seed S] [--weights ema|generator]
    diffinstruct eval   --checkpoint DIR [--n N] [--seed S] [--weights ema|generator]        the problem's metrics
    diffinstruct eval   (--images DIR | --checkpoint DIR --prompts coco1k|hpsv2|FILE) [--metrics ...]
                                                                       reward statistics (`evaluate` is an alias)
    diffinstruct preference train --pairs FILE --out MODEL.safetensors | eval --model MODEL --pairs FILE
    diffinstruct embed  --model PIPELINE --prompts SET|FILE --out FILE.safetensors
    diffinstruct comfyui install|uninstall --comfyui /path/to/ComfyUI
    diffinstruct demo   [--out runs/demo] [--quick]
    diffinstruct convert IN.pth OUT.safetensors [--key KEY]
    diffinstruct build-weights --out DIR [--check]

This module only parses: each subcommand names its handler ("module:function", imported when that subcommand
runs, so `train` validates its config before torch is imported) and the exceptions that mean bad input. The old
module entry points (`python -m diffinstruct.rewards.preference`, `.hosts.diffusers_embed`, `.comfyui`,
`.tiny.demo`, `.rewards.convert`, `.tiny.build_weights`) run the same subcommand. Nothing in the package imports
this module; the run layer (diffinstruct.run) is the library API.

Exit status, the same for every subcommand:
    0    done
    2    bad usage or input: argparse errors, any errors.UsageError (a config value, a checkpoint that is missing
         or unusable, a reward's missing weights, a backend that cannot run here), or an input file the
         subcommand cannot read (its `usage` below)
    1    the work failed while running: any errors.RunFailure (training diverged), a check failed, an output
         could not be written (FAILURES and each subcommand's `failures`, reported as "error: ..."); anything
         unexpected also exits 1, with its traceback
    130  interrupted (Ctrl-C)
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .config import int_at_least

PACKAGE = __package__ or "diffinstruct"
USAGE, FAILURE, INTERRUPTED = 2, 1, 130
# bad usage or input for every subcommand ("module:Class"; a class whose module was never imported cannot be the
# exception, so checking one needs no import, and an error in `train`'s config never pulls in torch)
USAGE_ERRORS = (f"{PACKAGE}.errors:UsageError",)
# runtime failures every subcommand reports without a traceback, with a prefix for the message
FAILURES = {f"{PACKAGE}.errors:TrainingDiverged": "training diverged: ", f"{PACKAGE}.errors:RunFailure": ""}


@dataclass(frozen=True)
class Command:
    """A subcommand's handler ("module:function" taking the parsed arguments, returning the exit status) and the
    exceptions it adds to USAGE_ERRORS (status 2) and to FAILURES (status 1, no traceback)."""

    handler: str
    usage: tuple[str, ...] = ()
    failures: tuple[str, ...] = ()


_INPUT_FILES = ("builtins:FileNotFoundError", "builtins:ValueError")  # a named input is missing or malformed
COMMANDS: dict[str, Command] = {
    "train": Command(f"{PACKAGE}.run.commands:train"),
    "sample": Command(f"{PACKAGE}.run.commands:sample"),
    "eval": Command(f"{PACKAGE}.run.commands:evaluate"),
    "preference": Command(f"{PACKAGE}.rewards.preference:command", _INPUT_FILES, ("builtins:OSError",)),
    "embed": Command(f"{PACKAGE}.hosts.diffusers_embed:command"),
    "comfyui": Command(f"{PACKAGE}.comfyui:command", failures=("builtins:OSError",)),
    "demo": Command(f"{PACKAGE}.run.commands:demo", _INPUT_FILES, ("builtins:OSError",)),
    "convert": Command(f"{PACKAGE}.rewards.convert:command",
                       (*_INPUT_FILES, "builtins:KeyError", "_pickle:UnpicklingError"), ("builtins:Exception",)),
    "build-weights": Command(f"{PACKAGE}.tiny.build_weights:command", (),
                             ("builtins:OSError", "builtins:ValueError")),
}

_positive = int_at_least(1)
_non_negative = int_at_least(0)


def _train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train (or resume) a run described by a TOML file")
    p.add_argument("--config", required=True, help="the run's TOML file")
    p.add_argument("--resume", action="store_true",
                   help="continue from out_dir's latest complete checkpoint, skipping damaged ones with a "
                        "warning (from step 0 when there is none; exit status 2 when every one is damaged)")
    p.add_argument("--steps", type=_positive, default=None, help="override [run] steps (total, not additional)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--reward", default=None, metavar="SPEC",
                   help="image reward replacing the config's [reward], e.g. \"0.5*pickscore+aesthetic@/path\" "
                        "(terms [WEIGHT*]NAME[@PATH] joined by '+'; for problems whose samples are images)")
    p.add_argument("--models-dir", default=None, help="models folder for --reward's weights (default: "
                                                      "$DIFFINSTRUCT_MODELS_DIR or ComfyUI's models folder)")
    p.add_argument("--init-generator", default=None, metavar="PATH",
                   help="start the generator from this checkpoint's (or run directory's latest) EMA weights; "
                        "overrides [run] generator_init")


def _checkpoint_options(p: argparse.ArgumentParser, source: argparse._ActionsContainer, required: bool) -> None:
    """The options `sample` and `eval` share: which checkpoint (added to `source`) and weights, which seed."""
    source.add_argument("--checkpoint", required=required,
                        help="a step-NNNNNN directory, or a run directory (its latest checkpoint)")
    p.add_argument("--config", default=None,
                   help="the run's TOML file, when the checkpoint does not record its run config")
    p.add_argument("--seed", type=_non_negative, default=0, help="sampling seed")
    p.add_argument("--weights", choices=("ema", "generator"), default="ema",
                   help="which generator weights (default: the EMA)")


def _sample(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="generate samples from a checkpoint")
    _checkpoint_options(p, p, required=True)
    p.add_argument("--n", type=_positive, default=1000, help="number of samples")
    p.add_argument("--out", required=True, help="points file (.npy or .safetensors) or plot (.png); "
                                                "the other is written beside it")


def _eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", aliases=["evaluate"],
                       help="a checkpoint's own metrics, or reward statistics of images or of a generator over a "
                            "prompt set (with --images / --prompts; `evaluate` always means these)",
                       description="Without --images / --prompts / --metrics: the problem's own metrics of a "
                                   "checkpoint, as JSON. With them: every available reward metric of a folder of "
                                   "images, or of the checkpoint's images of a prompt set, as a table (or --json); "
                                   "metrics whose weights are missing are skipped with the reason.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", default=None, help="a folder of images (.png/.jpg/.webp) to score")
    _checkpoint_options(p, source, required=False)  # one of --images / --checkpoint
    p.add_argument("--n", type=_positive, default=None,
                   help="number of samples for the problem's metrics (default 1000); with --prompts: the first N "
                        "prompts only")
    p.add_argument("--out", default=None, help="also write the JSON report to this file")
    p.add_argument("--prompts", default=None,
                   help="with --checkpoint: coco1k, hpsv2, hpsv2:STYLE or a .txt/.json/.jsonl/.tsv file; with "
                        "--images: a .jsonl/.tsv mapping image names to prompts")
    p.add_argument("--metrics", default=None,
                   help="comma-separated reward specs (default all: imagereward, pickscore, hpsv2, aesthetic, clip, "
                        "brightness, saturation, color_match); a spec may weight and combine rewards, e.g. "
                        "0.5*pickscore+aesthetic@/path")
    p.add_argument("--models-dir", default=None, help="models folder holding rewards/<name>/ (default: "
                                                      "$DIFFINSTRUCT_MODELS_DIR or ComfyUI's models folder)")
    p.add_argument("--batch", type=_positive, default=16, help="images per batch")
    p.add_argument("--save-images", default=None, help="also save the generated images and prompts.jsonl here")
    p.add_argument("--device", default="cpu", help="torch device for the reward models (default cpu)")
    p.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    p.add_argument("--progress", action="store_true", help="show a progress bar")


def _preference(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("preference", help="train or evaluate a Bradley-Terry preference model",
                       description="Train / evaluate a Bradley-Terry preference model.")
    actions = p.add_subparsers(dest="cmd", required=True)
    tr = actions.add_parser("train", help="train from pairs and save as safetensors (+ .json)")
    tr.add_argument("--pairs", required=True, help="JSONL file, folder, or .safetensors tensors file")
    tr.add_argument("--out", required=True, help="output .safetensors path")
    tr.add_argument("--hidden", type=int, default=64)
    tr.add_argument("--epochs", type=int, default=200)
    tr.add_argument("--lr", type=float, default=1e-3)
    tr.add_argument("--weight-decay", type=float, default=1e-2)
    tr.add_argument("--batch-size", type=int, default=256)
    tr.add_argument("--val-fraction", type=float, default=0.1)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--size", type=int, default=64, help="resize image files to SIZE x SIZE (0: keep)")
    ev = actions.add_parser("eval", help="accuracy of a saved model on pairs")
    ev.add_argument("--model", required=True)
    ev.add_argument("--pairs", required=True)
    ev.add_argument("--size", type=int, default=64)


EMBED_DTYPES = ("float32", "bfloat16")  # hosts.diffusers_embed.DTYPES' names (that module imports torch)


def _embed(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("embed", help="write a prompt-embeddings file ([diffusers] embeddings) from a local "
                                     "pipeline's text encoders",
                       description="Write a prompt-embeddings file ([diffusers] embeddings) from a local pipeline's "
                                   "text encoder(s): SD1.5-style (unet/ + text_encoder/) and SDXL (unet/ + "
                                   "text_encoder/ + text_encoder_2/) pipelines.")
    p.add_argument("--model", required=True, help="local diffusers pipeline folder")
    p.add_argument("--prompts", action="append", required=True,
                   help="coco1k, hpsv2, hpsv2:STYLE, or a .txt/.json/.jsonl/.tsv prompt file (repeatable)")
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    p.add_argument("--kind", default="auto", choices=("auto", "unet", "pixart", "sd3"))
    p.add_argument("--dtype", default="float32", choices=EMBED_DTYPES)
    p.add_argument("--batch", type=_positive, default=16, help="prompts per text-encoder call")
    p.add_argument("--size", type=_positive, default=None,
                   help="SDXL only: image size in pixels for time_ids (default: the UNet's sample_size * 8)")
    p.add_argument("--device", default="cpu", help="torch device for the text encoders (cpu, cuda, ...)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _comfyui(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("comfyui", help="register (or remove) the nodes with a ComfyUI installation, or train a run "
                                       "exported from a ComfyUI graph (DI++ Export Run), also under torchrun",
                       description="Register the diffinstruct nodes with a ComfyUI installation (install, "
                                   "uninstall), or train a run exported by DI++ Export Run (train).")
    p.add_argument("action", choices=("install", "uninstall", "train"))
    p.add_argument("--comfyui", required=True, help="the ComfyUI folder (or its custom_nodes/ folder for install)")
    p.add_argument("--config", help="train: the run config DI++ Export Run wrote (.json)")
    p.add_argument("--out", help="train: folder for the checkpoints and the saved weights (e.g. models/loras/NAME)")
    p.add_argument("--custom-node", action="append", metavar="DIR",
                   help="train: a node pack folder the exported graph needs (repeatable)")
    p.add_argument("--steps", type=_positive, default=None, help="train: total steps (default: the exported ones)")


def _demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the tiny text-to-image demo (`make demo`): DI, reward model, DI++, report",
                       description="DI pre-training, reward modelling and DI++ alignment on the tiny text-to-image "
                                   "problem, with a report.")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--quick", action="store_true", help="reduced size (about a minute)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1)")
    p.add_argument("--di-steps", type=int, default=None, help="stage-1 DI steps")
    p.add_argument("--sweep-steps", type=int, default=None, help="stage-3 steps per alpha")
    p.add_argument("--alphas", default=None, help="comma-separated alphas of the sweep, including 0")
    p.add_argument("--alpha", type=float, default=None, help="the DI++ alpha shown in the grid (one of --alphas)")
    p.add_argument("--weights", default=None, help="folder with teacher/classifier weights (default: shipped)")


def _convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a pickled checkpoint to safetensors (weights_only)",
                       description="Convert a pickled checkpoint (.pt/.pth/.bin/.ckpt) to safetensors, reading it "
                                   "with torch.load(weights_only=True).")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--key", default=None, help="take the state dict from this top-level key (default: auto)")


def _build_weights(sub: argparse._SubParsersAction) -> None:
    # None: the default of tiny.build_weights.BuildConfig, filled in by the handler (that module imports torch)
    p = sub.add_parser("build-weights", help="retrain the tiny problem's shipped teacher and classifier",
                       description="Rebuild the tiny problem's shipped weights (teacher and attribute classifier) "
                                   "from scratch, deterministically.")
    p.add_argument("--out", required=True, help="folder for the rebuilt weights (never the shipped folder)")
    p.add_argument("--check", action="store_true", help="compare the rebuilt files with the shipped ones")
    p.add_argument("--teacher-steps", type=int, default=None, help="teacher training steps (default: shipped)")
    p.add_argument("--classifier-steps", type=int, default=None, help="classifier training steps (default: shipped)")
    p.add_argument("--seed", type=int, default=None, help="seed (default: shipped)")
    p.add_argument("--no-progress", action="store_true")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffinstruct", description="Diff-Instruct / DI++ / DI* training engine")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_train, _sample, _eval, _preference, _embed, _comfyui, _demo, _convert, _build_weights):
        add(sub)
    return parser


def _matches(exc: BaseException, names: Sequence[str]) -> bool:
    """isinstance against "module:Class" names, each only if its module was imported (so errors need no torch)."""
    for name in names:
        module, _, cls_name = name.partition(":")
        cls = getattr(sys.modules.get(module), cls_name, None)
        if isinstance(cls, type) and isinstance(exc, cls):
            return True
    return False


def _handler(name: str) -> Callable[[argparse.Namespace], int]:
    module, _, function = name.partition(":")
    return getattr(importlib.import_module(module), function)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status: 0 done, 1 failed while running, 2 bad usage or input, 130 interrupted."""
    args = make_parser().parse_args(argv)
    command = COMMANDS["eval" if args.command == "evaluate" else args.command]
    try:
        return int(_handler(command.handler)(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return INTERRUPTED
    except Exception as exc:
        if _matches(exc, (*USAGE_ERRORS, *command.usage)):
            print(f"error: {exc}", file=sys.stderr)
            return USAGE
        prefix = next((p for name, p in FAILURES.items() if _matches(exc, (name,))), None)
        if prefix is not None or _matches(exc, command.failures):
            print(f"error: {prefix or ''}{exc}", file=sys.stderr)
            return FAILURE
        raise
