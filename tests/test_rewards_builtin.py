"""Weight-free rewards, spec parsing, weighted combinations, and the old names in diffinstruct.rewards."""

from __future__ import annotations

import pytest
import torch

from diffinstruct.rewards import (
    BrightnessReward,
    ColorMatchReward,
    ImplicitCFGReward,
    NoisyReward,
    PixelReward,
    Reward,
    SaturationReward,
    TargetReward,
    WeightedRewards,
    load_scorer,
    load_spec,
    parse_spec,
)
from diffinstruct.rewards.builtin import colour_in_prompt


def test_legacy_names_still_work():
    t = TargetReward(torch.zeros(2, 3))
    assert isinstance(t, Reward)
    x = torch.ones(2, 2, 3)
    torch.testing.assert_close(t(x, ["", ""], None), torch.full((2,), -6.0))
    w = WeightedRewards([t, t], [1.0, 0.5])
    torch.testing.assert_close(w(x, ["", ""], None), torch.full((2,), -9.0))
    assert isinstance(ImplicitCFGReward(lambda x, s, c: x), NoisyReward)


def test_brightness_and_saturation_values():
    grey = torch.full((1, 3, 4, 4), 0.25)
    red = torch.zeros(1, 3, 4, 4)
    red[:, 0] = 1.0
    assert float(BrightnessReward()(grey)) == pytest.approx(0.25)
    assert float(BrightnessReward()(red)) == pytest.approx(0.299)
    assert float(SaturationReward()(grey)) == pytest.approx(0.0)
    assert float(SaturationReward()(red)) == pytest.approx(1.0)


def test_colour_match():
    assert colour_in_prompt("A Red colored car.") == (1.0, 0.0, 0.0)
    assert colour_in_prompt("a bored cat") is None  # whole words only ("red" inside "bored")
    red = torch.zeros(2, 3, 4, 4)
    red[:, 0] = 1.0
    r = ColorMatchReward()(red, ["a red car", "a blue car"])
    torch.testing.assert_close(r, torch.tensor([0.0, -2.0]))
    assert float(ColorMatchReward()(red[:1], ["a cat"])) == 0.0
    with pytest.raises(ValueError, match="prompts"):
        ColorMatchReward()(red, ["one prompt"])


@pytest.mark.parametrize("cls", [BrightnessReward, SaturationReward, ColorMatchReward])
def test_builtin_gradcheck(cls):
    x = (torch.rand(2, 3, 5, 4, dtype=torch.float64) * 0.8 + 0.1).requires_grad_(True)
    prompts = ["a green field", "an orange"]
    assert torch.autograd.gradcheck(lambda t: cls()(t, prompts), (x,))


def test_gradient_ascent_on_colour_match_turns_image_red():
    x = torch.full((1, 3, 8, 8), 0.5, requires_grad=True)
    reward = ColorMatchReward()
    for _ in range(50):
        (g,) = torch.autograd.grad(reward(x, ["a red apple"]).sum(), x)
        x = (x + 2.0 * g).detach().requires_grad_(True)
    m = x.mean(dim=(2, 3))[0]
    assert m[0] > 0.95 and m[1] < 0.05 and m[2] < 0.05


def test_parse_spec():
    assert parse_spec("0.5*pickscore + aesthetic@/w/a b.safetensors+ -1e-1*brightness") == [
        (0.5, "pickscore", None), (1.0, "aesthetic", "/w/a b.safetensors"), (-0.1, "brightness", None)]
    with pytest.raises(ValueError, match="bad reward term"):
        parse_spec("0.5*")
    with pytest.raises(ValueError, match="unknown reward"):
        load_scorer("nosuchreward")


def test_weighted_builtin_spec_on_images_and_pixels():
    combo = load_spec("2*brightness+saturation")
    x = torch.rand(3, 3, 6, 6)
    prompts = ["a", "b", "c"]
    torch.testing.assert_close(combo(x, prompts), 2 * BrightnessReward()(x) + SaturationReward()(x))
    assert combo.name == "2*brightness+1*saturation"
    pix = PixelReward(combo, (-1.0, 1.0))
    torch.testing.assert_close(pix(x * 2 - 1, prompts, None), combo(x, prompts))
    assert isinstance(load_spec("brightness"), BrightnessReward)
