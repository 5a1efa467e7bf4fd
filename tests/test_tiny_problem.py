"""The tiny text-to-image problem: dataset, prompts, shipped teacher and classifier, reproducible weights."""

import json
import subprocess
import sys

import pytest
import torch

from diffinstruct.tiny import build_weights, data, evaluate, models, sampling, taste


def test_prompts_round_trip_and_vocabulary():
    prompts = data.all_prompts()
    assert len(prompts) == len(set(prompts)) == 96
    for a in data.all_attributes():
        assert data.parse_prompt(a.prompt) == a
    tokens = data.tokenize(["a large red circle at the top left", ""])
    assert tokens.shape == (2, data.MAX_TOKENS) and tokens.dtype == torch.int64
    assert bool((tokens[1] == 0).all()) and bool((tokens[0] != 0).all())


@pytest.mark.parametrize("prompt, words", [
    ("a large purple circle at the top left", "purple"),
    ("a large red circle at the top", "horizontal position"),
    ("a large small red circle at the top left", "exactly one size"),
])
def test_bad_prompts_name_the_problem(prompt, words):
    with pytest.raises(ValueError, match=words):
        data.tokenize([prompt])


def test_dataset_is_a_pure_function_of_the_seed():
    a, attrs_a = data.sample_batch(16, seed=3)
    b, attrs_b = data.sample_batch(16, seed=3)
    c, _ = data.sample_batch(16, seed=4)
    assert torch.equal(a, b) and attrs_a == attrs_b and not torch.equal(a, c)
    assert a.shape == (16, 3, 16, 16) and float(a.min()) >= 0 and float(a.max()) <= 1
    with pytest.raises(ValueError, match="n must be"):
        data.sample_batch(0, seed=0)


def test_shapes_sit_in_their_quadrant():
    attrs = [data.Attributes("red", "square", "large", p) for p in data.POSITIONS]
    images = data.render(attrs, __import__("numpy").random.default_rng(0))
    redness = images[:, 0] - images[:, 1]  # the grey background has none
    for i, pos in enumerate(data.POSITIONS):
        v, h = pos.split()
        rows = slice(0, 8) if v == "top" else slice(8, 16)
        cols = slice(0, 8) if h == "left" else slice(8, 16)
        assert float(redness[i, rows, cols].sum()) > 0.95 * float(redness[i].sum())


@pytest.fixture(scope="module")
def classifier():
    return models.load_classifier()


@pytest.fixture(scope="module")
def teacher():
    return models.load_teacher()


def test_classifier_reads_fresh_procedural_images(classifier):
    images, attrs = data.sample_batch(512, seed=123_456_789)  # a seed the build never used
    fid = evaluate.fidelity(classifier, images, [a.prompt for a in attrs])
    assert fid["attribute_accuracy"] > 98.0, fid
    assert fid["prompt_accuracy"] > 93.0, fid


def test_teacher_samples_follow_their_prompts(teacher, classifier):
    prompts = data.all_prompts()[::3]  # every colour, shape, size and position
    x = sampling.sample_teacher(teacher, prompts, seed=11, steps=18, omega=2.0)
    fid = evaluate.fidelity(classifier, data.to_images(x).clamp(0, 1), prompts)
    assert fid["attribute_accuracy"] > 90.0, fid
    # the teacher also reproduces the data's spread of background levels, which stage 2's taste is about
    levels = taste.hidden_taste(data.to_images(x).clamp(0, 1))
    assert float(levels.std()) > 0.07


def test_missing_weights_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="teacher.safetensors"):
        models.load_teacher(tmp_path)
    with pytest.raises(FileNotFoundError, match="classifier.safetensors"):
        models.load_classifier(tmp_path)


