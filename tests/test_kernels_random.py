"""Philox fills, sigma sampling, sigma tables, preconditioning: C kernels vs float64 NumPy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import reference_np as ref
from conftest import FLOAT_DTYPES, TOLERANCES, as64
from diffinstruct import _core, kernels
from diffinstruct.kernels import reference as torch_ref

# Random123 known-answer vectors for Philox4x32-10.
KAT = [
    ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
    ([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
    (
        [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344],
        [0xA4093822, 0x299F31D0],
        [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1],
    ),
]


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_numpy_reference_philox_known_answers(counter, key, expected):
    out = ref.philox4x32_10(np.array([counter], dtype=np.uint64), np.array(key, dtype=np.uint64))
    assert [int(v) for v in out[0]] == expected


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_torch_reference_philox_known_answers(counter, key, expected):
    from diffinstruct.kernels import philox

    words = [torch.tensor([c], dtype=torch.int64) for c in counter]
    out = philox.philox4x32_10(words, (key[0], key[1]))
    assert [int(v) for v in out] == expected


def test_kernel_uniform_bits_match_known_answer():
    # seed 0, block 0 is counter (0,0,0,0) key (0,0): its top 23 bits per lane, exactly.
    out = np.empty(4, np.float32)
    kernels.fill_uniform(out, seed=0, offset=0)
    expected = [((w >> 9) + 0.5) * 2.0**-23 for w in KAT[0][2]]
    np.testing.assert_array_equal(out.astype(np.float64), expected)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("n,offset", [(1, 0), (7, 3), (4099, 12345), (2**16 + 3, 2**40)])
def test_fill_uniform_and_normal_match_numpy(dtype, n, offset):
    seed = 0x1234_5678_9ABC
    u = torch.empty(n, dtype=dtype)
    z = torch.empty(n, dtype=dtype)
    kernels.fill_uniform(u, seed, offset)
    kernels.fill_normal(z, seed, offset)
    tol = TOLERANCES[dtype]
    np.testing.assert_allclose(as64(u), ref.uniform(seed, offset, n), rtol=tol["rtol"], atol=tol["atol"])
    # float32 Box-Muller: angle rounding bounds the error by ~6e-6 absolute
    atol = max(tol["atol"], 1e-5)
    np.testing.assert_allclose(as64(z), ref.normal(seed, offset, n), rtol=tol["rtol"], atol=atol)


def test_fill_is_a_stream_prefix_and_offset_shifts_by_blocks():
    long = np.empty(4000, np.float32)
    kernels.fill_normal(long, 9, 0)
    short = np.empty(1001, np.float32)
    kernels.fill_normal(short, 9, 0)
    np.testing.assert_array_equal(short, long[:1001])
    shifted = np.empty(400, np.float32)
    kernels.fill_normal(shifted, 9, 25)  # 25 blocks = 100 elements
    np.testing.assert_array_equal(shifted, long[100:500])


def test_normals_have_unit_moments():
    z = np.empty(1 << 20, np.float32)
    kernels.fill_normal(z, 2024)
    assert abs(z.mean()) < 5e-3
    assert abs(z.std() - 1.0) < 5e-3
    assert np.isfinite(z).all()


def test_torch_reference_stream_matches_c():
    a = torch.empty(1037)
    kernels.fill_normal(a, 77, 5)
    b = torch_ref.fill(torch.empty(1037), 77, 5, normal=True)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_sigma_tables_match_numpy_and_paper_ranges():
    pix = kernels.sigma_table("iddpm_linear")
    np.testing.assert_allclose(pix, ref.iddpm_linear_table(), rtol=1e-12)
    assert round(pix[0], 4) == 0.0100 and round(pix[-1], 4) == 156.6155
    sd = kernels.sigma_table("scaled_linear")
    np.testing.assert_allclose(sd, ref.scaled_linear_table(), rtol=1e-12)
    assert round(sd[0], 4) == 0.0292 and round(sd[-1], 4) == 14.6146
    assert round(sd[625], 4) == 2.5017
    assert np.all(np.diff(pix) > 0) and np.all(np.diff(sd) > 0)


@pytest.mark.parametrize("snap", [False, True])
def test_sample_sigma_lognormal_clamped_and_snapped(snap):
    table = kernels.sigma_table("iddpm_linear").astype(np.float32)
    batch, seed, offset = 4096, 31, 7
    sigma, index = kernels.sample_sigma(batch, seed, offset, p_mean=-2.0, p_std=2.0, sigma_min=0.01,
                                        sigma_max=156.6155, table=table, snap=snap)
    want, want_index = ref.sample_sigma(batch, seed, offset, -2.0, 2.0, 0.01, 156.6155, table.astype(np.float64))
    got_index = index.numpy()
    # ties between neighbours may round differently in float32; allow a neighbour there
    assert np.mean(got_index == want_index) > 0.999
    assert np.all(np.abs(got_index - want_index) <= 1)
    if snap:
        np.testing.assert_array_equal(sigma.numpy(), table[got_index])
    else:
        np.testing.assert_allclose(sigma.numpy(), want, rtol=2e-5)
    s = sigma.numpy()
    assert s.min() >= 0.01 - 1e-7 and s.max() <= 156.6155 + 1e-3
    # share of draws at the lowest level: P(ln sigma < ln edge) under N(-2, 2^2), edge = the clamp
    # (or, snapped, the midpoint between the first two table entries); 4 binomial std allowed
    edge = (table[0] + table[1]) / 2 if snap else 0.01
    expected = 0.5 * (1 + math.erf((math.log(edge) + 2.0) / (2.0 * math.sqrt(2))))
    lowest = np.mean(got_index == 0) if snap else np.mean(s <= 0.01)
    assert abs(lowest - expected) < 4 * math.sqrt(expected * (1 - expected) / batch)


def test_sample_sigma_torch_reference_agrees():
    table = kernels.sigma_table("scaled_linear").astype(np.float32)
    s_c, i_c = kernels.sample_sigma(512, 3, 0, p_mean=-1.2, p_std=1.2, sigma_min=0.0292, sigma_max=14.6146,
                                    table=table)
    s_r, i_r = torch_ref.sample_sigma(512, 3, 0, -1.2, 1.2, 0.0292, 14.6146, torch.from_numpy(table), False, "cpu")
    torch.testing.assert_close(s_c, s_r, rtol=2e-6, atol=0)
    assert (i_c == i_r).float().mean() > 0.99


@pytest.mark.parametrize("kind", ["edm", "eps", "v"])
def test_precond_coefficients(kind):
    sigma = np.array([0.01, 0.135, 1.0, 2.5, 80.0], np.float32)
    out = kernels.precond(sigma, kind=kind, sigma_data=0.5)
    s = sigma.astype(np.float64)
    if kind == "edm":
        sd = 0.5
        want = {"c_skip": sd**2 / (s**2 + sd**2), "c_out": s * sd / np.sqrt(s**2 + sd**2),
                "c_in": 1 / np.sqrt(s**2 + sd**2), "c_noise": np.log(s) / 4, "weight": ref.edm_lambda(s, sd)}
    else:
        v = kind == "v"
        want = {"c_skip": 1 / (s**2 + 1) if v else np.ones_like(s),
                "c_out": -s / np.sqrt(s**2 + 1) if v else -s, "c_in": 1 / np.sqrt(s**2 + 1), "c_noise": s,
                "weight": ref.edm_lambda(s, 1.0)}
    for key, value in want.items():
        np.testing.assert_allclose(out[key], value, rtol=2e-6, err_msg=key)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_fill_uniform_stays_inside_the_open_interval_in_every_dtype(dtype):
    """10^7 draws: a float32 draw just below 1 must not round up to 1.0 in float16/bfloat16
    (before the clamp about 2,400 and 19,600 of them did), and none may be 0."""
    n = 10**7
    u = kernels.fill_uniform(torch.empty(n, dtype=dtype), seed=2024)
    lo, hi = float(u.min()), float(u.max())
    assert lo > 0.0 and hi < 1.0, (lo, hi)
    assert hi == torch_ref.below_one(dtype)  # the top value is reached: the bound is tight, not a shift
    # the same through the binding directly, with a NumPy array (float16) and another seed
    if dtype == torch.float16:
        a = np.empty(n, np.float16)
        _core.fill_uniform(a, 99, 5)
        assert a.min() > 0 and a.max() < 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_torch_reference_uniform_has_the_same_bounds(dtype):
    """The PyTorch reference (the CUDA fallback) clamps the same way, bit for bit."""
    n = 2**18
    c = kernels.fill_uniform(torch.empty(n, dtype=dtype), seed=7)
    r = torch_ref.fill(torch.empty(n, dtype=dtype), 7, 0, normal=False)
    assert torch.equal(c, r) and float(r.max()) < 1.0
