"""Results do not depend on the thread count (fixed blocked reduction order), nor on whether the
two-pass kernels run sample-major or pass-major."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

SCRIPT = r"""
import sys, numpy as np, torch
from diffinstruct import kernels, _core
g = torch.Generator().manual_seed(0)
shape = (5, 4, 40, 52)
x0, ta, c, u, dr = (torch.randn(shape, generator=g) for _ in range(5))
sigma = torch.tensor([0.01, 0.2, 1.0, 5.0, 80.0])
out = {"threads": np.array([_core.threads()])}
res = kernels.generator_grad(x0, ta, c, d_uncond=u, omega=4.5, dr=dr, alpha=3.0)
for k, v in res._asdict().items():
    out["gen_" + k] = v.numpy()
res = kernels.ta_loss(ta, x0, sigma)
out["ta_loss"], out["ta_grad"] = res.loss.numpy(), res.grad.numpy()
res = kernels.huber_terms(x0, c, ta, sigma, 0.3)
for k, v in res._asdict().items():
    out["hub_" + k] = v.numpy()
out["xt"] = kernels.add_noise(x0, sigma, 3, 9).numpy()
# batch 1: sample-major on one thread, pass-major on two -- the same bits either way
one = [t[:1].contiguous() for t in (x0, ta, c, u, dr)]
res = kernels.generator_grad(one[0], one[1], one[2], d_uncond=one[3], omega=4.5, dr=one[4], alpha=3.0)
out["gen1_grad"], out["gen1_weight"] = res.grad.numpy(), res.weight.numpy()
res = kernels.ta_loss(one[1], one[0], sigma[:1])
out["ta1_loss"], out["ta1_grad"] = res.loss.numpy(), res.grad.numpy()
out["hub1_a"] = kernels.huber_terms(one[0], one[2], one[1], sigma[:1], 0.3).a.numpy()
params = [torch.randn(3000, generator=g) for _ in range(7)]
grads = [torch.randn(3000, generator=g) for _ in range(7)]
m = [torch.zeros(3000) for _ in range(7)]; v = [torch.zeros(3000) for _ in range(7)]
kernels.adam_step(params, grads, m, v, lr=1e-3, step=1)
kernels.ema_update(m, params, 0.95)
out["adam"] = torch.cat(params).numpy(); out["ema"] = torch.cat(m).numpy()
np.savez(sys.argv[1], **out)
"""


def run_with_threads(threads: int, path: Path) -> dict[str, np.ndarray]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    subprocess.run([sys.executable, "-c", SCRIPT, str(path)], check=True, env=env)
    with np.load(path) as data:
        return dict(data)


def test_one_and_two_threads_give_identical_bits(tmp_path):
    one = run_with_threads(1, tmp_path / "one.npz")
    two = run_with_threads(2, tmp_path / "two.npz")
    assert one.pop("threads")[0] == 1 and two.pop("threads")[0] == 2
    assert one.keys() == two.keys()
    for key in one:
        assert one[key].tobytes() == two[key].tobytes(), key
