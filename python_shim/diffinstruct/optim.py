"""Adam/AdamW and EMA whose per-element work runs in the fused multi-tensor kernels."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from . import kernels


class FusedAdam(torch.optim.Optimizer):
    """torch.optim.Adam semantics (AdamW with decoupled=True), one kernel call per step.

    State per parameter: float32 exp_avg_sq, float32 exp_avg unless beta1 = 0 (DI++'s
    default: torch's first moment is then the gradient itself, so keeping it would
    only cost memory and 8 bytes of traffic per element), and a step count; the state
    dict is the standard torch one, so checkpoints resume exactly.
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter] | Iterable[dict],
        lr: float = 5e-6,
        betas: tuple[float, float] = (0.0, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled: bool = False,
    ) -> None:
        if not 0.0 <= lr:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if not eps > 0.0:
            raise ValueError(f"eps must be > 0, got {eps}")
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "decoupled": decoupled}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise ValueError("FusedAdam does not take a closure")
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            momentum = beta1 != 0.0
            params, grads, avgs, sqs, counts = [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32,
                                                           memory_format=torch.contiguous_format)
                if momentum and "exp_avg" not in state:
                    # also when a beta1 = 0 run resumes with beta1 > 0: m starts at zero as in a fresh run
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
                params.append(p)
                grads.append(p.grad.contiguous())
                avgs.append(state.get("exp_avg"))
                sqs.append(state["exp_avg_sq"])
                counts.append(state["step"])
            if not params:
                continue
            # the step counts (CPU tensors, torch's convention) advanced and read in one go, not one .item() each
            torch._foreach_add_(counts, 1.0)
            steps = [int(s) for s in torch.stack(counts).tolist()]
            # one call per distinct step count (normally exactly one)
            for step in sorted(set(steps)):
                pick = [i for i, s in enumerate(steps) if s == step]
                kernels.adam_step([params[i] for i in pick], [grads[i] for i in pick],
                                  [avgs[i] for i in pick] if momentum else None,
                                  [sqs[i] for i in pick], lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                                  weight_decay=group["weight_decay"], step=step, decoupled=group["decoupled"])


class EMA:
    """Exponential moving average of parameters: ema <- decay ema + (1 - decay) param (fused)."""

    def __init__(self, parameters: Iterable[torch.nn.Parameter], decay: float = 0.95) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"ema decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.params = list(parameters)
        self.shadow = [p.detach().clone(memory_format=torch.contiguous_format) for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        kernels.ema_update(self.shadow, [p.detach() for p in self.params], self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {str(i): t for i, t in enumerate(self.shadow)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if len(state) != len(self.shadow):
            raise ValueError(f"EMA state has {len(state)} tensors, the model {len(self.shadow)}")
        for i, t in enumerate(self.shadow):
            t.copy_(state[str(i)])

    @torch.no_grad()
    def copy_to(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        for p, s in zip(parameters, self.shadow, strict=True):
            p.copy_(s)
