"""The DI / DI++ / DI* engine: alternating TA and generator updates on the fused kernels.

Everything runs in VE coordinates (x_t = x0 + sigma eps); flow models are seen
through `VEView` (x_flow = x_ve / (1 + s), s_flow = s / (1 + s)), an exact
reparameterisation, so one set of formulas serves every model family.
Networks only run forward in the generator step, except the generator itself
(x0.backward(G)), the reward's autograd path, DI*'s VJPs and, under
ta_sample = "onepass", the TA's own DSM backward on the same x_t.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import kernels
from .config import DIConfig
from .denoisers import Denoiser
from .errors import ConfigError, TrainingDiverged
from .generator import OneStepGenerator
from .lora import store_frozen_in
from .optim import EMA, FusedAdam
from .prompts import PromptList, join_conditioning
from .rewards import Reward
from .rng import stream_seed

if TYPE_CHECKING:
    from .distributed import DDPState


class VEView(nn.Module):
    """A denoiser in VE coordinates; flow models are reparameterised, VE ones pass through."""

    def __init__(self, denoiser: Denoiser) -> None:
        super().__init__()
        self.inner = denoiser
        self.flow = denoiser.process == "flow"
        if self.flow:
            self.sigma_min = denoiser.sigma_min / (1.0 - denoiser.sigma_min)
            self.sigma_max = denoiser.sigma_max / (1.0 - denoiser.sigma_max)
        else:
            self.sigma_min, self.sigma_max = denoiser.sigma_min, denoiser.sigma_max

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any) -> torch.Tensor:
        if not self.flow:
            return self.inner(x, sigma, cond)
        scale = 1.0 / (1.0 + sigma)
        return self.inner(x * scale.reshape((-1,) + (1,) * (x.dim() - 1)).to(x.dtype), sigma * scale, cond)


@dataclass
class KernelClock:
    """Seconds spent in our fused kernels, to split step time into networks vs kernels."""

    seconds: float = 0.0

    @contextmanager
    def measure(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - start


@dataclass
class Models:
    """What the engine trains. generator_params / ta_params are the trainable tensors (full or LoRA)."""

    generator: OneStepGenerator
    ta: Denoiser
    reference: Denoiser
    generator_params: list[nn.Parameter]
    ta_params: list[nn.Parameter]
    latent_shape: tuple[int, ...]
    modules: list[nn.Module] = field(default_factory=list)  # for train()/eval() switching and DDP


GENERATOR_METRICS = ("weight", "ref_dist", "gap", "surrogate", "reward", "sigma", "divergence", "h")


@dataclass
class Sample:
    """One generator micro-batch's detached sample and its conditioning, reused by the TA update."""

    x0: torch.Tensor
    cond: Any


