"""A two-dimensional class-conditional Gaussian mixture with exact denoisers at every sigma.

Ground truth for the engine: the reference's score is known in closed form, so
DI, DI++ and DI* can be checked against the true distribution in seconds on a CPU.
Conditioning is a class index; -1 is the null class (the unconditional mixture).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .denoisers import EDMDenoiser
from .generator import OneStepGenerator
from .prompts import PromptList
from .trainer import Models

NULL_CLASS = -1


class GaussianMixture(nn.Module):
    """p(x0 | c) = N(mu_c, s2 I) with p(c) uniform; D(x, sigma, c) = E[x0 | x_t = x, c] exactly."""

    process = "ve"

    def __init__(self, means: torch.Tensor, s2: float = 0.05, sigma_min: float = 0.002,
                 sigma_max: float = 80.0) -> None:
        super().__init__()
        self.register_buffer("means", means.float())
        self.s2 = s2
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    @property
    def classes(self) -> int:
        return self.means.shape[0]

    def sample(self, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(labels.shape[0], self.means.shape[1], generator=generator)
        return self.means[labels] + math.sqrt(self.s2) * noise

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        v = self.s2 + sigma.float().reshape(-1, 1) ** 2  # marginal variance at sigma
        xf = x.float()
        # posterior over components given x_t; conditional rows keep only their class
        logits = -((xf[:, None, :] - self.means[None]) ** 2).sum(-1) / (2 * v)
        mask = (cond[:, None] == NULL_CLASS) | (cond[:, None] == torch.arange(self.classes)[None])
        resp = torch.softmax(logits.masked_fill(~mask, -math.inf), dim=1)
        # E[x0 | x_t, k] = (s2 x + sigma^2 mu_k) / (s2 + sigma^2)
        s2 = self.s2
        sig2 = v - s2
        post_means = (s2 * xf[:, None, :] + sig2[:, :, None] * self.means[None]) / v[:, :, None]
        return (resp[:, :, None] * post_means).sum(1).to(x.dtype)


class MLPNet(nn.Module):
    """F(c_in x, c_noise, class) for EDMDenoiser: a small MLP with a class embedding (row 0 = null)."""

    def __init__(self, dim: int = 2, classes: int = 4, hidden: int = 128) -> None:
        super().__init__()
        self.embed = nn.Embedding(classes + 1, hidden)
        self.inp = nn.Linear(dim + 1, hidden)
        self.body = nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                                  nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.inp(torch.cat([x, c_noise.reshape(-1, 1).to(x.dtype)], dim=1))
        return self.body(h + self.embed(cond + 1))


def default_means(classes: int = 4, radius: float = 1.0) -> torch.Tensor:
    angles = torch.arange(classes, dtype=torch.float64) * (2 * math.pi / classes) + math.pi / 4
    return torch.stack([radius * torch.cos(angles), radius * torch.sin(angles)], dim=1).float()


def class_prompts(classes: int) -> PromptList:
    """Prompts "class k" whose conditioning is the class index (null prompt -> NULL_CLASS)."""

    def encode(prompt: str) -> torch.Tensor:
        return torch.tensor([NULL_CLASS if not prompt else int(prompt.split()[-1])])

    return PromptList([f"class {k}" for k in range(classes)], encode)


def build_models(mixture: GaussianMixture, hidden: int = 128, seed: int = 0, sigma_init: float = 2.5) -> Models:
    """Reference = the exact mixture; generator and TA = fresh EDM-preconditioned MLPs."""
    torch.manual_seed(seed)
    generator_net = EDMDenoiser(MLPNet(mixture.means.shape[1], mixture.classes, hidden))
    ta_net = EDMDenoiser(MLPNet(mixture.means.shape[1], mixture.classes, hidden))
    generator = OneStepGenerator(generator_net, sigma_init)
    return Models(generator=generator, ta=ta_net, reference=mixture,
                  generator_params=list(generator.parameters()), ta_params=list(ta_net.parameters()),
                  latent_shape=(mixture.means.shape[1],), modules=[generator, ta_net])


def mmd(x: torch.Tensor, y: torch.Tensor, bandwidths: tuple[float, ...] = (0.1, 0.3, 1.0)) -> float:
    """Squared maximum mean discrepancy with a sum of RBF kernels (biased estimator)."""
    x, y = x.double(), y.double()

    def k(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        d2 = torch.cdist(a, b) ** 2
        return sum(torch.exp(-d2 / (2 * bw**2)) for bw in bandwidths)

    return float(k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean())


@torch.no_grad()
def generate(models: Models, labels: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(labels.shape[0], *models.latent_shape, generator=g)
    models.generator.eval()
    out = models.generator(z, labels)
    models.generator.train()
    return out
