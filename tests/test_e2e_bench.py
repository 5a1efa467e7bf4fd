"""bench/e2e.py on a tiny UNet: the peer loop (bench/peer_loop.py) and ours compute the same DI++ step, the onepass
plan leaves the generator's gradients as they were, and the benchmark's process path
and report run. Nothing here is timed: the benchmark itself is `make bench`."""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("diffusers")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import e2e  # noqa: E402
import e2e_child  # noqa: E402
import e2e_report  # noqa: E402
import peer_loop  # noqa: E402

from diffinstruct import kernels  # noqa: E402
from diffinstruct.lora import LoRALayer  # noqa: E402


def _pair(mode: str, bf16: bool = False) -> tuple[Any, peer_loop.PeerLoop]:
    """Ours and the peer loop on the same tiny UNet, with the same (random, non-zero) adapters in shared mode."""
    spec = e2e_child.Spec("ours", mode=mode, bf16=bf16, tiny=True, latent=8)
    unet = e2e_child.build_unet(spec)
    trainer = e2e_child.build_ours(spec, copy.deepcopy(unet))
    peer = e2e_child.build_peer(spec, unet)
    if mode == "shared":
        ours = {n.removeprefix("base.net.model."): m for n, m in trainer.models.reference.named_modules()
                if isinstance(m, LoRALayer)}
        theirs = {n: m for n, m in peer.g.named_modules() if isinstance(m, peer_loop.HandLoRA)}
        assert ours.keys() == theirs.keys() and ours
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for name, layer in ours.items():
                for role in ("ta", "generator"):  # distinct roles: TA, generator and reference all differ
                    down, up = layer.adapters[role]
                    up.weight.copy_(0.05 * torch.randn(up.weight.shape, generator=g))
                    theirs[name].down[role].weight.copy_(down.weight)
                    theirs[name].up[role].weight.copy_(up.weight)
    return trainer, peer


def _our_draws(trainer: Any, step: int = 0) -> peer_loop.Draws:
    """The random inputs ours draws from its streams at `step`, for the peer loop."""
    b, shape = trainer.cfg.batch_size, (trainer.cfg.batch_size, *trainer.models.latent_shape)
    batch = trainer.prompts.batch(b, trainer._seed(step, "prompts", 0))

    def eps(purpose: str) -> torch.Tensor:  # add_noise(0, 1, seed) is the kernel's eps of that stream
        return kernels.add_noise(torch.zeros(shape), torch.ones(b), trainer._seed(step, purpose, 0))

    return peer_loop.Draws(trainer._latents(step, "z", 0), batch.cond, batch.uncond, trainer._sigma(step, "sigma", 0),
                           eps("eps"), trainer._sigma(step, "ta_sigma", 0), eps("ta_eps"))


def _grads(params: list[torch.nn.Parameter]) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in params])


