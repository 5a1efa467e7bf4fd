"""HPSv2: an open_clip-format checkpoint of a tiny model, converted to transformers' CLIPModel, gives the embeddings of
a faithful open_clip forward (written here with nn.MultiheadAttention, as open_clip's ResidualAttentionBlock) on
images preprocessed as HPSv2's official eval transform (ResizeMaxSize + black padding, rewards_reference.py), square
or not; loaded from .pt (weights_only=True) and .safetensors through the loader users call. Prompts are tokenized as
open_clip's SimpleTokenizer (its text cleaning, then byte-level BPE, reimplemented in rewards_reference.py)."""

from __future__ import annotations

import html
from collections import OrderedDict

import pytest
import rewards_reference as ref
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from diffinstruct.rewards import RewardWeightsNotFound, load_scorer
from diffinstruct.rewards.hpsv2 import HPSv2Score, load_hpsv2, openclip_clean, openclip_to_hf
from diffinstruct.rewards.tiny import tiny_clip_vocab, write_tiny_clip

pytestmark = pytest.mark.usefixtures("one_thread")


# ============================================================================================== open_clip reference
class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, 4 * width)), ("gelu", nn.GELU()),
                                              ("c_proj", nn.Linear(4 * width, width))]))

    def forward(self, x, attn_mask=None):  # x: [L, N, D] as in open_clip
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x, attn_mask=None):
        for r in self.resblocks:
            x = r(x, attn_mask)
        return x


