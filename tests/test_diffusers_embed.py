"""`diffinstruct embed` (`python -m diffinstruct.hosts.diffusers_embed`) on tiny random SD1.5 / SDXL pipeline
folders: the file it writes holds every prompt and "", each entry equals what diffusers' own pipeline
(encode_prompt) computes, a short `train` run of the "diffusers" problem works on it, and bad input is a named
error with exit status 2."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
tf = pytest.importorskip("transformers")

from diffinstruct import cli  # noqa: E402
from diffinstruct.checkpoint import latest_checkpoint, step_dir_name  # noqa: E402
from diffinstruct.hosts import diffusers as H  # noqa: E402
from diffinstruct.hosts import diffusers_embed as E  # noqa: E402
from diffinstruct.rewards.tiny import tiny_clip_vocab  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT_LEN = 16  # the tiny tokenizers' model_max_length (77 in SD1.5 / SDXL)
UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, attention_head_dim=8,
            norm_num_groups=8)
# SDXL: two 8-wide encoders concatenate to 16; text_embeds 12 + 6 time ids x 8
SDXL = dict(UNET, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=12 + 6 * 8)
SCHEDULER = {"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
             "beta_end": 0.012, "num_train_timesteps": 1000, "prediction_type": "epsilon", "clip_sample": False,
             "steps_offset": 1}
PROMPTS = ["a red cat", "a photo of a dog on the beach", "a red cat", "an extremely long prompt that the tokenizer "
           "has to truncate because it is much longer than sixteen tokens"]




def _text_config(hidden: int, **extra) -> dict:
    return dict(vocab_size=len(tiny_clip_vocab()), hidden_size=hidden, intermediate_size=2 * hidden,
                num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=TEXT_LEN, bos_token_id=512,
                eos_token_id=513, pad_token_id=513, **extra)


def _write_pair(root: Path, suffix: str, model: torch.nn.Module) -> None:
    model.save_pretrained(root / f"text_encoder{suffix}", safe_serialization=True)
    tf.CLIPTokenizer(vocab=tiny_clip_vocab(), merges=[], model_max_length=TEXT_LEN).save_pretrained(
        root / f"tokenizer{suffix}")


def write_pipeline(root: Path, sdxl: bool) -> Path:
    """A tiny pipeline folder in diffusers layout: model_index.json, unet/, scheduler/, tokenizer(s), encoder(s)."""
    torch.manual_seed(0)
    H.build_model("unet", SDXL if sdxl else UNET, seed=1).save_pretrained(root / "unet")
    (root / "scheduler").mkdir(parents=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
    if sdxl:
        _write_pair(root, "", tf.CLIPTextModel(tf.CLIPTextConfig(**_text_config(8))))
        _write_pair(root, "_2", tf.CLIPTextModelWithProjection(tf.CLIPTextConfig(**_text_config(8,
                                                                                                 projection_dim=12))))
    else:
        _write_pair(root, "", tf.CLIPTextModel(tf.CLIPTextConfig(**_text_config(16))))
    name = "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline"
    (root / "model_index.json").write_text(json.dumps({"_class_name": name, "_diffusers_version": "0.30.0"}))
    return root


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipes")
    return {"sd15": write_pipeline(root / "sd15", sdxl=False), "sdxl": write_pipeline(root / "sdxl", sdxl=True)}


def reference_pipeline(folder: Path, sdxl: bool):
    """diffusers' own pipeline on the same local components (a tiny VAE stands in: encode_prompt does not use it)."""
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                                  up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8)
    parts = dict(vae=vae, unet=diffusers.UNet2DConditionModel.from_pretrained(folder / "unet"),
                 scheduler=diffusers.DDIMScheduler.from_config(SCHEDULER),
                 text_encoder=tf.CLIPTextModel.from_pretrained(folder / "text_encoder"),
                 tokenizer=tf.CLIPTokenizer.from_pretrained(folder / "tokenizer"))
    if sdxl:
        parts.update(text_encoder_2=tf.CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2"),
                     tokenizer_2=tf.CLIPTokenizer.from_pretrained(folder / "tokenizer_2"))
        return diffusers.StableDiffusionXLPipeline(**parts)
    return diffusers.StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(["embed", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_sd15_file_matches_the_pipeline_and_trains(tmp_path, pipes, capsys, no_network):
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(PROMPTS) + "\n")
    extra = tmp_path / "more.json"
    extra.write_text(json.dumps(["a red cat", "a blue bird"]))
    out = tmp_path / "emb.safetensors"
    code, stdout, err = run_main(["--model", str(pipes["sd15"]), "--prompts", str(prompt_file), "--prompts",
                                  str(extra), "--out", str(out), "--batch", "2", "--no-progress"], capsys)
    assert code == 0, err
    assert json.loads(stdout)["prompts"] == 5
    table = H.load_prompt_embeddings(out)
    assert list(table) == ["", *dict.fromkeys(PROMPTS), "a blue bird"]  # "" first, deduplicated, in order
    assert not list(tmp_path.glob(".*tmp*"))  # the atomic write left no temporary file behind

    with torch.no_grad():
        pipe = reference_pipeline(pipes["sd15"], sdxl=False)
        for prompt, cond in table.items():
            assert set(cond) == {"encoder_hidden_states"}
            want, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
            assert cond["encoder_hidden_states"].shape == (1, TEXT_LEN, 16)
            torch.testing.assert_close(cond["encoder_hidden_states"], want, rtol=1e-5, atol=1e-5)
        # CFG's unconditional branch in the pipeline (negative_prompt=None) is the entry for ""
        _, uncond = pipe.encode_prompt("a red cat", "cpu", 1, True)
        torch.testing.assert_close(table[""]["encoder_hidden_states"], uncond, rtol=1e-5, atol=1e-5)
    a, b = table["a red cat"]["encoder_hidden_states"], table["a blue bird"]["encoder_hidden_states"]
    assert not torch.allclose(a, b)  # different prompts, different conditioning

    run_dir = tmp_path / "run"
    toml = tmp_path / "run.toml"
    toml.write_text(f"""
[run]
problem = "diffusers"
steps = 2
out_dir = "{run_dir}"
checkpoint_every = 2
[train]
batch_size = 2
omega = 4.5
alpha = 0.1
lr_generator = 1e-3
lr_ta = 1e-3
[diffusers]
model = "{pipes['sd15']}"
embeddings = "{out}"
lora_rank = 4
latent_size = 8
[reward]
name = "latent_target"
value = 0.0
""")
    assert cli.main(["train", "--config", str(toml), "--no-progress"]) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1] and all(math.isfinite(r["ta_loss"]) for r in rows)
    assert latest_checkpoint(run_dir) == run_dir / step_dir_name(2)


