"""The live view of a run without ComfyUI: the diversity and distance measures, previews every N steps during
Train / Align with the numbers the node shows, the diversity warning, and bad settings named."""

from __future__ import annotations

import json

import pytest
import torch
from test_nodes import PROMPTS, composed_loss, node, objects, reward  # noqa: F401 - objects is a fixture

from diffinstruct.comfyui import live as comfy_live
from diffinstruct.comfyui.live import LiveSettings
from diffinstruct.errors import ConfigError


def test_diversity_and_distance_are_rms_distances():
    a = torch.zeros(1, 3, 4, 4)
    b = torch.full((1, 3, 4, 4), 0.5)
    images = torch.cat([a, b, a, a])  # prompt 1: {0, 0.5}; prompt 2: {0, 0}
    assert comfy_live.pairwise_rms(images[:2]) == pytest.approx(0.5)
    assert comfy_live.diversity(images, 2) == pytest.approx(0.25)  # the mean of 0.5 and 0
    assert comfy_live.distance(images, torch.zeros_like(images)) == pytest.approx(0.125)
    three = torch.stack([torch.full((3, 2, 2), v) for v in (0.0, 0.1, 0.4)])
    assert comfy_live.pairwise_rms(three) == pytest.approx((0.1 + 0.4 + 0.3) / 3)


def view(sample, warn_fraction=0.5, every=2):
    settings = LiveSettings(every=every, samples_per_prompt=4, prompts=2, warn_fraction=warn_fraction)
    table = {"p": torch.zeros(1, 2), "q": torch.ones(1, 2)}
    spread = lambda z, cond: z  # noqa: E731 - the reference: each noise its own image
    return comfy_live.start(sample, spread, lambda x: x.sigmoid(), ["p", "q"], table, (3, 8, 8), 0,
                            torch.device("cpu"), settings)


def test_collapsed_samples_warn_and_the_picture_shows_it():
    collapsed = view(lambda z, cond: torch.zeros_like(z))  # every sample of a prompt the same image
    assert collapsed.reference_diversity > 0.05
    update = collapsed.update(2, {"reward": 0.25})
    assert update.warning and update.lines[-1].startswith("WARNING: diversity fell to 0%")
    width, height = update.image.size
    banner = update.image.crop((0, height - 20, 40, height)).convert("RGB").getcolors(4096)
    assert max(banner)[1][0] > 150  # a red banner under the picture
    healthy = view(lambda z, cond: 0.9 * z)
    update = healthy.update(2, {"reward": 0.5})
    assert not update.warning and "% of the reference's" in update.lines[2]
    assert update.image.size == (4 * comfy_live.TILE + comfy_live.PLOT_W, comfy_live.PLOT_H)
    never = view(lambda z, cond: torch.zeros_like(z), warn_fraction=0.0)
    assert not never.update(2, {}).warning


def test_previews_come_every_n_steps_and_the_node_shows_its_numbers(objects, tmp_path):  # noqa: F811
    out = node("DIPPAlign").align(objects["model"], objects["clip"], objects["vae"], PROMPTS, reward(), 1000.0, 1.5,
                                  6, batch_size=2, learning_rate=1e-2, width=32, height=32,
                                  checkpoint_dir=str(tmp_path / "run"), preview_every=2)
    summary = json.loads(out["result"][4])
    assert summary["previews"] == 3  # after steps 2, 4 and 6
    text = out["ui"]["text"][0]
    first, last = summary["reward_first"], summary["reward_last"]
    assert f"reward {first:.4g} -> {last:.4g}" in text
    assert "diversity" in text and "distance" in text and f"checkpoint folder {tmp_path / 'run'}" in text
    out = node("DIPPTrain").train(objects["model"], composed_loss(objects), objects["vae"], PROMPTS, 3, 2, 1e-2, 0, 32,
                                  32, str(tmp_path / "train"), 100, True, clip=objects["clip"], preview_every=0)
    assert json.loads(out["result"][4])["previews"] == 1  # 0: only at the end


@pytest.mark.parametrize(("name", "value", "match"), [("preview_every", -1, "preview_every"),
                                                      ("diversity_warning", 1.5, "diversity_warning"),
                                                      ("diversity_warning", float("nan"), "diversity_warning")])
def test_bad_live_settings_are_named_before_any_work(objects, tmp_path, name, value, match):  # noqa: F811
    with pytest.raises(ConfigError, match=match):
        node("DIPPAlign").align(objects["model"], objects["clip"], objects["vae"], PROMPTS, reward(), 10.0, 1.0, 2,
                                width=32, height=32, checkpoint_dir=str(tmp_path / "x"), **{name: value})
    assert not (tmp_path / "x").exists()


def test_a_checkpoint_dir_that_is_a_file_is_refused_at_once(objects, tmp_path):  # noqa: F811
    target = tmp_path / "file"
    target.write_text("")
    with pytest.raises(ConfigError, match="is not a folder"):
        node("DIPPAlign").align(objects["model"], objects["clip"], objects["vae"], PROMPTS, reward(), 10.0, 1.0, 2,
                                width=32, height=32, checkpoint_dir=str(target))


def test_the_live_view_leaves_the_runs_random_streams_alone(objects, tmp_path):  # noqa: F811
    """Previews draw their own noise under no_grad: a run with previews trains exactly as one without."""
    args = dict(batch_size=2, learning_rate=1e-2, width=32, height=32)
    a = node("DIPPAlign").align(objects["model"], objects["clip"], objects["vae"], PROMPTS, reward(), 1000.0, 1.5, 4,
                                checkpoint_dir=str(tmp_path / "a"), preview_every=1, **args)["result"][1]
    b = node("DIPPAlign").align(objects["model"], objects["clip"], objects["vae"], PROMPTS, reward(), 1000.0, 1.5, 4,
                                checkpoint_dir=str(tmp_path / "b"), preview_every=0, **args)["result"][1]
    assert a.tensors.keys() == b.tensors.keys()
    for key in a.tensors:
        assert torch.equal(a.tensors[key], b.tensors[key]), key
