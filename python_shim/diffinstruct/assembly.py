"""Assembling the three networks of a run from one teacher denoiser, in either memory mode.

"full":   reference = the frozen teacher; TA and generator = trainable deep copies (3x weights,
          plus optimiser state for two full networks).
"shared": one frozen base; TA = base + LoRA_TA, generator = base + LoRA_G, switched by role
          (1x weights plus two small adapter sets).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

from torch import nn

from .denoisers import Denoiser
from .generator import OneStepGenerator, RoleView
from .lora import attach_lora, default_target
from .trainer import Models

MODES = ("full", "shared")


def build_models(teacher: Denoiser, latent_shape: tuple[int, ...], mode: str = "shared", rank: int = 8,
                 sigma_init: float | None = None, generator_init: Denoiser | None = None,
                 target: Callable[[str, nn.Module], bool] = default_target) -> Models:
    """The generator starts from `generator_init` (e.g. a DI-pretrained one) or from the teacher."""
    if not isinstance(teacher, nn.Module):
        raise TypeError("the teacher denoiser must be a torch.nn.Module")
    if mode == "full":
        teacher.requires_grad_(False)
        ta = copy.deepcopy(teacher).requires_grad_(True)
        gen_net = copy.deepcopy(generator_init if generator_init is not None else teacher).requires_grad_(True)
        generator = OneStepGenerator(gen_net, sigma_init)
        return Models(generator=generator, ta=ta, reference=teacher, generator_params=list(gen_net.parameters()),
                      ta_params=list(ta.parameters()), latent_shape=latent_shape, modules=[generator, ta])
    if mode == "shared":
        if generator_init is not None:
            raise ValueError("mode='shared' starts the generator from the teacher; use mode='full' to start "
                             "from a separate pretrained generator")
        switch, params = attach_lora(teacher, roles=("ta", "generator"), rank=rank, target=target)
        reference = RoleView(teacher, switch, None)
        ta = RoleView(teacher, switch, "ta")
        generator = OneStepGenerator(RoleView(teacher, switch, "generator"), sigma_init)
        return Models(generator=generator, ta=ta, reference=reference, generator_params=params["generator"],
                      ta_params=params["ta"], latent_shape=latent_shape, modules=[teacher])
    raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