def test_sdxl_file_matches_the_pipeline(tmp_path, pipes, capsys, no_network):
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "xl.safetensors"
    code, _, err = run_main(["--model", str(pipes["sdxl"]), "--prompts", str(prompt_file), "--out", str(out),
                             "--batch", "3", "--no-progress"], capsys)
    assert code == 0, err
    table = H.load_prompt_embeddings(out)
    assert list(table) == ["", *dict.fromkeys(PROMPTS)]
    with torch.no_grad():
        pipe = reference_pipeline(pipes["sdxl"], sdxl=True)
        for prompt in PROMPTS:
            embeds, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
            cond = table[prompt]
            torch.testing.assert_close(cond["encoder_hidden_states"], embeds, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(cond["added_cond_kwargs"]["text_embeds"], pooled, rtol=1e-5, atol=1e-5)
            time_ids = pipe._get_add_time_ids((64, 64), (0, 0), (64, 64), torch.float32, 12)
            torch.testing.assert_close(cond["added_cond_kwargs"]["time_ids"], time_ids)
        # SDXL's default (force_zeros_for_empty_prompt): the unconditional branch is zeros
        _, neg, _, neg_pooled = pipe.encode_prompt("a red cat", device="cpu", do_classifier_free_guidance=True)
        torch.testing.assert_close(table[""]["encoder_hidden_states"], neg)
        torch.testing.assert_close(table[""]["added_cond_kwargs"]["text_embeds"], neg_pooled)
        assert float(neg.abs().sum()) == 0.0 and float(table["a red cat"]["encoder_hidden_states"].abs().sum()) > 0
        # the entry drives the SDXL UNet through the problem's conditioning path
        net = H.unet_denoiser(H.load_unet(pipes["sdxl"]), SCHEDULER)
        y = net(torch.randn(2, 4, 8, 8), torch.tensor([0.5, 1.0]), table["a red cat"])
        assert y.shape == (2, 4, 8, 8) and bool(torch.isfinite(y).all())


def test_named_prompt_sets_are_read(pipes):
    coco = E.gather_prompts(["coco1k"])
    assert coco[0] == "" and len(coco) == 1 + len(set(coco[1:])) and len(coco) > 900
    both = E.gather_prompts(["coco1k", "hpsv2:photo"])
    assert both[: len(coco)] == coco and len(both) > len(coco)


def test_bad_input_is_named(tmp_path, pipes, capsys, no_network):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    out = tmp_path / "o.safetensors"
    base = ["--prompts", str(prompts), "--out", str(out), "--no-progress"]

    broken = tmp_path / "broken"
    shutil.copytree(pipes["sd15"], broken)
    shutil.rmtree(broken / "text_encoder")
    code, _, err = run_main(["--model", str(broken), *base], capsys)
    assert code == 2 and str(broken / "text_encoder") in err and "nothing is downloaded" in err
    (broken / "text_encoder").mkdir()
    (broken / "text_encoder" / "config.json").write_text("{}")
    code, _, err = run_main(["--model", str(broken), *base], capsys)
    assert code == 2 and str(broken / "text_encoder" / "model.safetensors") in err

    code, _, err = run_main(["--model", str(tmp_path / "nowhere"), *base], capsys)
    assert code == 2 and str(tmp_path / "nowhere") in err

    code, _, err = run_main(["--model", str(pipes["sd15"]), "--prompts", "coco2k", "--out", str(out)], capsys)
    assert code == 2 and "'coco2k'" in err and "coco1k" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    code, _, err = run_main(["--model", str(pipes["sd15"]), "--prompts", str(empty), "--out", str(out)], capsys)
    assert code == 2 and str(empty) in err and "no prompts" in err

    code, _, err = run_main(["--model", str(pipes["sd15"]), *base, "--kind", "sd3"], capsys)
    assert code == 2 and "not supported" in err and "save_prompt_embeddings" in err
    code, _, err = run_main(["--model", str(pipes["sd15"]), "--prompts", str(prompts), "--out",
                             str(tmp_path / "no" / "o.safetensors")], capsys)
    assert code == 2 and str(tmp_path / "no") in err
    assert not out.exists()  # nothing was written by any failed run
