"""bench/bench_cases.py validates each case against the PyTorch reference before bench/bench.py times it:
every case passes on small tensors, and a kernel that computes something else is caught."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import bench_cases as cases  # noqa: E402

from diffinstruct.kernels import ops  # noqa: E402

SHAPE = (2, 4, 8, 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("builder,kw", [(b, kw) for b, kw, _ in cases.BUILDERS],
                         ids=[f"{b.__name__}{'-' + '-'.join(map(str, kw.values())) if kw else ''}"
                              for b, kw, _ in cases.BUILDERS])
def test_every_case_matches_the_reference(builder, kw, dtype):
    builder(SHAPE, dtype, 2, **kw).check()


def test_a_kernel_that_disagrees_with_the_reference_is_caught(monkeypatch):
    case = cases.cfg_combine(SHAPE, torch.float32, 1)
    case.check()
    op = ops.OPS["cfg_combine"]

    def off_by_a_little(v):
        op.reference(v)
        v["out"].add_(1e-3)

    monkeypatch.setitem(ops.OPS, "cfg_combine", dataclasses.replace(op, reference=off_by_a_little))
    with pytest.raises(AssertionError, match=r"^cfg_combine: output 0 differs from the PyTorch reference"):
        case.check()


def test_a_case_without_outputs_is_caught():
    case = cases.Case("nothing", "", 0, 0, run=lambda d: None, first_set={})
    with pytest.raises(AssertionError, match=r"^nothing: 0 outputs"):
        case.check()
