"""CLIP score, PickScore and the LAION aesthetic predictor at a tiny random size: written in the users' on-disk
format, loaded back through the same loaders, checked against transformers' own CLIPModel forward, gradients."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")

import rewards_reference as reference  # noqa: E402

from diffinstruct.cli import main as cli_main  # noqa: E402
from diffinstruct.rewards import (  # noqa: E402
    AestheticHead,
    LatentToImageReward,
    PixelReward,
    RewardWeightsNotFound,
    WeightedRewards,
    load_scorer,
    load_spec,
    load_state_dict,
)
from diffinstruct.rewards.clip import load_aesthetic, load_aesthetic_head, load_clip_score, load_pickscore  # noqa: E402
from diffinstruct.rewards.paths import ENV_MODELS_DIR  # noqa: E402
from diffinstruct.rewards.tiny import write_tiny_aesthetic_head, write_tiny_clip  # noqa: E402

PROMPTS = ["a red car", "a photo of a cat sitting on a very long sofa in a very large room"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A ComfyUI-style models folder with tiny rewards in the default places."""
    root = tmp_path_factory.mktemp("models")
    write_tiny_clip(root / "rewards" / "clip", seed=0)
    write_tiny_clip(root / "rewards" / "pickscore", seed=1, hidden_act="gelu")  # CLIP-H uses exact GELU
    write_tiny_aesthetic_head(root / "rewards" / "aesthetic" / "sac+logos+ava1-l14-linearMSE.safetensors",
                              input_size=16)
    return root


def _images(b=2, h=40, w=48, seed=0):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_load_by_name_from_models_folder(models):
    x = _images()
    for name in ("clip", "pickscore", "aesthetic"):
        scorer = load_scorer(name, models_dir=models)
        r = scorer(x, PROMPTS)
        assert r.shape == (2,) and r.dtype == torch.float32 and torch.isfinite(r).all(), name
        assert not any(p.requires_grad for p in scorer.parameters())


def test_env_models_dir(models, monkeypatch):
    monkeypatch.setenv(ENV_MODELS_DIR, str(models))
    assert load_scorer("pickscore")(_images(), PROMPTS).shape == (2,)


