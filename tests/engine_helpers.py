"""Helpers shared by the engine tests: the full training state of a trainer, as tensors."""

from __future__ import annotations

import torch

from diffinstruct.trainer import DITrainer


def full_state(trainer: DITrainer) -> dict[str, torch.Tensor]:
    """Trainable parameters, EMA, both optimisers' states and the guard counters (copies)."""
    out = {}
    for role, tensors in (("g", trainer.generator_params), ("t", trainer.ta_params), ("e", trainer.ema.shadow)):
        out.update({f"{role}{i}": t.detach().clone() for i, t in enumerate(tensors)})
    for role, opt, params in (("og", trainer.opt_generator, trainer.generator_params),
                              ("ot", trainer.opt_ta, trainer.ta_params)):
        for i, p in enumerate(params):
            out.update({f"{role}{i}.{k}": v.clone() for k, v in opt.state[p].items()})
    out["counters"] = torch.tensor([trainer.bad_in_a_row, trainer.skipped_steps])
    return out