def test_shipped_weights_match_their_manifest():
    manifest = build_weights.read_manifest()
    assert manifest["build_config"] == json.loads(json.dumps(build_weights.asdict(build_weights.BuildConfig())))
    for name in (models.TEACHER_FILE, models.CLASSIFIER_FILE):
        assert build_weights.sha256(models.WEIGHTS_DIR / name) == manifest["sha256"][name]
    total = sum((models.WEIGHTS_DIR / n).stat().st_size for n in (models.TEACHER_FILE, models.CLASSIFIER_FILE))
    assert total < 5 * 2**20


def _build(out):
    cmd = [sys.executable, "-m", "diffinstruct.tiny.build_weights", "--out", str(out), "--teacher-steps", "4",
           "--classifier-steps", "4", "--no-progress", "--check"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_weight_build_is_bit_reproducible(tmp_path):
    first, second = _build(tmp_path / "a"), _build(tmp_path / "b")
    for name in (models.TEACHER_FILE, models.CLASSIFIER_FILE):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert first.stdout.splitlines()[:2] == [line.replace("/b/", "/a/") for line in second.stdout.splitlines()[:2]]
    # a short build is not the shipped one, and --check says so
    assert first.returncode == 1 and "build settings differ" in first.stderr
    loaded = models.load_teacher(tmp_path / "a")
    assert isinstance(loaded, torch.nn.Module)


def _copy_shipped(dest, perturb=0.0):
    """The shipped weights re-saved into `dest` with their manifest, each parameter moved by `perturb` x its range."""
    teacher, clf = models.load_teacher(), models.load_classifier()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in [*teacher.parameters(), *clf.parameters()]:
            p.add_(perturb * p.abs().max() * torch.randn(p.shape, generator=gen))
    dest.mkdir()
    cfg = build_weights.BuildConfig()
    models.save_module(teacher, dest / models.TEACHER_FILE, models.TEACHER_FORMAT,
                       models.teacher_config_dict(models.TeacherConfig(base=cfg.base)))
    models.save_module(clf, dest / models.CLASSIFIER_FILE, models.CLASSIFIER_FORMAT, {"width": cfg.classifier_width})
    manifest = build_weights.read_manifest()
    manifest["sha256"] = {n: build_weights.sha256(dest / n) for n in (models.TEACHER_FILE, models.CLASSIFIER_FILE)}
    (dest / models.MANIFEST_FILE).write_text(json.dumps(manifest))
    return manifest


def test_check_is_bit_exact_where_the_bytes_agree(tmp_path):
    _copy_shipped(tmp_path / "same")
    problems, notes = build_weights.check(tmp_path / "same")
    assert problems == [] and notes == ["rebuilt weights are bit-identical to the shipped ones"]


def test_check_accepts_last_bit_drift_of_another_cpu(tmp_path):
    """Another CPU's rebuild has other bytes but the same behaviour: the held-out comparison passes and says why."""
    manifest = _copy_shipped(tmp_path / "drift", perturb=1e-3)
    assert manifest["sha256"] != build_weights.read_manifest()["sha256"]
    problems, notes = build_weights.check(tmp_path / "drift")
    assert problems == [], notes
    assert "differ from the shipped ones in their bytes" in notes[0] and "accuracy" in notes[1]


def test_check_rejects_an_unfinished_build_with_default_settings(tmp_path):
    build_weights.build(tmp_path / "short", build_weights.BuildConfig(teacher_steps=4, classifier_steps=4),
                        progress=False)
    manifest = build_weights.read_manifest(tmp_path / "short")
    manifest["build_config"] = build_weights.asdict(build_weights.BuildConfig())  # pretend it is a full build
    (tmp_path / "short" / models.MANIFEST_FILE).write_text(json.dumps(manifest))
    problems, _ = build_weights.check(tmp_path / "short")
    assert any("classifier" in p for p in problems) and any("teacher" in p for p in problems), problems


def test_build_refuses_the_shipped_folder():
    with pytest.raises(ValueError, match="shipped weights folder"):
        build_weights.build(models.WEIGHTS_DIR, build_weights.BuildConfig(teacher_steps=1, classifier_steps=1))