def _grad_norm(params: Sequence[nn.Parameter]) -> Any:
    """L2 norm of all gradients (foreach, a 0-dim tensor on the device; 0.0 without any); NaN/Inf anywhere makes it
    non-finite."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    if any(g.dtype != torch.float32 for g in grads):
        grads = [g.float() for g in grads]
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def _mean(values: Sequence[Any]) -> Any:
    return sum(values) / len(values)


def to_host(values: Sequence[Any]) -> list[float]:
    """Every tensor of `values` as a float with one device-to-host transfer (floats and ints pass through)."""
    tensors = [v.detach().reshape(()).float() for v in values if isinstance(v, torch.Tensor)]
    host = iter(torch.stack([t.to(tensors[0].device) for t in tensors]).tolist()) if tensors else iter(())
    return [next(host) if isinstance(v, torch.Tensor) else float(v) for v in values]


def _flatten(metrics: dict[str, list[Any]]) -> list[Any]:
    return [v for values in metrics.values() for v in values]


def _unflatten(metrics: dict[str, list[Any]], values: Sequence[float]) -> dict[str, float]:
    """The per-metric means of `values`, laid out as _flatten(metrics) was (NaN for a metric with no value)."""
    out, i = {}, 0
    for name, items in metrics.items():
        part = values[i:i + len(items)]
        i += len(items)
        out[name] = sum(part) / len(part) if part else math.nan
    return out


def _zero(params: Sequence[nn.Parameter]) -> None:
    for p in params:
        p.grad = None


def distar_surrogate(x0: torch.Tensor, d_p: torch.Tensor, d_q: torch.Tensor, sigma: torch.Tensor, c: float,
                     weighting: str = "sigma2",
                     sample_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, kernels.HuberTerms]:
    """DI*'s tractable pseudo-loss: (w/sigma^2)(<sg a, D_p> - <sg b, D_q> - <sg d', x0>) / B.

    x0, D_p (the CFG teacher) and D_q (the TA) carry the autograd graph through x_t;
    its gradient equals the gradient of the pseudo-Huber score divergence (docs/ALGORITHM.md section 6).
    sample_weight (per sample, default 1) weighs samples, e.g. quadrature weights.
    """
    res = kernels.huber_terms(x0.detach().contiguous(), d_p.detach().contiguous(), d_q.detach().contiguous(), sigma,
                              c, weighting=weighting)
    per_sample = ((res.a * d_p) - (res.b * d_q) - (res.dprime * x0)).reshape(x0.shape[0], -1).sum(dim=1)
    if sample_weight is not None:
        per_sample = per_sample * sample_weight
    return per_sample.sum(), res


class DITrainer:
    """One DI-family run: call `train_step(step)` for step = 0, 1, ...; state lives in the models and optimisers."""

    def __init__(self, config: DIConfig, models: Models, prompts: PromptList, reward: Reward | None = None,
                 device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1) -> None:
        self.cfg = config.validate()
        if self.cfg.alpha != 0.0 and reward is None:
            raise ValueError("alpha > 0 needs a reward")
        if self.cfg.method == "distar" and getattr(reward, "noisy", False):
            # DI*'s surrogate differentiates r(x0) through autograd; a reward on noisy x_t (implicit CFG) has only
            # a gradient, and DI*'s CFG already comes from its reference's omega
            raise ConfigError(f"method = distar cannot use the {getattr(reward, 'name', 'noisy')} reward (a gradient "
                              "on noisy samples, not a differentiable r(x0)); use method = dipp, or set omega instead")
        self.models = models
        self.prompts = prompts
        self.reward = reward
        self.device = torch.device(device)
        self.rank = rank
        self.world_size = world_size
        if self.cfg.bf16:  # frozen weights (shared base, full mode's reference) as autocast would cast them
            for module in {id(m): m for m in (*models.modules, models.reference)}.values():
                store_frozen_in(module, torch.bfloat16)
        self.reference = VEView(models.reference)
        self.ta = VEView(models.ta)
        self.sigma_min = self.cfg.sigma_min if self.cfg.sigma_min is not None else self.reference.sigma_min
        self.sigma_max = self.cfg.sigma_max if self.cfg.sigma_max is not None else self.reference.sigma_max
        if not self.generator_params or not self.ta_params:
            raise ValueError("the generator and the TA need trainable parameters")
        self.opt_generator = FusedAdam(self.generator_params, lr=self.cfg.lr_generator,
                                       betas=(self.cfg.beta1, self.cfg.beta2), eps=self.cfg.adam_eps,
                                       weight_decay=self.cfg.weight_decay)
        self.opt_ta = FusedAdam(self.ta_params, lr=self.cfg.lr_ta, betas=(self.cfg.beta1, self.cfg.beta2),
                                eps=self.cfg.adam_eps, weight_decay=self.cfg.weight_decay)
        self.ema = EMA(self.generator_params, self.cfg.ema_decay)
        self.bad_in_a_row = 0
        self.skipped_steps = 0
        self.clock = KernelClock()
        self.ddp: DDPState | None = None  # data-parallel wrappers, set by distributed.wrap_trainer (world_size > 1)

    @property
    def generator_params(self) -> list[nn.Parameter]:
        return self.models.generator_params

    @property
    def ta_params(self) -> list[nn.Parameter]:
        return self.models.ta_params

    # ------------------------------------------------------------------ helpers
    def _autocast(self) -> Any:
        if not self.cfg.bf16:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def _seed(self, step: int, purpose: str, micro: int) -> int:
        return stream_seed(self.cfg.seed, step, purpose, self.rank, micro)

    def _latents(self, step: int, purpose: str, micro: int) -> torch.Tensor:
        z = torch.empty((self.cfg.batch_size, *self.models.latent_shape), dtype=torch.float32, device=self.device)
        with self.clock.measure():
            kernels.fill_normal(z, self._seed(step, purpose, micro))
        return z

    def _sigma(self, step: int, purpose: str, micro: int) -> torch.Tensor:
        with self.clock.measure():
            sigma, _ = kernels.sample_sigma(self.cfg.batch_size, self._seed(step, purpose, micro),
                                            p_mean=self.cfg.p_mean, p_std=self.cfg.p_std, sigma_min=self.sigma_min,
                                            sigma_max=self.sigma_max, device=self.device)
        return sigma

    def _generate(self, z: torch.Tensor, cond: Any, train: bool = False) -> torch.Tensor:
        """train: gradients will flow into the generator's weights (through its DDP wrapper when distributed)."""
        generator = self.ddp.generator if train and self.ddp is not None else self.models.generator
        with self._autocast():
            return generator(z, cond)

    def _micro_scope(self, role: str, micro: int) -> Any:
        """Around one micro-batch's forward and backward; distributed, only the last one all-reduces."""
        return nullcontext() if self.ddp is None else self.ddp.micro(role, micro, self.cfg.grad_accum)

    def _scaled(self, grad: torch.Tensor) -> torch.Tensor:
        """A micro-batch's share of the step's gradient; no copy without accumulation."""
        return grad if self.cfg.grad_accum == 1 else grad / self.cfg.grad_accum

    def _reference_pair(self, xt: torch.Tensor, sigma: torch.Tensor, batch: Any) -> tuple[torch.Tensor, Any]:
        """D_ref(x_t | c) and, when omega != 1, D_ref(x_t | null): one batched pass when reference_pass = "joint"
        and the two conditionings stack (equal shapes), else two passes of batch B."""
        if self.cfg.omega == 1.0:
            return self.reference(xt, sigma, batch.cond), None
        if self.cfg.reference_pass == "joint":
            both = join_conditioning(batch.cond, batch.uncond)
            if both is not None:
                d_cond, d_uncond = self.reference(torch.cat([xt, xt]), torch.cat([sigma, sigma]), both).chunk(2)
                return d_cond, d_uncond
        return self.reference(xt, sigma, batch.cond), self.reference(xt, sigma, batch.uncond)

    # ------------------------------------------------------------------ TA update
    def _ta_micro(self, step: int, key: int, ta: nn.Module, sample: Sample | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One micro-batch of denoising score matching: on `sample` (the generator step's, detached) or, None, on a
        fresh sample drawn from the "ta_*" streams. Returns the mean loss and the non-finite count (on device)."""
        if sample is None:
            batch = self.prompts.batch(self.cfg.batch_size, self._seed(step, "ta_prompts", key))
            with torch.no_grad():
                x0 = self._generate(self._latents(step, "ta_z", key), batch.cond).float().contiguous()
            sample = Sample(x0, batch.cond)
        sigma = self._sigma(step, "ta_sigma", key)
        with self.clock.measure():
            xt = kernels.add_noise(sample.x0, sigma, self._seed(step, "ta_eps", key))
        loss, nonfinite, _ = self._ta_regress(ta, xt, sigma, sample)
        return loss, nonfinite

    def _ta_regress(self, ta: nn.Module, xt: torch.Tensor, sigma: torch.Tensor,
                    sample: Sample) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The TA's forward on x_t, its DSM gradient back through it (the graph is freed here); returns the mean
        loss, the non-finite count and the detached float32 output D_ta(x_t)."""
        with self._autocast():
            d_ta = ta(xt, sigma, sample.cond)
        d_ta_f = d_ta.detach().float().contiguous()
        with self.clock.measure():
            res = kernels.ta_loss(d_ta_f, sample.x0, sigma, weighting=self.cfg.ta_weighting,
                                  sigma_data=self.cfg.sigma_data, reduction=self.cfg.ta_reduction)
        d_ta.backward(self._scaled(res.grad).to(d_ta.dtype))
        return res.loss.mean(), res.nonfinite.sum(), d_ta_f

    def accumulate_ta_grads(self, step: int, inner: int = 0, samples: Sequence[Sample] | None = None
                            ) -> tuple[list[torch.Tensor], Any]:
        """Fills the TA parameters' .grad (no optimiser step); returns the micro-batches' losses and the bad count."""
        losses, bad = [], 0
        ta = self.ta if self.ddp is None else self.ddp.ta  # the DDP wrapper all-reduces the TA's gradients
        for micro in range(self.cfg.grad_accum):
            with self._micro_scope("ta", micro):
                loss, nonfinite = self._ta_micro(step, micro + inner * self.cfg.grad_accum, ta,
                                                 samples[micro] if samples is not None else None)
            losses.append(loss)
            bad = bad + nonfinite
        if self.ddp is not None:
            bad = self.ddp.finish("ta", bad)  # summed over ranks; hand-averaged grads in LoRA mode
        return losses, bad

    def _apply_ta(self, ok: bool) -> None:
        if ok:
            with self.clock.measure():
                self.opt_ta.step()
        _zero(self.ta_params)

    def ta_step(self, step: int, inner: int = 0) -> dict[str, float]:
        """Regress the TA onto fresh samples of the generator (denoising score matching) and step it."""
        losses, bad = self.accumulate_ta_grads(step, inner)
        loss, bad, norm = to_host([_mean(losses), bad, _grad_norm(self.ta_params)])
        ok = bad == 0 and math.isfinite(norm)
        self._apply_ta(ok)
        return {"ta_loss": loss, "ta_nonfinite": bad, "ta_ok": float(ok)}

    # ------------------------------------------------------------------ generator update
    def _reward_grad(self, x0: torch.Tensor, xt: torch.Tensor, sigma: torch.Tensor,
                     batch: Any) -> tuple[torch.Tensor | None, Any]:
        """dr/dx0 per sample (None without a reward or with alpha = 0) and the batch's mean reward."""
        if self.reward is None:
            return None, math.nan
        if getattr(self.reward, "noisy", False):
            with self._autocast():  # d x_t / d x0 = 1; weighted like the IKL term: sigma^2 * grad_{x_t} r
                grad = self.reward.grad_xt(xt, sigma, batch.cond, batch.uncond)
            s2 = (sigma.float() ** 2).reshape((-1,) + (1,) * (xt.dim() - 1))
            return (s2 * grad).contiguous(), math.nan
        want_grad = self.cfg.alpha != 0.0
        with torch.enable_grad():
            x0r = x0.detach().float().requires_grad_(want_grad)
            r = self.reward(x0r, batch.prompts, batch.cond)
            dr = torch.autograd.grad(r.sum(), x0r)[0].contiguous() if want_grad else None
        return dr, r.detach().mean()

    def _dipp_micro(self, step: int, key: int, metrics: dict[str, list[Any]],
                    samples: list[Sample] | None = None, ta_results: list[tuple[Any, Any]] | None = None) -> Any:
        """ta_results (ta_sample = "onepass"): the TA's forward on this x_t runs with grad and its DSM update is
        accumulated here, so one TA pass serves both halves; its (loss, non-finite count) is appended."""
        cfg = self.cfg
        batch = self.prompts.batch(cfg.batch_size, self._seed(step, "prompts", key))
        x0 = self._generate(self._latents(step, "z", key), batch.cond, train=True)
        x0d = x0.detach().float().contiguous()
        if samples is not None:
            samples.append(Sample(x0d, batch.cond))
        sigma = self._sigma(step, "sigma", key)
        with self.clock.measure():
            xt = kernels.add_noise(x0d, sigma, self._seed(step, "eps", key))
        if ta_results is not None:
            ta = self.ta if self.ddp is None else self.ddp.ta
            with self._micro_scope("ta", key):
                loss, nonfinite, d_ta = self._ta_regress(ta, xt, sigma, Sample(x0d, batch.cond))
            ta_results.append((loss, nonfinite))
        with torch.no_grad(), self._autocast():
            if ta_results is None:
                d_ta = self.ta(xt, sigma, batch.cond).float().contiguous()
            d_cond, d_uncond = self._reference_pair(xt, sigma, batch)
            d_cond = d_cond.float().contiguous()
            d_uncond = d_uncond.float().contiguous() if d_uncond is not None else None
        dr, reward_mean = self._reward_grad(x0d, xt, sigma, batch)
        with self.clock.measure():
            res = kernels.generator_grad(x0d, d_ta, d_cond, d_uncond=d_uncond, omega=cfg.omega,
                                         dr=dr if cfg.alpha != 0.0 else None, alpha=cfg.alpha,
                                         weighting=cfg.generator_weighting)
        x0.backward(self._scaled(res.grad).to(x0.dtype))
        for name, value in (("weight", res.weight), ("ref_dist", res.ref_dist), ("gap", res.gap),
                            ("surrogate", res.surrogate), ("sigma", sigma)):
            metrics[name].append(value.mean())
        metrics["reward"].append(reward_mean)
        return res.nonfinite.sum()

    def _distar_micro(self, step: int, key: int, metrics: dict[str, list[Any]],
                    samples: list[Sample] | None = None) -> Any:
        cfg = self.cfg
        batch = self.prompts.batch(cfg.batch_size, self._seed(step, "prompts", key))
        x0 = self._generate(self._latents(step, "z", key), batch.cond, train=True)
        if samples is not None:
            samples.append(Sample(x0.detach().float().contiguous(), batch.cond))
        sigma = self._sigma(step, "sigma", key)
        eps = torch.empty_like(x0, dtype=torch.float32)
        with self.clock.measure():
            kernels.fill_normal(eps, self._seed(step, "eps", key))
        s = sigma.reshape((-1,) + (1,) * (x0.dim() - 1))
        xt = x0.float() + s * eps  # live: gradients flow through x_t into the generator
        with self._autocast():
            d_p, d_u = self._reference_pair(xt, sigma, batch)
            if d_u is not None:
                d_p = d_u + cfg.omega * (d_p - d_u)
            d_q = self.ta(xt, sigma, batch.cond)
        d_p, d_q = d_p.float(), d_q.float()
        with self.clock.measure():
            surrogate, res = distar_surrogate(x0.float(), d_p, d_q, sigma, cfg.huber_c * math.sqrt(x0[0].numel()),
                                              cfg.distar_weighting)
        reward_mean: Any = math.nan
        if self.reward is not None:
            r = self.reward(x0.float(), batch.prompts, batch.cond)
            reward_mean = r.detach().mean()
            if cfg.alpha != 0.0:
                surrogate = surrogate - cfg.alpha * r.sum() / cfg.batch_size
        (surrogate / cfg.grad_accum).backward()
        metrics["divergence"].append(res.value.mean())
        metrics["h"].append(res.h.mean())
        metrics["reward"].append(reward_mean)
        metrics["sigma"].append(sigma.mean())
        return res.nonfinite.sum()

    def accumulate_generator_grads(self, step: int, samples: list[Sample] | None = None,
                                   ta_results: list[tuple[Any, Any]] | None = None
                                   ) -> tuple[dict[str, list[Any]], Any]:
        """Fills the generator parameters' .grad for this step (no optimiser step); returns metrics (per micro-batch,
        tensors on the device until to_host) and the bad count. `samples` collects each micro-batch's detached
        sample for the TA update (ta_sample = "reuse"); `ta_results` makes each micro-batch's TA forward also
        accumulate the TA's gradients (ta_sample = "onepass", DI/DI++ only)."""
        metrics: dict[str, list[Any]] = {k: [] for k in GENERATOR_METRICS}
        bad: Any = 0
        distar = self.cfg.method == "distar"
        frozen = [p for p in self.ta_params if p.requires_grad] if distar else []
        for p in frozen:  # DI*'s VJPs pass through the TA; its weights must not collect gradients
            p.requires_grad_(False)
        try:
            for micro in range(self.cfg.grad_accum):
                with self._micro_scope("generator", micro):
                    if distar:
                        bad = bad + self._distar_micro(step, micro, metrics, samples)
                    else:
                        bad = bad + self._dipp_micro(step, micro, metrics, samples, ta_results)
        finally:
            for p in frozen:
                p.requires_grad_(True)
        if self.ddp is not None:
            bad = self.ddp.finish("generator", bad)  # summed over ranks; hand-averaged grads in LoRA mode
        return metrics, bad

    def _apply_generator(self, ok: bool) -> None:
        if ok:
            with self.clock.measure():
                self.opt_generator.step()
                self.ema.update()
        _zero(self.generator_params)

    def generator_step(self, step: int) -> dict[str, float]:
        metrics, bad = self.accumulate_generator_grads(step)
        values = to_host([bad, _grad_norm(self.generator_params), *_flatten(metrics)])
        out = self._generator_metrics(metrics, values)
        self._apply_generator(bool(out["generator_ok"]))
        return out

    @staticmethod
    def _generator_metrics(metrics: dict[str, list[Any]], values: list[float]) -> dict[str, float]:
        """The generator half's metrics from to_host's [bad, grad norm, *flattened metrics]."""
        bad, norm = values[0], values[1]
        ok = bad == 0 and math.isfinite(norm)
        out = _unflatten(metrics, values[2:])
        out.update({"generator_nonfinite": bad, "generator_ok": float(ok),
                    "generator_grad_norm": norm if ok else math.nan})
        return out

    # ------------------------------------------------------------------ one iteration
    def _reuse_step(self, step: int) -> tuple[dict[str, float], dict[str, float]]:
        """The default pass plan: the generator half, then the TA's first update on the generator's detached sample
        (no second generator forward), then one host transfer of every number both halves produced. Under
        "onepass" that first update is the generator half's own TA forward on the same x_t."""
        if self.cfg.ta_sample == "onepass":
            if self.cfg.method == "distar":  # also when cfg was replaced after validation
                raise ConfigError("ta_sample = 'onepass' needs method = 'di' or 'dipp'; use ta_sample = 'reuse'")
            results: list[tuple[Any, Any]] = []
            metrics, gen_bad = self.accumulate_generator_grads(step, ta_results=results)
            losses, ta_bad = [loss for loss, _ in results], sum(bad for _, bad in results)
            if self.ddp is not None:
                ta_bad = self.ddp.finish("ta", ta_bad)
        else:
            samples: list[Sample] = []
            metrics, gen_bad = self.accumulate_generator_grads(step, samples)
            losses, ta_bad = self.accumulate_ta_grads(step, 0, samples)
        values = to_host([gen_bad, _grad_norm(self.generator_params), *_flatten(metrics),
                          _mean(losses), ta_bad, _grad_norm(self.ta_params)])
        gen = self._generator_metrics(metrics, values[:-3])
        ta_loss, ta_bad_n, ta_norm = values[-3:]
        ta_ok = ta_bad_n == 0 and math.isfinite(ta_norm)
        self._apply_generator(bool(gen["generator_ok"]))
        self._apply_ta(ta_ok)
        ta = {"ta_loss": ta_loss, "ta_nonfinite": ta_bad_n, "ta_ok": float(ta_ok)}
        for inner in range(1, self.cfg.ta_steps):  # further TA updates (TA:G > 1) draw fresh samples
            ta = self.ta_step(step, inner)
        return ta, gen

    def train_step(self, step: int) -> dict[str, float]:
        start = time.perf_counter()
        kernel_before = self.clock.seconds
        for module in self.models.modules:
            module.train()
        if self.cfg.ta_sample != "fresh":
            ta_metrics, gen_metrics = self._reuse_step(step)
        else:  # "fresh": ta_steps TA updates on their own samples, then the generator
            for inner in range(self.cfg.ta_steps):
                ta_metrics = self.ta_step(step, inner)
            gen_metrics = self.generator_step(step)
        ok = bool(ta_metrics["ta_ok"]) and bool(gen_metrics["generator_ok"])
        if ok:
            self.bad_in_a_row = 0
        else:
            self.bad_in_a_row += 1
            self.skipped_steps += 1
            if self.bad_in_a_row >= self.cfg.max_bad_steps:
                raise TrainingDiverged(
                    f"{self.bad_in_a_row} steps in a row produced NaN/Inf (last at step {step}); "
                    "lower the learning rates, disable bf16, or check the reward")
        total = time.perf_counter() - start
        kernel = self.clock.seconds - kernel_before
        return {"step": float(step), **ta_metrics, **gen_metrics, "skipped_steps": float(self.skipped_steps),
                "time_total": total, "time_kernels": kernel, "time_networks": total - kernel}
