"""With every network socket blocked, all reward loaders still work from local files (nothing tries to download),
and missing files give RewardWeightsNotFound, not a connection attempt."""

from __future__ import annotations

import socket

import pytest
import torch

pytest.importorskip("transformers")

from conftest import NetworkBlocked
from diffinstruct.rewards import NAMES, RewardWeightsNotFound, load_scorer, load_spec  # noqa: E402
from diffinstruct.rewards.preference import train  # noqa: E402
from diffinstruct.rewards.tiny import (  # noqa: E402
    write_tiny_aesthetic_head,
    write_tiny_clip,
    write_tiny_hpsv2,
    write_tiny_imagereward,
)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("offline_models")
    write_tiny_clip(root / "rewards" / "clip", seed=0)
    write_tiny_clip(root / "rewards" / "pickscore", seed=1, hidden_act="gelu")
    write_tiny_aesthetic_head(root / "rewards" / "aesthetic" / "sac+logos+ava1-l14-linearMSE.safetensors")
    write_tiny_hpsv2(root / "rewards" / "hpsv2")
    write_tiny_imagereward(root / "rewards" / "imagereward")
    g = torch.Generator().manual_seed(0)
    from diffinstruct.rewards.preference import Pairs

    a, b = torch.rand(20, 3, 8, 8, generator=g), torch.rand(20, 3, 8, 8, generator=g)
    model, rec = train(Pairs(a, b, (a.mean(dim=(1, 2, 3)) > b.mean(dim=(1, 2, 3))).float(), [""] * 20), epochs=2)
    model.save(root / "pref.safetensors", rec)
    return root


def test_blocking_works(no_network):
    with pytest.raises(NetworkBlocked):
        socket.create_connection(("huggingface.co", 443))
    with pytest.raises(NetworkBlocked):
        socket.socket().connect(("127.0.0.1", 9))


def test_every_loader_works_offline(models, no_network):
    x = torch.rand(2, 3, 24, 30, requires_grad=True)
    prompts = ["a red car", "a dog"]
    for name in ("clip", "pickscore", "aesthetic", "hpsv2", "imagereward", "brightness", "saturation", "color_match"):
        r = load_scorer(name, models_dir=models)(x, prompts)
        assert r.shape == (2,)
    combo = load_spec(f"pickscore+0.5*aesthetic+hpsv2+imagereward+preference@{models / 'pref.safetensors'}",
                      models_dir=models)
    (g,) = torch.autograd.grad(combo(x, prompts).sum(), x)
    assert torch.isfinite(g).all()
    assert no_network == []


def test_missing_files_fail_locally(tmp_path, no_network):
    for name in NAMES:
        if name in ("clip", "pickscore", "aesthetic", "hpsv2", "imagereward"):
            with pytest.raises(RewardWeightsNotFound):
                load_scorer(name, models_dir=tmp_path)
    with pytest.raises(RewardWeightsNotFound):
        load_scorer("clip", "openai/clip-vit-large-patch14")  # looks like a hub id: still only a local path
    assert no_network == []
