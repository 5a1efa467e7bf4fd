"""transformers models filled from a converted state dict, built without a random initialisation."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def build_without_init(cls: Any, config: Any, state: dict[str, torch.Tensor], what: str, **kwargs: Any) -> nn.Module:
    """`cls(config)` holding `state`: built on the meta device (no random init of ~1B parameters), strict about
    parameters; buffers are not in converted checkpoints, and the position_ids ones are refilled."""
    with torch.device("meta"):
        model = cls(config, **kwargs)
    model = model.to_empty(device="cpu")
    expected = set(model.state_dict())
    buffers = {k for k, _ in model.named_buffers()}
    absent = sorted(expected - set(state) - buffers)
    extra = sorted(set(state) - expected)
    if absent or extra:
        raise ValueError(f"{what} weights do not fit: missing {absent[:6]}, unexpected {extra[:6]}")
    model.load_state_dict(state, strict=False)
    for name, buf in model.named_buffers():
        if name.endswith("position_ids"):
            buf.copy_(torch.arange(buf.shape[-1]).expand_as(buf))
    return model