class VisionTransformer(nn.Module):
    def __init__(self, image_size, patch, width, layers, heads, out_dim):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((image_size // patch) ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, out_dim))

    def forward(self, x):
        x = self.conv1(x).flatten(2).permute(0, 2, 1)
        cls = self.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding
        x = self.ln_pre(x).permute(1, 0, 2)
        x = self.transformer(x).permute(1, 0, 2)
        return self.ln_post(x[:, 0]) @ self.proj


class OpenClipCLIP(nn.Module):
    """open_clip.model.CLIP with a ViT vision tower and the built-in text tower (the HPSv2 ViT-H-14 layout)."""

    def __init__(self, image_size=32, patch=8, v_width=128, v_layers=2, v_heads=2, t_width=128, t_layers=2,
                 t_heads=2, vocab=514, context=16, embed=24):
        super().__init__()
        self.visual = VisionTransformer(image_size, patch, v_width, v_layers, v_heads, embed)
        self.transformer = Transformer(t_width, t_layers, t_heads)
        self.token_embedding = nn.Embedding(vocab, t_width)
        self.positional_embedding = nn.Parameter(0.01 * torch.randn(context, t_width))
        self.ln_final = nn.LayerNorm(t_width)
        self.text_projection = nn.Parameter(t_width ** -0.5 * torch.randn(t_width, embed))
        self.logit_scale = nn.Parameter(torch.tensor(4.6052))
        mask = torch.full((context, context), float("-inf")).triu_(1)
        self.register_buffer("attn_mask", mask, persistent=False)

    def encode_image(self, image):
        return F.normalize(self.visual(image), dim=-1)

    def encode_text(self, text):
        x = self.token_embedding(text) + self.positional_embedding
        x = self.transformer(x.permute(1, 0, 2), self.attn_mask).permute(1, 0, 2)
        x = self.ln_final(x)
        return F.normalize(x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection, dim=-1)


def make_reference(seed: int = 0, **sizes: int) -> OpenClipCLIP:
    torch.manual_seed(seed)
    model = OpenClipCLIP(**sizes).double().eval()
    with torch.no_grad():  # LayerNorms away from the identity, so a swapped ln_pre / ln_post would show
        for name, p in model.named_parameters():
            if "ln_" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def hps_folder(tmp_path_factory):
    """<models>/rewards/hpsv2/ with a tiny open_clip checkpoint as a pickle and as safetensors, tokenizer from clip/."""
    models = tmp_path_factory.mktemp("models")
    write_tiny_clip(models / "rewards" / "clip", max_text_len=16)  # its tokenizer (byte-level, 514 ids) is used
    model = make_reference()
    sd = {k: v.float().contiguous() for k, v in model.state_dict().items()}
    folder = models / "rewards" / "hpsv2"
    folder.mkdir(parents=True)
    torch.save({"state_dict": sd, "epoch": 5}, folder / "HPS_v2_compressed.pt")
    save_file(sd, str(models / "hps_v21.safetensors"))
    return models, model.float()


def tokens(prompts, models):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(models / "rewards" / "clip"), local_files_only=True)
    ids = tok(prompts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")["input_ids"]
    return ids.masked_fill(ids == tok.pad_token_id, 0) if tok.pad_token_id != tok.eos_token_id else ids


def official_pixels(images: torch.Tensor, size: int) -> torch.Tensor:
    """HPSv2's eval transform (ResizeMaxSize(size), black padding, CLIP mean / std) on each float image."""
    return torch.cat([ref.resize_max_size(im.permute(1, 2, 0).numpy(), size) for im in images])


def test_conversion_matches_the_open_clip_forward(hps_folder):
    models, model = hps_folder
    assert len(tiny_clip_vocab()) == 514
    config, _ = openclip_to_hf(model.state_dict())
    assert config["vision_config"]["image_size"] == 32 and config["vision_config"]["num_attention_heads"] == 2
    assert config["text_config"]["max_position_embeddings"] == 16 and config["projection_dim"] == 24
    for path in (None, models / "hps_v21.safetensors"):  # the folder default (.pt) and an explicit .safetensors
        score = load_hpsv2(path, models_dir=models)
        assert isinstance(score, HPSv2Score)
        images = torch.rand(3, 3, 40, 48)
        prompts = ["a red cat", "two dogs on a beach at night", "x"]
        px = official_pixels(images, 32)
        with torch.no_grad():
            want_img = model.encode_image(px)
            want_txt = model.encode_text(tokens(prompts, models))
            got_img = score.tower.image_features(images)
            got_txt = score.tower.text_features(prompts)
        torch.testing.assert_close(got_img, want_img, atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(got_txt, want_txt, atol=2e-6, rtol=1e-5)
        got = score(images, prompts)
        torch.testing.assert_close(got, 100 * (want_img * want_txt).sum(-1), atol=5e-4, rtol=1e-5)


@pytest.mark.parametrize("hw", [(832, 1216), (1216, 832), (200, 300), (538, 512), (64, 64), (331, 225)])
def test_non_square_images_score_as_the_official_transform(hps_folder, hw):
    models, model = hps_folder
    score = load_hpsv2(models_dir=models, scale="cosine")
    images = torch.rand(1, 3, *hw, generator=torch.Generator().manual_seed(hw[0] + hw[1]))
    with torch.no_grad():
        want = (model.encode_image(official_pixels(images, 32)) * model.encode_text(tokens(["a cat"], models))).sum(-1)
    x = images.clone().requires_grad_(True)
    got = score(x, ["a cat"])
    torch.testing.assert_close(got.detach(), want, atol=2e-6, rtol=1e-5)
    got.sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all()) and float(x.grad.abs().sum()) > 0


# ============================================================================================== tokenizer
WORDS = ["red", "circle", "amp", "lt", "gt", "cat"]
ESCAPED = "&amp; a red &lt;circle&gt;"


@pytest.fixture(scope="module")
def bpe_hps(tmp_path_factory):
    """An HPSv2 folder whose tokenizer (vocab.json + merges.txt) has merges, so that words are single tokens."""
    folder = tmp_path_factory.mktemp("bpe") / "hpsv2"
    vocab = ref.write_bpe_tokenizer(folder, WORDS)
    model = make_reference(vocab=len(vocab), context=16)
    torch.save({"state_dict": {k: v.float() for k, v in model.state_dict().items()}}, folder / "HPS_v2_compressed.pt")
    return load_hpsv2(folder), vocab, ref.read_merges(folder)


def official_ids(text: str, vocab: dict[str, int], merges: list[tuple[str, str]], clean: bool = True) -> list[int]:
    """open_clip's tokenize: [start] + BPE(whitespace_clean(basic_clean(text)).lower()) + [end], without ftfy (not
    installed here, and the prompts below are plain ASCII, which ftfy leaves alone)."""
    if clean:
        text = html.unescape(html.unescape(text)).strip()
        text = " ".join(text.split())
    body = ref.bpe_encode(text.lower(), vocab, merges)
    return [vocab["<|startoftext|>"], *body, vocab["<|endoftext|>"]]


@pytest.mark.parametrize("prompt", [ESCAPED, "&amp;lt;red&amp;gt; cat", "  A   RED\tCircle \n", "it's a cat's cat!",
                                    "a red circle &#38; 2 cats"])
def test_tokens_are_open_clips(bpe_hps, prompt):
    score, vocab, merges = bpe_hps
    ids, mask = score.tower.tokenize([prompt])
    got = ids[0][mask[0].bool()].tolist()
    assert got == official_ids(prompt, vocab, merges)


def test_html_entities_are_unescaped(bpe_hps):
    score, vocab, merges = bpe_hps
    ids, mask = score.tower.tokenize([ESCAPED, "& a red <circle>"])
    assert int(mask[0].sum()) == 8 and torch.equal(ids[0], ids[1])  # start, & a red < circle >, end
    want = [vocab[t] for t in ("<|startoftext|>", "&</w>", "a</w>", "red</w>", "<</w>", "circle</w>", "></w>",
                               "<|endoftext|>")]
    assert ids[0][:8].tolist() == want
    assert len(official_ids(ESCAPED, vocab, merges, clean=False)) == 14  # what the text gives without the cleaning
    assert openclip_clean("&amp;lt;b&amp;gt;  X\t") == "<b> x"


def test_gradient_and_registry(hps_folder):
    models, _ = hps_folder
    score = load_scorer("hpsv2", models_dir=models, scale="cosine")
    images = torch.rand(2, 3, 32, 32, requires_grad=True)
    out = score(images, ["a", "b"])
    assert out.shape == (2,) and bool((out.abs() <= 1).all())
    out.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_missing_and_wrong_files(tmp_path, hps_folder):
    with pytest.raises(RewardWeightsNotFound, match=r"HPS_v2.1_compressed.pt.*<models>/rewards/hpsv2/"):
        load_hpsv2(models_dir=tmp_path)
    models, _ = hps_folder
    folder = tmp_path / "rewards" / "hpsv2"
    folder.mkdir(parents=True)
    (folder / "HPS_v2_compressed.pt").write_bytes((models / "rewards" / "hpsv2" / "HPS_v2_compressed.pt").read_bytes())
    with pytest.raises(RewardWeightsNotFound, match="CLIP tokenizer"):
        load_hpsv2(models_dir=tmp_path)
    torch.save({"state_dict": {"weight": torch.zeros(2)}}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not an open_clip ViT CLIP state dict"):
        load_hpsv2(tmp_path / "bad.pt", tokenizer_path=models / "rewards" / "clip")


def test_ftfy_fixes_what_open_clip_fixes(bpe_hps):
    """open_clip runs ftfy.fix_text first (ftfy is a dependency of the rewards extra): curly quotes, ligatures and
    mojibake tokenise as their plain forms."""
    assert openclip_clean("\u201ca red circle\u201d") == '"a red circle"'
    assert openclip_clean("\ufb01ne cat") == "fine cat"
    assert openclip_clean("caf\u00c3\u00a9") == "caf\u00e9"  # UTF-8 read as Latin-1
    score, _, _ = bpe_hps
    ids, mask = score.tower.tokenize(["\u201ca red circle\u201d", '"a red circle"'])
    assert torch.equal(ids[0], ids[1]) and torch.equal(mask[0], mask[1])
