"""The Bradley-Terry preference model: learns a synthetic preference, round-trips through safetensors, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffinstruct.cli import main as cli_main
from diffinstruct.rewards import PreferenceModel, load_scorer
from diffinstruct.rewards.preference import Pairs, accuracy, bt_loss, load_pairs, train


def main(argv: list[str]) -> int:
    return cli_main(["preference", *argv])


def _synthetic(n: int, seed: int, size: int = 16) -> Pairs:
    """Hidden preference: redder (mean R - mean B) images win; 5% label noise."""
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(n, 3, size, size, generator=g) * torch.rand(n, 3, 1, 1, generator=g)
    b = torch.rand(n, 3, size, size, generator=g) * torch.rand(n, 3, 1, 1, generator=g)
    util = lambda x: x[:, 0].mean(dim=(1, 2)) - x[:, 2].mean(dim=(1, 2))  # noqa: E731
    label = (util(a) > util(b)).float()
    flip = torch.rand(n, generator=g) < 0.05
    label[flip] = 1 - label[flip]
    return Pairs(a, b, label, [""] * n)


def test_bt_loss_is_logistic():
    s = torch.tensor([2.0, -1.0])
    expected = -torch.log(torch.sigmoid(torch.tensor([2.0, 1.0]))).mean()
    torch.testing.assert_close(bt_loss(s, torch.zeros(2), torch.tensor([1.0, 0.0])), expected)


def test_learns_synthetic_preference_and_round_trips(tmp_path):
    model, record = train(_synthetic(600, seed=0), epochs=40, hidden=32, seed=0)
    held_out = _synthetic(400, seed=1)
    acc = accuracy(model, held_out)
    assert acc > 0.85, (acc, record)
    assert record["val_accuracy"] > 0.8
    path = model.save(tmp_path / "pref.safetensors", record)
    assert json.loads(path.with_suffix(".json").read_text())["config"]["format"] == "diffinstruct.preference.v1"
    loaded = load_scorer("preference", path)
    x = held_out.image_a[:5]
    torch.testing.assert_close(loaded(x, [""] * 5), model(x))
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loaded(xg).sum(), xg)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_gradcheck():
    model = PreferenceModel(hidden=8).double()
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(model, (x,))


def test_cli_on_tensor_file(tmp_path, capsys):
    from safetensors.torch import save_file

    p = _synthetic(300, seed=2)
    save_file({"image_a": p.image_a, "image_b": p.image_b, "label": p.label}, str(tmp_path / "pairs.safetensors"))
    out = tmp_path / "m.safetensors"
    assert main(["train", "--pairs", str(tmp_path / "pairs.safetensors"), "--out", str(out), "--epochs", "40"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["train_accuracy"] > 0.85
    assert main(["eval", "--model", str(out), "--pairs", str(tmp_path / "pairs.safetensors")]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] > 0.85


def test_cli_on_jsonl_of_png_files_and_folder(tmp_path, capsys):
    from PIL import Image

    p = _synthetic(40, seed=3, size=12)
    rows = []
    (tmp_path / "img").mkdir()
    for k in ("chosen", "rejected"):
        (tmp_path / "dir" / k).mkdir(parents=True)
    for i in range(len(p)):
        for side, img in (("a", p.image_a[i]), ("b", p.image_b[i])):
            arr = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            Image.fromarray(arr).save(tmp_path / "img" / f"{i}{side}.png")
        win, lose = ("a", "b") if p.label[i] > 0.5 else ("b", "a")
        rows.append({"prompt": f"p{i}", "image_a": f"img/{i}a.png", "image_b": f"img/{i}b.png",
                     "label": float(p.label[i])})
        for k, s in (("chosen", win), ("rejected", lose)):
            (tmp_path / "dir" / k / f"{i}.png").write_bytes((tmp_path / "img" / f"{i}{s}.png").read_bytes())
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    pairs = load_pairs(tmp_path / "pairs.jsonl", size=12)
    assert pairs.image_a.shape == (40, 3, 12, 12) and pairs.prompts[3] == "p3"
    torch.testing.assert_close(pairs.image_a, p.image_a, atol=1 / 255, rtol=0)
    folder = load_pairs(tmp_path / "dir", size=None)
    assert bool((folder.label == 1).all()) and folder.image_a.shape == (40, 3, 12, 12)
    out = tmp_path / "m.safetensors"
    assert main(["train", "--pairs", str(tmp_path / "pairs.jsonl"), "--out", str(out), "--epochs", "5",
                 "--size", "12"]) == 0
    assert out.is_file() and out.with_suffix(".json").is_file()
    capsys.readouterr()


def test_bad_inputs(tmp_path, capsys):
    (tmp_path / "p.jsonl").write_text(json.dumps({"image_a": "x.png"}) + "\n")
    with pytest.raises(ValueError, match="image_b"):
        load_pairs(tmp_path / "p.jsonl")
    # a missing input is bad input: exit status 2, as for every command
    assert main(["train", "--pairs", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o.safetensors")]) == 2
    assert "pairs not found" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="train one with"):
        PreferenceModel.load(tmp_path / "nope.safetensors")