def _ours_grads(trainer: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    samples: list[Any] = []
    trainer.accumulate_generator_grads(0, samples)
    trainer.accumulate_ta_grads(0, 0, samples)
    return samples[0].x0, _grads(trainer.generator_params), _grads(trainer.ta_params)


def _close(a: torch.Tensor, b: torch.Tensor, rel: float) -> None:
    cos = torch.nn.functional.cosine_similarity(a, b, dim=0)
    assert cos > 1 - rel and abs(a.norm() / b.norm() - 1) < rel, (float(cos), float(a.norm()), float(b.norm()))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("mode", ["shared", "full"])
def test_peer_loop_computes_our_step(mode: str) -> None:
    trainer, peer = _pair(mode)
    x0, g_ours, ta_ours = _ours_grads(trainer)
    draws = _our_draws(trainer)
    loss_g, x0_peer = peer.generator_loss(draws)
    loss_g.backward()
    loss_ta = peer.ta_loss(draws, x0_peer)
    loss_ta.backward()
    torch.testing.assert_close(x0_peer, x0, rtol=1e-5, atol=1e-5)
    assert g_ours.norm() > 0 and ta_ours.norm() > 0
    _close(_grads(peer.gen_params), g_ours, 1e-4)  # the MSE-to-target loss has our G as its gradient
    _close(_grads(peer.ta_params), ta_ours, 1e-4)
    # a whole iteration of each moves both networks by finite amounts
    for p in trainer.generator_params + trainer.ta_params + peer.gen_params + peer.ta_params:
        p.grad = None
    before = [p.detach().clone() for p in trainer.generator_params + peer.gen_params]
    m, out = trainer.train_step(1), peer.step()
    assert m["generator_ok"] == 1.0 and m["ta_ok"] == 1.0 and all(math.isfinite(v) for v in out.values())
    after = trainer.generator_params + peer.gen_params
    assert all(torch.isfinite(p).all() for p in after)
    assert all(not torch.equal(a, b) for a, b in zip(before, after, strict=True) if a.dim() > 1)


def test_onepass_keeps_g_and_trains_the_ta_at_the_generators_noise() -> None:
    """ta_sample = "onepass" against the peer loop whose TA step draws the generator step's sigma and eps."""
    _, g_ref, _ = _ours_grads(_pair("shared")[0])
    trainer, peer = _pair("shared")
    draws = _our_draws(trainer)
    trainer.cfg = dataclasses.replace(trainer.cfg, ta_sample="onepass")
    seen: dict[str, torch.Tensor] = {}
    trainer._apply_generator = lambda ok: seen.update(g=_grads(trainer.generator_params))
    trainer._apply_ta = lambda ok: seen.update(ta=_grads(trainer.ta_params))
    m = trainer.train_step(0)
    assert m["generator_ok"] == 1.0 and m["ta_ok"] == 1.0
    torch.testing.assert_close(seen["g"], g_ref, rtol=1e-5, atol=1e-7)
    draws.ta_sigma, draws.ta_eps = draws.sigma, draws.eps
    _, x0 = peer.generator_loss(draws)
    peer.ta_loss(draws, x0).backward()
    _close(_grads(peer.ta_params), seen["ta"], 1e-4)


def test_interleaved_processes_and_report(tmp_path: Path) -> None:
    # one process (each costs seconds of imports); it stands in for ours and the peer in the report
    spec = e2e_child.Spec("ours+onepass", mode="shared", bf16=True, tiny=True, latent=8)
    results, share = e2e.run_interleaved([spec], warmup=1, repeats=1, profile=True, log=lambda _: None)
    res = results[spec.impl]
    assert res.error is None and res.finite and len(res.seconds) == len(res.cpu) == 1 and res.peak_mib > 0
    assert res.profile is not None and res.profile["seconds"]["conv"] > 0
    results["ours"] = results["peer"] = res
    rows = [{"mode": "shared", "bf16": True, "results": results, "others": share}]
    points = [{"batch": b, "latent": lat, "repeats": 1, "others": 0.0,
               "result": e2e_report.Result("ours", [0.2], 50.0 + b, [0.1 * b * (lat / 8) ** 2])}
              for b, lat in ((1, 8), (2, 8), (1, 16))]
    text = e2e_report.report(rows, points, e2e.QUICK, 1.0, quick=True)
    assert "| shared | bf16 autocast | " in text and "1.00x" in text and "op class" in text
    assert "ours+onepass" in text
    assert "CPU time = 0.00 s + 0.10 s x batch" in text and "CPU time grows as tokens^1.00" in text
    e2e.save(tmp_path / "m.json", rows, points, 1.0)  # --json, then --from-json renders the same section
    assert e2e_report.report(*e2e.load(tmp_path / "m.json")[:2], e2e.QUICK, 1.0, quick=True) == text
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\nkernels\n")
    e2e.write_section(out, "first")
    e2e.write_section(out, "second")
    assert out.read_text() == f"# Benchmarks\n\nkernels\n\n{e2e.BEGIN}\nsecond\n{e2e.END}\n"
