"""ImageReward: a tiny checkpoint in THUDM's original key layout (blip.visual_encoder.*, blip.text_encoder.*, mlp.*),
loaded through the loader users call, scores as a direct functional computation of BLIP's ViT + BERT-with-cross-
attention + MLP written here from the original keys; gradients reach the image."""

from __future__ import annotations

import pytest
import rewards_reference as ref
import torch
import torch.nn.functional as F

from diffinstruct.rewards import RewardWeightsNotFound, load_scorer, load_state_dict
from diffinstruct.rewards.imagereward import MEAN, STD, ImageRewardScore, load_imagereward
from diffinstruct.rewards.tiny import write_tiny_imagereward

pytestmark = pytest.mark.usefixtures("one_thread")
HEADS = {"vision": 1, "text": 2}  # tiny widths 64 and 32: vision heads = 64 // 64, text heads from med_config.json


# ============================================================================================== direct computation
def _ln(x, sd, p, eps):
    return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps)


def _lin(x, sd, p):
    return F.linear(x, sd[p + ".weight"], sd[p + ".bias"])


def _attend(q, k, v, heads, mask=None):
    b, n, d = q.shape
    split = lambda t: t.reshape(b, t.shape[1], heads, d // heads).transpose(1, 2)  # noqa: E731
    logits = split(q) @ split(k).transpose(-1, -2) / (d // heads) ** 0.5
    if mask is not None:
        logits = logits + mask
    return (logits.softmax(-1) @ split(v)).transpose(1, 2).reshape(b, n, d)


def blip_vit(sd, px, heads):
    p = "blip.visual_encoder."
    w = sd[p + "patch_embed.proj.weight"]
    x = F.conv2d(px, w, sd[p + "patch_embed.proj.bias"], stride=w.shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([sd[p + "cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + sd[p + "pos_embed"]
    i = 0
    while f"{p}blocks.{i}.norm1.weight" in sd:
        b = f"{p}blocks.{i}."
        q, k, v = _lin(_ln(x, sd, b + "norm1", 1e-6), sd, b + "attn.qkv").chunk(3, dim=-1)
        x = x + _lin(_attend(q, k, v, heads), sd, b + "attn.proj")
        x = x + _lin(F.gelu(_lin(_ln(x, sd, b + "norm2", 1e-6), sd, b + "mlp.fc1")), sd, b + "mlp.fc2")
        i += 1
    return _ln(x, sd, p + "norm", 1e-6)


def bert_cross(sd, ids, mask, image, heads):
    p = "blip.text_encoder."
    x = sd[p + "embeddings.word_embeddings.weight"][ids] + sd[p + "embeddings.position_embeddings.weight"][
        : ids.shape[1]]
    x = _ln(x, sd, p + "embeddings.LayerNorm", 1e-12)
    pad = (1.0 - mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
    i = 0
    while f"{p}encoder.layer.{i}.intermediate.dense.weight" in sd:
        b = f"{p}encoder.layer.{i}."
        for kind, kv, m in (("attention", x, pad), ("crossattention", image, None)):
            s = f"{b}{kind}."
            a = _attend(_lin(x, sd, s + "self.query"), _lin(kv, sd, s + "self.key"), _lin(kv, sd, s + "self.value"),
                        heads, m)
            x = _ln(x + _lin(a, sd, s + "output.dense"), sd, s + "output.LayerNorm", 1e-12)
        h = _lin(F.gelu(_lin(x, sd, b + "intermediate.dense")), sd, b + "output.dense")
        x = _ln(x + h, sd, b + "output.LayerNorm", 1e-12)
        i += 1
    return x


def official_pixels(images: torch.Tensor, size: int) -> torch.Tensor:
    """ImageReward's `_transform(size)` (torchvision Resize + CenterCrop, its rounded offset; CLIP mean / std), with
    the anti-aliased bicubic of the tensor path, so that only the geometry is compared here."""
    return torch.cat([ref.resize_then_crop(im.permute(1, 2, 0).numpy(), size, size, ref.torchvision_offset,
                                           ref.torch_aa) for im in images])


def direct_score(sd, images, ids, mask):
    sd = {k: v.double() if v.is_floating_point() else v for k, v in sd.items()}
    px = official_pixels(images.double(), 32)
    h = bert_cross(sd, ids, mask, blip_vit(sd, px, HEADS["vision"]), HEADS["text"])[:, 0]
    for name in ("0", "2", "4", "6", "7"):  # Linear layers; the Dropouts between them are off at inference
        h = _lin(h, sd, f"mlp.layers.{name}")
    return (h.squeeze(-1) - MEAN) / STD


# ============================================================================================== tests
@pytest.fixture(scope="module")
def ir_models(tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    ckpt = write_tiny_imagereward(models / "rewards" / "imagereward", fmt="pt")
    return models, ckpt


def test_score_matches_direct_computation(ir_models, tmp_path):
    models, ckpt = ir_models
    sd = load_state_dict(ckpt)
    assert any(k.startswith("blip.visual_encoder.blocks.") for k in sd) and "mlp.layers.7.weight" in sd
    # the same checkpoint as safetensors, elsewhere, loads the same (its tokenizer and med_config copied along)
    write_tiny_imagereward(tmp_path / "st", fmt="safetensors")
    prompts = ["a red cat on the beach", "two dogs at night", "zebra 42"]
    images = torch.rand(3, 3, 40, 36)
    for scorer in (load_scorer("imagereward", models_dir=models), load_imagereward(tmp_path / "st")):
        assert isinstance(scorer, ImageRewardScore)
        ids, mask = scorer.tokenize(prompts)
        assert ids.shape == (3, 35) and bool((ids[:, 0] == scorer.tokenizer.cls_token_id).all())
        assert int(mask[1].sum()) < 35 and len(scorer.tokenizer) == sd[
            "blip.text_encoder.embeddings.word_embeddings.weight"].shape[0]
        got = scorer(images, prompts)
        want = direct_score(sd, images, ids, mask)
        assert got.shape == (3,)
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-5)
        assert float(want.std()) > 1e-3  # the scores differ between samples: a real check, not a constant


def test_gradient_reaches_the_image(ir_models):
    models, _ = ir_models
    grads, values = [], []
    for checkpointing in (False, True):  # recomputing the layers in backward changes neither value nor gradient
        scorer = load_imagereward(models_dir=models, gradient_checkpointing=checkpointing)
        images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
        out = scorer(images, ["a cat", "a dog"])
        out.sum().backward()
        assert images.grad is not None and images.grad.abs().sum() > 0
        grads.append(images.grad)
        values.append(out.detach())
    torch.testing.assert_close(values[1], values[0])
    torch.testing.assert_close(grads[1], grads[0])
    # finite differences along the gradient agree with it (float64 end to end)
    scorer64 = load_imagereward(models_dir=models, dtype=torch.float64)
    x = torch.rand(1, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    scorer64(x, ["a cat"]).sum().backward()
    d = x.grad / x.grad.norm()
    eps = 1e-4
    with torch.no_grad():
        fd = (scorer64(x + eps * d, ["a cat"]) - scorer64(x - eps * d, ["a cat"])) / (2 * eps)
    assert float(fd) == pytest.approx(float(x.grad.norm()), rel=1e-4)


def test_missing_and_wrong_files(tmp_path, ir_models):
    with pytest.raises(RewardWeightsNotFound, match=r"ImageReward.pt.*<models>/rewards/imagereward/"):
        load_imagereward(models_dir=tmp_path)
    folder = tmp_path / "rewards" / "imagereward"
    folder.mkdir(parents=True)
    torch.save({"blip.visual_encoder.cls_token": torch.zeros(1, 1, 8)}, folder / "ImageReward.pt")
    with pytest.raises(RewardWeightsNotFound, match=r"tokenizer.*vocab.txt"):
        load_imagereward(models_dir=tmp_path)
    write_tiny_imagereward(tmp_path / "x")
    with pytest.raises(ValueError, match="not an ImageReward checkpoint"):
        load_imagereward(folder / "ImageReward.pt", tokenizer_path=tmp_path / "x" / "tokenizer")
