"""The built-in tiny text-to-image problem (diffinstruct.tiny, `make demo`) as MODEL / CLIP / VAE / REWARD for
the node pack, so the demo runs as a ComfyUI workflow on the same shipped models.

- MODEL: the shipped tiny teacher, an EDM denoiser D(x, sigma, tokens) on 16x16 RGB pixels in [-1, 1].
- CLIP: the tiny vocabulary's tokenizer. Its conditioning is the token ids [1, 8] (the teacher's text encoder
  is part of the denoiser); it speaks ComfyUI's CLIP protocol (tokenize + encode_from_tokens_scheduled, what the
  core CLIP Text Encode node calls) and the pack's prompt -> tensor protocol. The empty prompt is the null
  prompt: CFG's unconditional branch.
- VAE: pixel space, so "decoding" is the affine map [-1, 1] -> [0, 1] (tiny.data.to_images) with downscale 1.
- REWARD: stage 2 of the demo, the Bradley-Terry preference model fitted to a simulated rater's choices
  (tiny.taste), saved to a file and used as the registry's `preference@PATH` reward.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checks import check_int
from ..denoisers import EDMDenoiser
from ..errors import ConfigError
from ..tiny import data, load_teacher, taste, tokenize

SIZE = data.SIZE  # pixels; the workflow's width and height
REWARD_FILE = "tiny_taste_reward.safetensors"
# the demo's stage-2 image mix: half data images, half stage-1 generator samples (tiny/demo.py)
REAL_SEED_OFFSET = 77
FAKE_SEED_OFFSET = 5000


class TinyDemoCLIP:
    """Prompt -> CONDITIONING for the tiny teacher: token ids of the tiny vocabulary (unknown words are an error
    that names the vocabulary)."""

    def tokenize(self, text: str) -> torch.Tensor:
        if not isinstance(text, str):
            raise ValueError(f"a prompt must be a string, got {type(text).__name__}")
        return tokenize([text.strip()])

    def encode_from_tokens_scheduled(self, tokens: torch.Tensor) -> list[list[Any]]:
        if not isinstance(tokens, torch.Tensor) or tokens.dtype != torch.int64 or tokens.dim() != 2:
            raise ValueError("expected token ids from TinyDemoCLIP.tokenize")
        return [[tokens.clone(), {}]]

    def __call__(self, prompt: str) -> torch.Tensor:
        return self.tokenize(prompt)


class TinyDemoVAE(nn.Module):
    """Pixel-space 'VAE': x [B, 3, 16, 16] in [-1, 1] -> images in [0, 1] (affine, unclamped, so reward gradients
    pass everywhere, as in the demo's PixelReward)."""

    downscale = 1
    latent_channels = 3

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        if latents.dim() != 4 or latents.shape[1] != 3:
            raise ValueError(f"expected tiny-teacher samples [B, 3, H, W], got {tuple(latents.shape)}")
        return data.to_images(latents)


def demo_models(weights_folder: str | Path | None = None) -> tuple[EDMDenoiser, TinyDemoCLIP, TinyDemoVAE]:
    """(MODEL, CLIP, VAE) of the tiny demo; weights from the package (or `weights_folder`)."""
    # ComfyUI runs nodes in inference mode: load ordinary tensors, so training copies can carry gradients
    with torch.inference_mode(False):
        teacher = load_teacher(weights_folder)
    teacher.latent_channels = 3  # the pack reads the sample shape from the MODEL (default 4, SD's latents)
    return teacher, TinyDemoCLIP(), TinyDemoVAE()


def conditioning(prompts: Sequence[str]) -> list[list[Any]]:
    """A CONDITIONING with one entry per prompt."""
    clip = TinyDemoCLIP()
    return [clip.encode_from_tokens_scheduled(clip.tokenize(p))[0] for p in prompts]


def _check_int(name: str, value: Any, low: int) -> int:
    return check_int(name, value, low)


def rating_images(generator: Any, n_images: int, seed: int) -> torch.Tensor:
    """The images the simulated rater compares, in [0, 1]: half data images (their backgrounds span the taste's
    range), half one-step samples of `generator` over every prompt (what the reward must judge in stage 3);
    all data images without a generator."""
    from .training import one_step_sample

    _check_int("images", n_images, 4)
    n_fake = n_images // 2 if generator is not None else 0
    real, _ = data.sample_batch(n_images - n_fake, seed=seed + REAL_SEED_OFFSET)
    if not n_fake:
        return real
    prompts = data.all_prompts()
    cond = conditioning([prompts[i % len(prompts)] for i in range(n_fake)])
    fake = one_step_sample(generator, cond, seed + FAKE_SEED_OFFSET, n_fake, SIZE, SIZE, downscale=1)
    return torch.cat([real, data.to_images(fake).clamp(0, 1)])


def fit_taste_reward(generator: Any, folder: str | Path, *, images: int = 256, pairs: int = 1500, epochs: int = 40,
                     seed: int = 0) -> tuple[Path, dict[str, Any]]:
    """Stage 2 of the demo: rate pairs with the hidden taste, fit the preference model, save it (atomically) in
    `folder`; returns its path and the training record (held-out accuracy, agreement with the hidden taste)."""
    _check_int("pairs", pairs, 16)
    _check_int("epochs", epochs, 1)
    _check_int("seed", seed, 0)
    if not str(folder).strip():
        raise ConfigError("folder is empty: name a folder for the reward model")
    with torch.inference_mode(False), torch.enable_grad():
        pool = rating_images(generator, images, seed)
        with torch.random.fork_rng(devices=[]):  # the fit seeds torch itself; leave the host's RNG alone
            model, record = taste.fit_reward(pool, pairs, seed + 7, epochs=epochs)
    # JSON-safe scalars only (the record goes into the node's text report)
    record = {k: v for k, v in record.items()
              if isinstance(v, str) or (isinstance(v, int | float) and math.isfinite(float(v)))}
    record.update(images=int(pool.shape[0]), pairs=pairs, epochs=epochs, seed=seed)
    path = model.save(Path(folder).expanduser() / REWARD_FILE, record)
    return path, record


def fidelity(images: torch.Tensor, prompts: str | Sequence[str], samples_per_prompt: int) -> dict[str, float]:
    """The demo's prompt fidelity (tiny.evaluate.fidelity, the shipped classifier) of a ComfyUI IMAGE
    [B, 16, 16, 3] holding `samples_per_prompt` images per prompt, in prompt order."""
    from ..tiny import evaluate, load_classifier
    from .host import parse_prompts

    _check_int("samples_per_prompt", samples_per_prompt, 1)
    prompt_list = parse_prompts(prompts)
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != (SIZE, SIZE, 3):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"expected a ComfyUI IMAGE [B, {SIZE}, {SIZE}, 3] of tiny-demo samples, got {shape}")
    if images.shape[0] != len(prompt_list) * samples_per_prompt:
        raise ValueError(f"{images.shape[0]} images but {len(prompt_list)} prompts x {samples_per_prompt} samples "
                         f"per prompt = {len(prompt_list) * samples_per_prompt}: use Evaluate's prompts and "
                         "samples_per_prompt")
    per_image = [p for p in prompt_list for _ in range(samples_per_prompt)]
    for p in prompt_list:
        data.parse_prompt(p)  # names the unknown word or missing attribute
    with torch.inference_mode(False):
        classifier = load_classifier()
    return evaluate.fidelity(classifier, images.movedim(-1, 1).float().clamp(0, 1), per_image)
