"""`diffinstruct eval --images / --prompts` (and its old spelling `evaluate`): prompt sets, image folders and
generator checkpoints scored by every available metric; missing weights are skipped with the reason; numbers
checked against direct computation."""

from __future__ import annotations

import hashlib
import json
import re

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from diffinstruct import cli, prompt_sets, run
from diffinstruct.rewards import BrightnessReward, PixelReward, SaturationReward

ROOT = Path(__file__).resolve().parents[1]
SIDE = 4  # the pixel toy's images are 3 x SIDE x SIDE

pytestmark = pytest.mark.usefixtures("one_thread")


# ============================================================================================== a pixel-space problem
class FlatPixelReward(nn.Module):
    """The trainer's reward for flat samples [B, 3*SIDE*SIDE] in [-1, 1] that are images."""

    def __init__(self, scorer: nn.Module) -> None:
        super().__init__()
        self.pixel = PixelReward(scorer, (-1.0, 1.0))
        self.name = self.pixel.name

    def forward(self, x0, prompts, cond=None):
        return self.pixel(x0.reshape(-1, 3, SIDE, SIDE), prompts)


class PixelToy(run.Toy2D):
    """toy2d's exact Gaussian-mixture teacher in 3*SIDE*SIDE dimensions, read as flat-colour RGB images in [-1, 1]:
    a real problem (exact reference, trained generator and TA) whose samples are images, so it takes image rewards
    and can generate images for `evaluate`, as a pixel-space plugin problem does."""

    name = "pixel_toy"
    rewards = ("none",)

    def data_numel(self, spec):
        return 3 * SIDE * SIDE

    def build(self, spec):
        from diffinstruct import toy

        opts = spec.problem_options
        k = opts["classes"]
        colours = torch.rand(k, 3, 1, 1, generator=torch.Generator().manual_seed(0)) * 1.2 - 0.6
        mixture = toy.GaussianMixture(colours.expand(k, 3, SIDE, SIDE).reshape(k, -1), s2=opts["s2"])
        models = toy.build_models(mixture, hidden=opts["hidden"], seed=spec.seed, sigma_init=self._sigma_init(spec))
        return run.Built(models=models, prompts=toy.class_prompts(k), reward=run.build_reward(spec),
                         extras={"mixture": mixture})

    def image_reward(self, scorer, spec):
        return FlatPixelReward(scorer)

    def generate_images(self, built, spec, prompts, seed):
        from diffinstruct import toy

        labels = torch.tensor([int(p.split()[-1]) for p in prompts])
        x = toy.generate(built.models, labels, seed)
        return ((x.reshape(-1, 3, SIDE, SIDE) + 1) / 2).clamp(0, 1)


def register_pixel_problem() -> None:
    if "pixel_toy" not in run.PROBLEMS:
        run.register_problem(PixelToy())


def pixel_config(tmp_path: Path, out: str = "out", steps: int = 6, alpha: float = 0.0, extra_run: str = "") -> Path:
    register_pixel_problem()
    path = tmp_path / f"{out}.toml"
    path.write_text(f'[run]\nproblem = "pixel_toy"\nsteps = {steps}\nout_dir = "{tmp_path / out}"\n'
                    f"checkpoint_every = {steps}\nseed = 3\n{extra_run}\n"
                    f"[train]\nbatch_size = 32\nlr_generator = 2e-3\nlr_ta = 2e-3\nalpha = {alpha}\n"
                    "[pixel_toy]\nclasses = 3\nhidden = 32\n")
    return path


# ============================================================================================== prompt sets
def test_packaged_prompt_sets_match_their_attribution():
    readme = (prompt_sets.DATA_DIR / "README.md").read_text()
    for name in prompt_sets.PROMPT_SETS.values():
        digest = hashlib.sha256((prompt_sets.DATA_DIR / name).read_bytes()).hexdigest()
        assert re.search(rf"^{digest}  {re.escape(name)}$", readme, re.M), name
    coco = prompt_sets.load_prompts("coco1k")
    assert len(coco) == 1000 and len({it.prompt for it in coco}) == 1000
    assert coco[0].prompt == "A woman stands in the dining area at the table."
    hps = prompt_sets.load_prompts("hpsv2")
    assert len(hps) == 3200 and [it.group for it in hps[::800]] == list(prompt_sets.HPSV2_STYLES)
    photo = prompt_sets.load_prompts("hpsv2:photo")
    assert len(photo) == 800 and all(it.group == "photo" for it in photo) and photo == hps[2400:]
    # packaged: the package-data globs of pyproject.toml cover both files
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["diffinstruct"]
    pkg = prompt_sets.DATA_DIR.parents[1]
    for name in [*prompt_sets.PROMPT_SETS.values(), "README.md"]:
        assert any((prompt_sets.DATA_DIR / name) in set(pkg.glob(g)) for g in globs), name


