"""A DI++ iteration as a peer would write it in plain PyTorch, structured the way DMD2 writes its step.

This is the baseline of bench/e2e.py, not part of the package: it imports nothing from diffinstruct, so what it
measures is a loop written without our engine (hand LoRA in the style of peft, torch.optim.AdamW, autocast, torch's
RNG), doing the same work as DITrainer.train_step with its default pass plan:

1. generator turn: x0 = g(z, c) with grad; under no_grad the TA ("fake score") at x_t and the reference's cond and
   uncond in one batch of 2B, combined with CFG; the DMD2-style target x0 - grad with
   grad = (D_TA - D_ref^w) / mean|x0 - D_ref^w|, and the generator loss 0.5 ||x0 - sg(target)||^2 / B (the sum over
   elements, so that its gradient is exactly our G; DMD2's mean only rescales it by 1/N); AdamW; an EMA by
   torch._foreach_lerp_;
2. guidance turn: the TA regresses on the generator turn's detached sample (denoising score matching, EDM weighting
   lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2), AdamW.

Sigma is log-normal (P_mean -2, P_std 2) clamped to the SD1.5 table's range, as in our engine; the denoiser is the
VP-eps model in EDM coordinates (timestep = nearest table entry, c_in = 1 / sqrt(1 + sigma^2)), so both loops run the
same networks on the same kinds of inputs; only the code around them differs.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION = ("to_q", "to_k", "to_v")
SIGMA_DATA = 0.5


class HandLoRA(nn.Module):
    """base(x) + scale * up(down(x)) for the active adapter (peft's formula, scale applied on every call)."""

    def __init__(self, base: nn.Module, names: tuple[str, ...], rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.active: str | None = None
        self.down = nn.ModuleDict()
        self.up = nn.ModuleDict()
        for name in names:
            if isinstance(base, nn.Conv2d):
                down: nn.Module = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding,
                                            base.dilation, bias=False)
                up: nn.Module = nn.Conv2d(rank, base.out_channels, 1, bias=False)
            else:
                down, up = nn.Linear(base.in_features, rank, bias=False), nn.Linear(rank, base.out_features, bias=False)
            nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
            nn.init.zeros_(up.weight)
            self.down[name], self.up[name] = down, up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.active is None:
            return out
        return out + self.up[self.active](self.down[self.active](x)) * self.scale


def lora_target(name: str, module: nn.Module) -> bool:
    """Attention q/k/v/out and every dense conv: the layers our diffusers host adapts, so the work is equal."""
    if isinstance(module, nn.Conv2d):
        return module.groups == 1
    parts = name.split(".")
    return isinstance(module, nn.Linear) and (parts[-1] in ATTENTION or parts[-2:] == ["to_out", "0"])


def add_lora(unet: nn.Module, rank: int, names: tuple[str, ...] = ("ta", "generator")) -> list[HandLoRA]:
    unet.requires_grad_(False)
    layers = []
    for name, module in [(n, m) for n, m in unet.named_modules() if n and lora_target(n, m)]:
        parent, _, child = name.rpartition(".")
        layer = HandLoRA(module, names, rank, float(rank))
        setattr(unet.get_submodule(parent) if parent else unet, child, layer)
        layers.append(layer)
    return layers


@dataclass
class Draws:
    """One iteration's random inputs; the loop draws them from its own generator unless given (the tests give ours)."""

    z: torch.Tensor
    cond: torch.Tensor
    uncond: torch.Tensor
    sigma: torch.Tensor
    eps: torch.Tensor
    ta_sigma: torch.Tensor
    ta_eps: torch.Tensor


class PeerLoop:
    """mode "shared": one frozen UNet with two hand-LoRA adapters; "full": reference + trainable TA and generator."""

    def __init__(self, unet: nn.Module, sigmas: torch.Tensor, prompts: torch.Tensor, null: torch.Tensor, *,
                 mode: str = "shared", rank: int = 8, batch: int = 2, latent: tuple[int, ...] = (4, 32, 32),
                 omega: float = 4.5, bf16: bool = False, lr: float = 5e-6, ema_decay: float = 0.95,
                 sigma_init: float = 2.5, seed: int = 0) -> None:
        self.mode, self.batch, self.latent, self.omega, self.bf16 = mode, batch, latent, omega, bf16
        self.sigmas, self.prompts, self.null, self.sigma_init = sigmas, prompts, null, sigma_init
        self.rng = torch.Generator().manual_seed(seed)
        if mode == "shared":
            self.layers = add_lora(unet, rank)
            self.g = self.ta = self.ref = unet
            gen = [p for layer in self.layers for p in (*layer.down["generator"].parameters(),
                                                        *layer.up["generator"].parameters())]
            ta = [p for layer in self.layers for p in (*layer.down["ta"].parameters(), *layer.up["ta"].parameters())]
            for p in gen + ta:
                p.requires_grad_(True)
        else:
            self.layers = []
            self.ref = unet.requires_grad_(False)
            self.ta = copy.deepcopy(unet).requires_grad_(True)
            self.g = copy.deepcopy(unet).requires_grad_(True)
            gen, ta = list(self.g.parameters()), list(self.ta.parameters())
        self.gen_params, self.ta_params = gen, ta
        # a peer keeps our hyperparameters (beta1 = 0, no weight decay); torch still allocates exp_avg
        self.opt_g = torch.optim.AdamW(gen, lr=lr, betas=(0.0, 0.999), eps=1e-8, weight_decay=0.0)
        self.opt_ta = torch.optim.AdamW(ta, lr=lr, betas=(0.0, 0.999), eps=1e-8, weight_decay=0.0)
        self.ema_decay = ema_decay
        self.ema = [p.detach().clone() for p in gen]

    def role(self, name: str | None) -> None:
        for layer in self.layers:
            layer.active = name

    def autocast(self) -> Any:
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16)

    def denoise(self, unet: nn.Module, x: torch.Tensor, sigma: torch.Tensor, ehs: torch.Tensor) -> torch.Tensor:
        t = torch.argmin((self.sigmas[None, :] - sigma[:, None]).abs(), dim=1)
        s = sigma.reshape(-1, 1, 1, 1)
        eps = unet(x / torch.sqrt(s**2 + 1), t, encoder_hidden_states=ehs, return_dict=False)[0]
        return x - s * eps.float()

    def lognormal(self) -> torch.Tensor:
        s = torch.exp(-2.0 + 2.0 * torch.randn(self.batch, generator=self.rng))
        return s.clamp(float(self.sigmas[0]), float(self.sigmas[-1]))

    def draw(self) -> Draws:
        b, shape = self.batch, (self.batch, *self.latent)
        pick = torch.randint(len(self.prompts), (b,), generator=self.rng)
        return Draws(torch.randn(shape, generator=self.rng), self.prompts[pick], self.null.expand(b, -1, -1),
                     self.lognormal(), torch.randn(shape, generator=self.rng), self.lognormal(),
                     torch.randn(shape, generator=self.rng))

    def generator_loss(self, d: Draws) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, detached x0) of the generator turn; TA and reference read the weights of before the step."""
        self.role("generator" if self.layers else None)
        sigma0 = torch.full((self.batch,), self.sigma_init)
        with self.autocast():
            x0 = self.denoise(self.g, self.sigma_init * d.z, sigma0, d.cond)
        x0d = x0.detach()
        with torch.no_grad(), self.autocast():
            xt = x0d + d.sigma.reshape(-1, 1, 1, 1) * d.eps
            self.role("ta" if self.layers else None)
            fake = self.denoise(self.ta, xt, d.sigma, d.cond)
            self.role(None)
            both = self.denoise(self.ref, torch.cat([xt, xt]), torch.cat([d.sigma, d.sigma]),
                                torch.cat([d.cond, d.uncond]))
            real_c, real_u = both.chunk(2)
            real = real_u + self.omega * (real_c - real_u)
            p_real, p_fake = x0d - real, x0d - fake
            grad = (p_real - p_fake) / p_real.abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-5)
            grad = torch.nan_to_num(grad)
        loss = 0.5 * F.mse_loss(x0.float(), (x0d - grad).detach(), reduction="sum") / self.batch
        return loss, x0d

    def ta_loss(self, d: Draws, x0d: torch.Tensor) -> torch.Tensor:
        self.role("ta" if self.layers else None)
        s = d.ta_sigma.reshape(-1, 1, 1, 1)
        with self.autocast():
            d_ta = self.denoise(self.ta, x0d + s * d.ta_eps, d.ta_sigma, d.cond)
        weight = (d.ta_sigma**2 + SIGMA_DATA**2) / (d.ta_sigma * SIGMA_DATA) ** 2
        return (weight * ((d_ta.float() - x0d) ** 2).mean(dim=(1, 2, 3))).mean()

    def step(self, draws: Draws | None = None) -> dict[str, float]:
        d = draws if draws is not None else self.draw()
        loss_g, x0d = self.generator_loss(d)
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        self.opt_g.step()
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, [p.detach() for p in self.gen_params], 1.0 - self.ema_decay)
        loss_ta = self.ta_loss(d, x0d)
        self.opt_ta.zero_grad(set_to_none=True)
        loss_ta.backward()
        self.opt_ta.step()
        self.role(None)
        # DMD2 logs its losses every step
        return {"generator_loss": loss_g.item(), "ta_loss": loss_ta.item()}
