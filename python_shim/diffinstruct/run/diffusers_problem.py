"""The "diffusers" problem: a local diffusers model (SD1.5/SDXL UNet, PixArt-alpha, SD3) trained on precomputed
prompt embeddings, and its "latent_target" reward.

This module imports torch and the diffusers host, so the run layer imports it only when a config names
[run] problem = "diffusers" (problems.PLUGINS); importing it registers the problem and the reward kind.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import kernels
from ..errors import ConfigError
from ..hosts.diffusers.adapters import (
    attention_and_conv_target,
    attention_target,
    host_model,
    set_gradient_checkpointing,
)
from ..hosts.diffusers.conditioning import _stack
from ..hosts.diffusers.embeddings import load_prompt_embeddings
from ..hosts.diffusers.layout import CONFIG_NAME, KINDS, WEIGHT_NAMES, _config_for_file, _read_json
from ..hosts.diffusers.loading import detect_kind, load_denoiser, resolve_model_path
from ..hosts.diffusers.vae import VAEDecoder, find_vae, load_vae, resolve_vae_path, split_vae_spec
from .builders import build_reward
from .options import Option
from .problems import Built, Problem, RewardKind, register_problem, register_reward
from .spec import RunSpec

DTYPES = ("float32", "bfloat16", "float16")
LORA_TARGETS: dict[str, Callable[[str, nn.Module], bool] | None] = {
    "attention_conv": attention_and_conv_target, "attention": attention_target, "all": None}


class DiffusersProblem(Problem):
    """A local diffusers model (SD1.5/SDXL UNet, PixArt-alpha, SD3) with precomputed prompt embeddings.

    [diffusers] model = a local pipeline folder, unet/transformer folder, or .safetensors file (+ config);
    embeddings = a .safetensors file from save_prompt_embeddings holding every training prompt and
    the null prompt "" (the CFG unconditional). Latents are channels x latent_size x latent_size.

    Image rewards (`train --reward SPEC`, [reward] name = "image") and `eval --checkpoint --prompts` decode the
    latents with a frozen VAE (VAEDecoder): [diffusers] vae = an AutoencoderKL folder or .safetensors file
    (+ config.json), or "taesd:PATH" for a TAESD (AutoencoderTiny) folder; by default the vae/ folder beside
    the model (<pipeline>/vae/). It runs in the run's dtype (float32 for a float16 run when its config sets
    force_upcast), optionally with gradient checkpointing. There is no text encoder here: every prompt is
    conditioned by its entry in `embeddings`, so `eval --checkpoint --prompts` needs the prompt set's
    conditioning in that file too.
    """

    name = "diffusers"
    options = {
        "model": Option("str", help="local path: a diffusers pipeline folder, a unet/ or transformer/ folder, "
                                    "or a .safetensors file in diffusers layout with its config.json"),
        "embeddings": Option("str", help="prompt conditioning written by "
                                         "diffinstruct.hosts.diffusers.save_prompt_embeddings, with the null "
                                         "prompt \"\""),
        "kind": Option("str", "auto", choices=("auto", *KINDS)),
        "config": Option("str", "", help="config.json of a single-file model (default: found beside it)"),
        "scheduler": Option("str", "", help="scheduler_config.json or its folder (default: found beside the "
                                            "model)"),
        "mode": Option("str", "shared", choices=("shared", "full")),
        "lora_rank": Option("int", 16, low=1, high=4096),
        "lora_targets": Option("str", "attention_conv", choices=tuple(LORA_TARGETS)),
        "dtype": Option("str", "float32", choices=DTYPES),
        "gradient_checkpointing": Option("bool", False),
        "latent_size": Option("int", 64, low=1, high=1024, help="latent height and width (pixels / 8)"),
        "sigma_init": Option("float", None, low=0.0, open_low=True, help="generator sigma_init (default 2.5, "
                                                                         "or just under 1 for SD3)"),
        "vae": Option("str", "", help="VAE for image rewards and `eval --prompts`: a diffusers AutoencoderKL folder or "
                                      ".safetensors file (+ config.json), or taesd:PATH for a TAESD "
                                      "(AutoencoderTiny) folder; default: the vae/ folder beside the model"),
        "vae_gradient_checkpointing": Option("bool", False, help="recompute the VAE decoder's blocks in the "
                                                                 "reward's backward pass (less memory)"),
    }
    rewards = ("none", "latent_target")

    def check(self, spec: RunSpec) -> None:
        if importlib.util.find_spec("diffusers") is None:
            raise ConfigError("[run] problem = \"diffusers\" needs the diffusers package (pip install diffusers)")
        opts = spec.problem_options
        for key in ("model", "embeddings"):
            if not Path(opts[key]).expanduser().exists():
                raise ConfigError(f"[diffusers] {key} = {opts[key]!r}: {Path(opts[key]).expanduser()} does not "
                                  "exist (only local files are used; nothing is downloaded)")
        for key in ("config", "scheduler"):
            if opts[key] and not Path(opts[key]).expanduser().exists():
                raise ConfigError(f"[diffusers] {key} = {opts[key]!r} does not exist")
        a, b = opts["sigma_init"], spec.train.sigma_init
        if a is not None and b is not None and a != b:
            raise ConfigError(f"sigma_init is set in both [diffusers] ({a:g}) and [train] ({b:g}); set it in "
                              "one place")
        if opts["vae"]:
            self._vae_location(spec)  # a VAE that is named must exist, even when nothing uses it yet
        if spec.reward["name"] == "image":
            self._need_vae(spec, "an image reward (--reward / [reward] name = \"image\")")

    def _vae_location(self, spec: RunSpec) -> tuple[Path, bool] | None:
        """(VAE path, is TAESD) from [diffusers] vae, or the vae/ folder beside the model; None when neither."""
        opts = spec.problem_options
        if opts["vae"]:
            raw, tiny = split_vae_spec(opts["vae"])
            if not raw.strip():
                raise ConfigError(f"[diffusers] vae = {opts['vae']!r} names no path")
            path = Path(raw).expanduser()
        else:
            found = find_vae(opts["model"])
            if found is None:
                return None
            path, tiny = found, False
        try:
            _, file = resolve_vae_path(path)
            if file is not None:
                _config_for_file(file, None)  # a single file's config.json must be there too
        except (FileNotFoundError, ValueError) as exc:
            where = f"[diffusers] vae = {opts['vae']!r}" if opts["vae"] else f"the VAE beside the model ({path})"
            raise ConfigError(f"{where}: {exc}") from None
        return path, tiny

    def _need_vae(self, spec: RunSpec, why: str) -> tuple[Path, bool]:
        location = self._vae_location(spec)
        if location is None:
            model = Path(spec.problem_options["model"]).expanduser()
            raise ConfigError(f"{why} scores decoded images, so it needs the model's VAE: set [diffusers] vae = "
                              f"\"/path/to/vae\" (a diffusers AutoencoderKL folder with {CONFIG_NAME} + "
                              f"{WEIGHT_NAMES[0]}, or taesd:/path for a TAESD folder), or put that folder at "
                              f"{(model.parent if model.is_file() else model) / 'vae'} (none was found there)")
        return location

    def _decoder(self, spec: RunSpec, why: str) -> VAEDecoder:
        """The frozen VAE decode of this run: its dtype, on the model's latents (channel count checked)."""
        path, tiny = self._need_vae(spec, why)
        opts = spec.problem_options
        try:
            vae = load_vae(path, tiny=tiny)  # float32 as stored; cast below, once
        except (FileNotFoundError, ValueError) as exc:
            raise ConfigError(f"[diffusers] vae {path}: {exc}") from None
        dtype = getattr(torch, opts["dtype"])
        if dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
            dtype = torch.float32  # this VAE overflows in float16 (SDXL's): its config says to upcast
        nn.Module.to(vae, dtype)
        decoder = VAEDecoder(vae, gradient_checkpointing=opts["vae_gradient_checkpointing"])
        channels = self._channels(spec)
        if channels is not None and channels != decoder.latent_channels:
            raise ConfigError(f"[diffusers] vae {path} decodes {decoder.latent_channels}-channel latents, but the "
                              f"model's latents have {channels} channels; use the VAE of this model family")
        return decoder

    def image_reward(self, scorer: Any, spec: RunSpec) -> Any:
        """rewards.LatentToImageReward: the scorer on the VAE-decoded generator latents (prompts go to it)."""
        from ..rewards import LatentToImageReward

        decoder = self._decoder(spec, "an image reward (--reward / [reward] name = \"image\")")
        if isinstance(scorer, nn.Module):
            scorer.requires_grad_(False).eval()
        return LatentToImageReward(decoder, scorer, str(getattr(scorer, "name", "") or spec.reward["spec"]))

    def generate_images(self, built: Built, spec: RunSpec, prompts: Sequence[str], seed: int) -> Any:
        """One image per prompt, [N, 3, H, W] in [0, 1]: the generator on each prompt's conditioning from
        [diffusers] embeddings (this problem has no text encoder), then the VAE decode. Sample i's noise is
        drawn from seed + i, so a prompt's image does not depend on the batching."""
        decoder = built.extras.get("vae_decoder")
        if decoder is None:
            decoder = built.extras["vae_decoder"] = self._decoder(spec, "`eval --checkpoint --prompts`")
        table = built.extras["embeddings"]
        missing = [p for p in prompts if p not in table]
        if missing:
            raise ConfigError(f"{len(missing)} of {len(prompts)} prompts (e.g. {missing[0]!r}) have no "
                              f"conditioning in [diffusers] embeddings = {spec.problem_options['embeddings']!r}: "
                              "this problem has no text encoder and conditions on those precomputed embeddings; "
                              "add the evaluation prompts to that file (save_prompt_embeddings), or evaluate on "
                              "a prompt file (--prompts FILE) holding its prompts")
        models = built.models
        z = torch.stack([_normal(models.latent_shape, seed + i) for i in range(len(prompts))])
        for module in models.modules:
            module.eval()
        with torch.no_grad():
            x0 = models.generator(z, _stack([table[p] for p in prompts])).float()
        return decoder.images(x0).cpu()

    def _channels(self, spec: RunSpec) -> int | None:
        opts = spec.problem_options
        try:
            kind = detect_kind(opts["model"], opts["config"] or None) if opts["kind"] == "auto" else opts["kind"]
            p = Path(opts["model"]).expanduser()
            if p.is_file():
                cfg = _config_for_file(p, opts["config"] or None)
            else:
                folder, _ = resolve_model_path(p, kind)
                cfg = _read_json(folder / CONFIG_NAME)
            return int(cfg.get("in_channels", 4))
        except (OSError, ValueError):
            return None

    def data_numel(self, spec: RunSpec) -> int | None:
        channels = self._channels(spec)
        return None if channels is None else channels * spec.problem_options["latent_size"] ** 2

    def build(self, spec: RunSpec) -> Built:
        from ..engine import assemble
        from ..prompts import PromptList

        opts = spec.problem_options
        denoiser = load_denoiser(opts["model"], opts["kind"], config=opts["config"] or None,
                                 scheduler=opts["scheduler"] or None, dtype=getattr(torch, opts["dtype"]))
        if opts["gradient_checkpointing"] and not set_gradient_checkpointing(denoiser, True):
            raise ConfigError("[diffusers] gradient_checkpointing = true, but this model does not support it")
        channels = int(host_model(denoiser).config.in_channels)
        shape = (channels, opts["latent_size"], opts["latent_size"])
        sigma_init = opts["sigma_init"] if opts["sigma_init"] is not None else spec.train.sigma_init
        # LoRA's random init from [run] seed: runs are reproducible
        models = assemble(denoiser, shape, mode=opts["mode"], rank=opts["lora_rank"], sigma_init=sigma_init,
                          target=LORA_TARGETS[opts["lora_targets"]], seed=spec.seed)
        table = load_prompt_embeddings(opts["embeddings"])
        if "" not in table:
            raise ConfigError(f"[diffusers] embeddings {opts['embeddings']} has no null prompt \"\" (needed as the "
                              "unconditional conditioning)")
        prompts = PromptList([p for p in table if p.strip()], encode=table.__getitem__, null="")
        reward = build_reward(spec)
        decoder = getattr(reward, "decode", None)
        return Built(models=models, prompts=prompts, reward=reward,
                     extras={"denoiser": denoiser, "latent_shape": shape, "embeddings": table,
                             "vae_decoder": decoder if isinstance(decoder, VAEDecoder) else None})

    def _generate(self, built: Built, spec: RunSpec, n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
        models = built.models
        prompts = built.prompts.prompts
        chosen = [prompts[i % len(prompts)] for i in range(n)]
        z = torch.empty((n, *models.latent_shape), dtype=torch.float32)
        kernels.fill_normal(z, seed)
        out = []
        for module in models.modules:
            module.eval()
        with torch.no_grad():
            for start in range(0, n, spec.train.batch_size):
                part = chosen[start : start + spec.train.batch_size]
                cond = _stack([built.prompts.conditioning(p) for p in part])
                out.append(models.generator(z[start : start + len(part)], cond).float())
        return torch.cat(out), chosen

    def evaluate(self, built: Built, spec: RunSpec, n: int, seed: int) -> dict[str, Any]:
        x, chosen = self._generate(built, spec, n, seed)
        result: dict[str, Any] = {"n": n, "latent_mean": float(x.mean()), "latent_std": float(x.std()),
                                  "finite_fraction": float(torch.isfinite(x).float().mean())}
        if built.reward is not None:
            with torch.no_grad():
                cond = _stack([built.prompts.conditioning(p) for p in chosen])
                result["reward_mean"] = float(built.reward(x, chosen, cond).float().mean())
        return result

    def sample(self, built: Built, spec: RunSpec, n: int, seed: int, points_path: Path,
               plot_path: Path | None) -> dict[str, Any]:
        x, chosen = self._generate(built, spec, n, seed)
        points_path.parent.mkdir(parents=True, exist_ok=True)
        if points_path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file({"latents": x.contiguous()}, str(points_path),
                      metadata={"problem": self.name, "prompts": json.dumps(chosen), "seed": str(seed)})
        else:
            np.save(points_path, x.numpy())
        result: dict[str, Any] = {"samples": str(points_path), "n": n, "seed": seed}
        if plot_path is None:
            result["note"] = "latents; no preview image was asked for"
            return result
        if self._vae_location(spec) is None:
            result["note"] = ("latents; no decoded preview (set [diffusers] vae, or put the model's vae/ folder "
                              "beside it, for a PNG grid of the decoded images)")
            return result
        from ..scoring import save_png_atomic

        decoder = built.extras.get("vae_decoder")
        if decoder is None:
            decoder = built.extras["vae_decoder"] = self._decoder(spec, "`sample`'s decoded preview")
        shown = decoder.images(x[:16])
        plot_path.parent.mkdir(parents=True, exist_ok=True)
        save_png_atomic(_grid(shown, columns=4), plot_path)
        result["plot"] = str(plot_path)
        result["note"] = (f"latents; {plot_path.name} shows the first {len(shown)} decoded with the VAE, "
                          "4 per row")
        return result



PROBLEM = DiffusersProblem()
register_problem(PROBLEM)


def latent_target(options: dict[str, Any], spec: RunSpec) -> Any:
    """[reward] name = "latent_target": every latent element pulled to `value` (a reward with no model)."""
    from ..rewards import TargetReward

    channels = PROBLEM._channels(spec)
    if channels is None:
        raise ConfigError(f"[reward] latent_target: cannot read the channel count of "
                          f"{spec.problem_options['model']}")
    size = spec.problem_options["latent_size"]
    return TargetReward(torch.full((channels, size, size), float(options["value"])))


register_reward(RewardKind("latent_target", {"value": Option("float", 0.0, help="every latent element's target")},
                           latent_target))


def _normal(shape: Sequence[int], seed: int) -> torch.Tensor:
    z = torch.empty(tuple(shape), dtype=torch.float32)
    kernels.fill_normal(z, seed)
    return z


def _grid(images: torch.Tensor, columns: int) -> torch.Tensor:
    """[N, 3, H, W] -> one image [3, rows * H, columns * W], row-major, empty cells black."""
    n, c, h, w = images.shape
    cols = min(columns, n)
    rows = -(-n // cols)
    canvas = images.new_zeros((rows * cols, c, h, w))
    canvas[:n] = images
    return canvas.reshape(rows, cols, c, h, w).permute(2, 0, 3, 1, 4).reshape(c, rows * h, cols * w)
