"""Conditioning with constants (Lumina 2's num_tokens), padding to one token count, and adapters over a frozen base
that keeps a low-precision dtype: the parts of the family support that run without ComfyUI (the real models are
tested in tests/comfy_host/test_family_align.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffinstruct.comfyui.conditioning import padded_tokens, same_token_count
from diffinstruct.lora import adapter_dtype, attach_lora
from diffinstruct.prompts import _cat, join_conditioning


def cond(tokens: int, num_tokens: int | None = None, width: int = 4) -> dict:
    out: dict = {"c_crossattn": torch.randn(1, tokens, width)}
    if num_tokens is not None:
        out["num_tokens"] = num_tokens
    return out


def test_constants_batch_when_equal_and_are_refused_when_not():
    a, b = cond(5, 5), cond(5, 5)
    joined = _cat([a, b])
    assert joined["num_tokens"] == 5 and joined["c_crossattn"].shape == (2, 5, 4)
    with pytest.raises(ValueError, match=r"constant differs within one batch \(\[3, 5\]\)"):
        _cat([cond(5, 5), cond(5, 3)])


def test_cond_and_uncond_share_a_pass_only_when_their_constants_agree():
    both = join_conditioning(cond(5, 5), cond(5, 5))
    assert both is not None and both["num_tokens"] == 5 and both["c_crossattn"].shape[0] == 2
    assert join_conditioning(cond(5, 5), cond(5, 4)) is None  # two passes instead


def test_token_counts_are_padded_with_a_mask_for_models_told_their_count():
    table = {"long": cond(6, 6), "short": cond(3, 3), "": cond(4, 4)}
    out = same_token_count(table)
    for key, real in (("long", 6), ("short", 3), ("", 4)):
        c = out[key]
        assert c["c_crossattn"].shape == (1, 6, 4) and c["num_tokens"] == 6
        assert c["attention_mask"].tolist() == [[1] * real + [0] * (6 - real)]
        torch.testing.assert_close(c["c_crossattn"][:, :real], table[key]["c_crossattn"])
        assert not c["c_crossattn"][:, real:].any()
    batch = _cat(list(out.values()))  # they now share a network pass
    assert batch["c_crossattn"].shape == (3, 6, 4) and batch["attention_mask"].shape == (3, 6)


def test_an_existing_mask_is_padded_and_equal_counts_are_left_alone():
    masked = {**cond(4, 2), "attention_mask": torch.tensor([[1, 1, 0, 0]])}
    out = padded_tokens({"a": masked, "b": cond(5, 5)})
    assert out["a"]["attention_mask"].tolist() == [[1, 1, 0, 0, 0]]
    same = {"a": cond(4, 4), "b": cond(4, 4)}
    assert padded_tokens(same) is same


def test_models_without_a_count_keep_comfyuis_repeat():
    out = same_token_count({"a": cond(2), "b": cond(3)})
    assert out["a"]["c_crossattn"].shape == (1, 6, 4) and "attention_mask" not in out["a"]


def test_adapters_over_a_low_precision_frozen_base_are_float32():
    fp8 = nn.Linear(8, 8).to(torch.float8_e4m3fn)
    assert adapter_dtype(fp8) == torch.float32
    casting = nn.Linear(8, 8).to(torch.bfloat16)
    casting.comfy_cast_weights = True  # a ComfyUI manual-cast layer: its inputs are float32
    assert adapter_dtype(casting) == torch.float32
    assert adapter_dtype(nn.Linear(8, 8).to(torch.bfloat16)) == torch.bfloat16  # computes in its own dtype
    model = nn.Sequential(nn.Linear(8, 8))
    model[0].to(torch.float8_e4m3fn)
    _, params = attach_lora(model, rank=2)
    assert {p.dtype for ps in params.values() for p in ps} == {torch.float32}
    assert model[0].base.weight.dtype == torch.float8_e4m3fn  # the base stays as it was


def test_package_denoisers_are_not_guidance_distilled():
    from diffinstruct.comfyui.host import guidance_distilled, model_patches

    assert not guidance_distilled(nn.Linear(2, 2))
    assert model_patches(nn.Linear(2, 2)) == []