def test_scores_match_transformers_forward(models):
    from transformers import CLIPModel

    pick = load_pickscore(models_dir=models)
    clip = load_clip_score(models_dir=models, clamp=False)
    x = _images()
    for scorer, folder in ((pick, "pickscore"), (clip, "clip")):
        ref_model = CLIPModel.from_pretrained(str(models / "rewards" / folder), local_files_only=True).eval()
        tok = scorer.tower.tokenizer(PROMPTS, padding="max_length", max_length=16, truncation=True,
                                     return_tensors="pt")
        with torch.no_grad():
            out = ref_model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"],
                            pixel_values=scorer.tower.preprocess(x))
        diag = out.logits_per_image.diagonal()  # logit_scale.exp() * cos
        got = scorer(x, PROMPTS)
        if folder == "pickscore":
            torch.testing.assert_close(got, diag, rtol=1e-5, atol=1e-5)
        else:
            torch.testing.assert_close(got, 100.0 * diag / ref_model.logit_scale.exp(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("hw", [(32, 35), (35, 32), (48, 53)])  # 3 spare pixels after the resize to 32
@pytest.mark.parametrize("name", ["clip", "pickscore", "aesthetic"])
def test_preprocessing_is_the_official_transform(models, name, hw):
    """CLIP score and PickScore: transformers' CLIPImageProcessor (their official scorers), crop at the floor; the
    aesthetic predictor: OpenAI CLIP's `preprocess` (torchvision Resize + CenterCrop, rounded offset, one pixel
    further at these sizes). Both official transforms are PIL on uint8; without a resize, the same pixels."""
    import warnings

    from transformers import CLIPImageProcessor

    u8 = (torch.rand(*hw, 3, generator=torch.Generator().manual_seed(sum(hw))) * 255).round().to(torch.uint8).numpy()
    got = load_scorer(name, models_dir=models).tower.preprocess(torch.from_numpy(u8).permute(2, 0, 1)[None] / 255)
    if name == "aesthetic":
        want = reference.resize_then_crop(u8, 32, 32, reference.torchvision_offset, reference.pil_uint8)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            proc = CLIPImageProcessor.from_pretrained(str(models / "rewards" / name), local_files_only=True)
        want = proc(images=[u8], return_tensors="pt")["pixel_values"]
    grey = ((got.double() - want.double()) * torch.tensor(reference.CLIP_STD).view(1, 3, 1, 1) * 255).abs()
    assert got.shape == want.shape == (1, 3, 32, 32)
    assert float(grey.max() if min(hw) == 32 else grey.mean()) <= (1e-3 if min(hw) == 32 else 0.6)


def test_clip_score_clamp_and_pickscore_cosine(models):
    x = _images()
    raw = load_clip_score(models_dir=models, clamp=False)(x, PROMPTS)
    clamped = load_clip_score(models_dir=models)(x, PROMPTS)
    torch.testing.assert_close(clamped, raw.clamp_min(0))
    pick = load_pickscore(models_dir=models)
    cos = load_pickscore(models_dir=models, scale="cosine")(x, PROMPTS)
    assert cos.abs().max() <= 1 + 1e-6
    torch.testing.assert_close(pick(x, PROMPTS), pick.tower.model.logit_scale.exp() * cos)


@pytest.mark.parametrize("name", ["clip", "pickscore", "aesthetic"])
def test_gradcheck_float64(models, name):
    opts = {"clamp": False} if name == "clip" else {}
    scorer = load_scorer(name, models_dir=models, dtype=torch.float64, **opts)
    x = torch.rand(1, 3, 20, 24, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: scorer(t, PROMPTS[:1]), (x,), fast_mode=True, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("name", ["clip", "pickscore", "aesthetic"])
def test_gradient_checkpointing_same_value_and_grad(models, name):
    opts = {"clamp": False} if name == "clip" else {}
    plain = load_scorer(name, models_dir=models, **opts)
    ckpt = load_scorer(name, models_dir=models, gradient_checkpointing=True, **opts)
    x1 = _images().requires_grad_(True)
    x2 = x1.detach().clone().requires_grad_(True)
    r1, r2 = plain(x1, PROMPTS), ckpt(x2, PROMPTS)
    r1.sum().backward()
    r2.sum().backward()
    torch.testing.assert_close(r1, r2)
    torch.testing.assert_close(x1.grad, x2.grad)


@pytest.mark.parametrize("name", ["pickscore", "aesthetic"])
def test_bf16_close_to_fp32(models, name):
    x = _images().requires_grad_(True)
    ref = load_scorer(name, models_dir=models)(x, PROMPTS)
    bf = load_scorer(name, models_dir=models, dtype=torch.bfloat16)
    r = bf(x, PROMPTS)
    assert r.dtype == torch.float32
    assert (r - ref).abs().max() <= 0.05 * ref.abs().max() + 0.05
    (g,) = torch.autograd.grad(r.sum(), x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_text_features_cached(models):
    scorer = load_scorer("pickscore", models_dir=models)
    cache = scorer.tower.text_cache
    scorer(_images(), PROMPTS)
    assert (cache.hits, cache.misses) == (0, 2)
    scorer(_images(seed=3), PROMPTS[::-1])
    assert (cache.hits, cache.misses) == (2, 2)
    fresh = scorer.tower._encode_text(PROMPTS)
    torch.testing.assert_close(scorer.tower.text_features(PROMPTS), fresh)


# ------------------------------------------------------------------------------------------- aesthetic head
def test_aesthetic_head_layer_sizes():
    head = AestheticHead()
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert shapes == {"layers.0.weight": (1024, 768), "layers.0.bias": (1024,), "layers.2.weight": (128, 1024),
                      "layers.2.bias": (128,), "layers.4.weight": (64, 128), "layers.4.bias": (64,),
                      "layers.6.weight": (16, 64), "layers.6.bias": (16,), "layers.7.weight": (1, 16),
                      "layers.7.bias": (1,)}


def test_aesthetic_head_known_answer():
    """Head that routes the sum of the embedding through unit-1 weights: on the L2-normalised all-ones 768-d
    embedding the answer is 768 / sqrt(768) = sqrt(768) = 27.7128..., plus the last bias 0.5."""
    head = AestheticHead(768).eval()
    sd = {k: torch.zeros_like(v) for k, v in head.state_dict().items()}
    sd["layers.0.weight"][0, :] = 1.0
    for k in ("layers.2.weight", "layers.4.weight", "layers.6.weight", "layers.7.weight"):
        sd[k][0, 0] = 1.0
    sd["layers.7.bias"][0] = 0.5
    head.load_state_dict(sd)
    emb = torch.nn.functional.normalize(torch.ones(1, 768), dim=-1)
    # Two float32 reductions over n = 768 terms (the norm inside normalize, then the first layer's dot
    # product), summed in whatever order the CPU's BLAS and vector width choose (AVX2 vs AVX-512 differ).
    # The order-independent bound for each is n * u * sum|terms| with u = 2**-24, and sum|terms| is the
    # result itself, so the relative error is at most 2 * n * u = 9.2e-5 (seen: 2.2e-6 on an AMD EPYC).
    n, u = 768, 2.0**-24
    assert float(head(emb).detach()) == pytest.approx(math.sqrt(768) + 0.5, rel=2 * n * u)


def test_aesthetic_head_random_matches_float64_reference(tmp_path):
    path = write_tiny_aesthetic_head(tmp_path / "h.safetensors", input_size=768, seed=5)
    head = load_aesthetic_head(path).double()
    sd = load_state_dict(path)
    emb = torch.nn.functional.normalize(torch.randn(3, 768, dtype=torch.float64), dim=-1)
    ref = emb
    for i in (0, 2, 4, 6, 7):  # all-linear MLP: no activations in the v2 predictor
        ref = ref @ sd[f"layers.{i}.weight"].double().T + sd[f"layers.{i}.bias"].double()
    torch.testing.assert_close(head(emb), ref.squeeze(-1))


def test_aesthetic_score_is_head_of_normalised_embedding(models):
    aes = load_aesthetic(models_dir=models)
    x = _images()
    emb = aes.tower.image_features(x)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(aes(x), aes.head(emb))


def test_aesthetic_head_dim_mismatch(models, tmp_path):
    bad = write_tiny_aesthetic_head(tmp_path / "h768.safetensors", input_size=768)
    with pytest.raises(ValueError, match="768"):
        load_aesthetic(bad, models_dir=models)


# ------------------------------------------------------------------------------------------- legacy pickles
def test_legacy_pth_loads_weights_only_and_converts(tmp_path, capsys):
    pth = write_tiny_aesthetic_head(tmp_path / "head.pth", input_size=16, fmt="pth", seed=2)
    st = tmp_path / "head.safetensors"
    assert cli_main(["convert", str(pth), str(st)]) == 0
    assert "wrote 10 tensors" in capsys.readouterr().out
    a, b = load_aesthetic_head(pth), load_aesthetic_head(st)
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, b.state_dict()[k])


def test_wrapped_checkpoint_is_unwrapped(tmp_path):
    torch.save({"state_dict": AestheticHead(16).state_dict(), "epoch": 3}, tmp_path / "w.pt")
    assert "layers.0.weight" in load_state_dict(tmp_path / "w.pt")


class _Evil:
    def __reduce__(self):
        return (print, ("code ran while unpickling",))


def test_pickle_with_code_is_refused(tmp_path, capsys):
    torch.save({"layers.0.weight": torch.zeros(2), "x": _Evil()}, tmp_path / "evil.pth")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        load_state_dict(tmp_path / "evil.pth")
    assert "code ran" not in capsys.readouterr().out
    # refused input: exit status 2 (bad input), as for every command
    assert cli_main(["convert", str(tmp_path / "evil.pth"), str(tmp_path / "evil.safetensors")]) == 2


# ------------------------------------------------------------------------------------------- missing files
def test_missing_folder_names_path_and_place(tmp_path):
    with pytest.raises(RewardWeightsNotFound) as e:
        load_scorer("pickscore", models_dir=tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "rewards" / "pickscore") in msg and "PickScore_v1" in msg and "rewards/pickscore" in msg


def test_missing_weights_file(models, tmp_path):
    import shutil

    folder = tmp_path / "clip"
    shutil.copytree(models / "rewards" / "clip", folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(RewardWeightsNotFound, match="model.safetensors"):
        load_clip_score(folder)


def test_missing_aesthetic_head(tmp_path):
    with pytest.raises(RewardWeightsNotFound, match="sac\\+logos\\+ava1-l14-linearMSE"):
        load_aesthetic(models_dir=tmp_path)


def test_no_models_dir_at_all(monkeypatch):
    monkeypatch.delenv(ENV_MODELS_DIR, raising=False)
    with pytest.raises(RewardWeightsNotFound, match=ENV_MODELS_DIR):
        load_scorer("clip")


def test_hub_id_is_not_a_hub_id():
    with pytest.raises(RewardWeightsNotFound, match="openai/clip-vit-large-patch14"):
        load_clip_score("openai/clip-vit-large-patch14")


def test_every_model_reward_names_its_missing_file(tmp_path):
    files = {"clip": "config.json", "pickscore": "config.json", "aesthetic": "sac+logos+ava1-l14-linearMSE",
             "hpsv2": "HPS_v2.1_compressed.pt", "imagereward": "ImageReward.pt"}
    for name, file in files.items():
        with pytest.raises(RewardWeightsNotFound) as err:
            load_scorer(name, models_dir=tmp_path)
        msg = str(err.value)
        assert f"<models>/rewards/{name}/" in msg and "Nothing is downloaded" in msg, msg
        assert file in msg or name in ("clip", "pickscore"), msg  # a whole folder is missing for the HF models


# ------------------------------------------------------------------------------------------- composition
def test_weighted_spec_and_latent_path(models):
    combo = load_spec("0.5*pickscore+2*aesthetic+color_match", models_dir=models)
    assert isinstance(combo, WeightedRewards)
    x = _images()
    parts = [load_scorer(n, models_dir=models)(x, PROMPTS) for n in ("pickscore", "aesthetic", "color_match")]
    torch.testing.assert_close(combo(x, PROMPTS), 0.5 * parts[0] + 2 * parts[1] + parts[2])

    decode = torch.nn.ConvTranspose2d(4, 3, 8, stride=8)  # stand-in for a VAE decoder: latents -> images
    reward = LatentToImageReward(lambda z: torch.sigmoid(decode(z)), combo, combo.name)
    z = torch.randn(2, 4, 5, 6, requires_grad=True)
    r = reward(z, PROMPTS, None)
    (g,) = torch.autograd.grad(r.sum(), z)
    assert r.shape == (2,) and torch.isfinite(g).all() and g.abs().sum() > 0

    pixel = PixelReward(combo)  # pixel-space generator in [-1, 1]
    torch.testing.assert_close(pixel(x * 2 - 1, PROMPTS, None), combo(x, PROMPTS))


def test_build_without_init_is_strict_and_refills_position_ids():
    import transformers

    from diffinstruct.rewards.hf_build import build_without_init

    cfg = transformers.CLIPTextConfig(vocab_size=32, bos_token_id=30, eos_token_id=31, hidden_size=8,
                                      intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      max_position_embeddings=12)
    torch.manual_seed(0)
    state = transformers.CLIPTextModel(cfg).state_dict()
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    model = build_without_init(transformers.CLIPTextModel, cfg, state, "tiny text")
    for k, v in state.items():
        assert torch.equal(model.state_dict()[k], v)
    assert torch.equal(dict(model.named_buffers())["embeddings.position_ids"][0], torch.arange(12))
    with pytest.raises(ValueError, match=r"tiny text weights do not fit: missing \[.*final_layer_norm.weight"):
        build_without_init(transformers.CLIPTextModel, cfg,
                           {k: v for k, v in state.items() if "final_layer_norm.weight" not in k}, "tiny text")
    with pytest.raises(ValueError, match=r"unexpected \['extra.weight'\]"):
        build_without_init(transformers.CLIPTextModel, cfg, {**state, "extra.weight": torch.zeros(1)}, "tiny text")