def test_prompt_files(tmp_path):
    (tmp_path / "p.txt").write_text("a red car\n\n  a blue boat \n")
    assert [it.prompt for it in prompt_sets.load_prompts(str(tmp_path / "p.txt"))] == ["a red car", "a blue boat"]
    (tmp_path / "p.tsv").write_text('Prompt\tCategory\n"quoted" thing\tx\nplain\ty\n')
    assert [it.prompt for it in prompt_sets.load_prompts(str(tmp_path / "p.tsv"))] == ['"quoted" thing', "plain"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "a", "group": "g1"}\n{"prompt": "b", "group": "g2"}\n')
    assert [(it.prompt, it.group) for it in prompt_sets.load_prompts(str(tmp_path / "p.jsonl"))] == [("a", "g1"),
                                                                                                  ("b", "g2")]
    for bad, needle in ((tmp_path / "nope.txt", "does not exist"), (tmp_path / "p.csv", "unknown prompt file type")):
        bad.touch() if bad.suffix == ".csv" else None
        with pytest.raises(run.ConfigError, match=needle):
            prompt_sets.load_prompts(str(bad))
    with pytest.raises(run.ConfigError, match="unknown HPSv2 style"):
        prompt_sets.load_prompts("hpsv2:cartoon")


# ============================================================================================== image folders
def write_images(folder: Path) -> tuple[torch.Tensor, list[str]]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (12, 12, 3), dtype=np.uint8) for _ in range(4)] + [
        rng.integers(0, 256, (10, 14, 3), dtype=np.uint8)]  # one of another size: its own batch
    prompts = ["a red car", "a blue boat", "a green tree", "a dog", "a yellow sun"]
    records = []
    for i, (arr, prompt) in enumerate(zip(arrays, prompts, strict=True)):
        Image.fromarray(arr).save(folder / f"img{i}.png")
        records.append({"image": f"img{i}.png", "prompt": prompt, "group": "even" if i % 2 == 0 else "odd"})
    (folder / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    tensors = [torch.from_numpy(a).permute(2, 0, 1).double() / 255 for a in arrays]
    return tensors, prompts


def test_images_folder_every_available_metric(tmp_path, capsys):
    from diffinstruct.rewards import ClipScore, load_clip_score
    from diffinstruct.rewards.tiny import write_tiny_clip

    tensors, prompts = write_images(tmp_path / "imgs")
    models = tmp_path / "models"
    write_tiny_clip(models / "rewards" / "clip")
    assert cli.main(["evaluate", "--images", str(tmp_path / "imgs"), "--models-dir", str(models), "--batch", "3",
                     "--out", str(tmp_path / "rep.json")]) == 0
    table = capsys.readouterr().out
    rep = json.loads((tmp_path / "rep.json").read_text())
    assert rep["n_images"] == 5
    # weights present: clip and the built-ins ran; the others are skipped, each naming its missing file
    assert set(rep["metrics"]) == {"clip", "brightness", "saturation", "color_match"}
    assert set(rep["skipped"]) == {"imagereward", "pickscore", "hpsv2", "aesthetic"}
    assert str(models / "rewards" / "pickscore") in rep["skipped"]["pickscore"]
    assert "aesthetic" in rep["skipped"]["aesthetic"] and "Nothing is downloaded" in rep["skipped"]["aesthetic"]
    for line in ("skipped pickscore:", "brightness   all", "color_match  even"):
        assert line in table, (line, table)
    # the numbers are those of the scorers on the images
    direct = {"brightness": [float(BrightnessReward()(t[None])) for t in tensors],
              "saturation": [float(SaturationReward()(t[None])) for t in tensors]}
    clip = load_clip_score(models / "rewards" / "clip")
    assert isinstance(clip, ClipScore)
    direct["clip"] = [float(clip(t[None].float(), [p])) for t, p in zip(tensors, prompts, strict=True)]
    for name, values in direct.items():
        m = rep["metrics"][name]
        assert m["count"] == 5
        assert m["mean"] == pytest.approx(np.mean(values), abs=1e-5)
        assert m["std"] == pytest.approx(np.std(values), abs=1e-5)
        assert m["min"] == pytest.approx(min(values), abs=1e-5)
        assert m["groups"]["even"]["mean"] == pytest.approx(np.mean(values[::2]), abs=1e-5)


def test_images_without_prompts_runs_prompt_free_metrics_only(tmp_path, capsys):
    write_images(tmp_path / "imgs")
    (tmp_path / "imgs" / "prompts.jsonl").unlink()
    assert cli.main(["evaluate", "--images", str(tmp_path / "imgs"), "--metrics", "brightness,color_match,"
                     "2*brightness+saturation", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert set(rep["metrics"]) == {"brightness", "2*brightness+saturation"}
    assert "needs prompts" in rep["skipped"]["color_match"]
    b = rep["metrics"]["brightness"]["mean"]
    assert rep["metrics"]["2*brightness+saturation"]["mean"] > 2 * b  # saturation of random images is positive


@pytest.mark.parametrize("args, needle", [
    (["--images", "{tmp}/none"], "is not a directory"),
    (["--images", "{tmp}/imgs", "--metrics", "brightness,nonsense"], "unknown reward 'nonsense'"),
    (["--images", "{tmp}/imgs", "--n", "3"], "--n applies to --checkpoint"),
    (["--images", "{tmp}/imgs", "--prompts", "{tmp}/missing.jsonl"], "missing.jsonl does not exist"),
    (["--images", "{tmp}/imgs", "--metrics", "pickscore", "--models-dir", "{tmp}"], "no metric could be loaded"),
    (["--checkpoint", "{tmp}/imgs"], "--checkpoint needs --prompts"),
    (["--checkpoint", "{tmp}/imgs", "--prompts", "coco1k", "--metrics", "brightness"], "no complete checkpoint"),
])
def test_bad_input_exits_2(tmp_path, capsys, args, needle):
    write_images(tmp_path / "imgs")
    assert cli.main(["evaluate", *[a.replace("{tmp}", str(tmp_path)) for a in args]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err, err


# ============================================================================================== generator checkpoints
def test_checkpoint_over_prompt_file(tmp_path, capsys):
    config = pixel_config(tmp_path, steps=4)
    assert cli.main(["train", "--config", str(config), "--no-progress"]) == 0
    capsys.readouterr()
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"class {i % 3}", "group": f"c{i % 3}"}) + "\n"
                               for i in range(10)))
    saved = tmp_path / "gen"
    assert cli.main(["evaluate", "--checkpoint", str(tmp_path / "out"), "--prompts", str(prompts), "--batch", "4",
                     "--metrics", "brightness,saturation", "--save-images", str(saved), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["step"] == 4 and rep["problem"] == "pixel_toy" and rep["n_images"] == 10
    assert set(rep["metrics"]["brightness"]["groups"]) == {"c0", "c1", "c2"}
    # the generated images, as the problem generates them from the EMA weights with seed + batch offset
    _, spec, _, built = run.load_weights(tmp_path / "out", weights="ema")
    problem = run.PROBLEMS["pixel_toy"]
    labels = [f"class {i % 3}" for i in range(10)]
    images = torch.cat([problem.generate_images(built, spec, labels[s:s + 4], s) for s in (0, 4, 8)])
    expect = BrightnessReward()(images).double().numpy()
    assert rep["metrics"]["brightness"]["mean"] == pytest.approx(expect.mean(), abs=1e-6)
    assert rep["metrics"]["brightness"]["std"] == pytest.approx(expect.std(), abs=1e-6)
    # the saved images score the same within 8-bit rounding, through the --images path
    assert cli.main(["evaluate", "--images", str(saved), "--metrics", "brightness", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)["metrics"]["brightness"]
    assert again["mean"] == pytest.approx(expect.mean(), abs=1 / 255) and again["count"] == 10


def test_checkpoint_of_a_problem_without_images(tmp_path, capsys):
    cfg = tmp_path / "toy.toml"
    cfg.write_text(f'[run]\nproblem = "toy2d"\nsteps = 2\nout_dir = "{tmp_path / "o"}"\ncheckpoint_every = 2\n'
                   "[train]\nbatch_size = 16\n[toy2d]\nhidden = 8\n")
    assert cli.main(["train", "--config", str(cfg), "--no-progress"]) == 0
    capsys.readouterr()
    assert cli.main(["evaluate", "--checkpoint", str(tmp_path / "o"), "--prompts", "coco1k", "--n", "2",
                     "--metrics", "brightness"]) == 2
    assert "cannot generate images" in capsys.readouterr().err
