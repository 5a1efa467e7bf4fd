"""Image rewards with the "diffusers" problem: the frozen VAE decode between the generator's latents and the scorer.

A tiny random UNet2DConditionModel and AutoencoderKL are saved in the layout users have (a pipeline folder with
unet/, vae/ and scheduler/), and driven through the CLI: `train --reward brightness` against
`--reward=-1*brightness` moves the decoded images' brightness in opposite directions, the reward gradient reaches the
generator but never the VAE, `evaluate --checkpoint` reports per-metric statistics, and a missing VAE is named.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from test_diffusers_adapter import SD15_SCHEDULER, UNET, cond_for  # noqa: E402

from diffinstruct import cli, run  # noqa: E402
from diffinstruct.hosts import diffusers as H  # noqa: E402
from diffinstruct.rewards import BrightnessReward, ColorMatchReward, LatentToImageReward  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

LATENT = (4, 8, 8)
# two stages: 8x8 latents -> 16x16 images
VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
           up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
           latent_channels=4, norm_num_groups=8, sample_size=16)
TAESD = dict(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
             num_decoder_blocks=(1, 1), latent_channels=4)
PROMPTS = ("a red cube", "a blue ball")


def tiny_vae(seed: int = 2, **overrides: object) -> torch.nn.Module:
    torch.manual_seed(seed)
    return diffusers.AutoencoderKL(**{**VAE, **overrides}).eval()


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """<root>/pipe (unet/, vae/, scheduler/, model_index.json), <root>/prompts.safetensors, <root>/prompts.txt."""
    root = tmp_path_factory.mktemp("diffusers_rewards")
    pipe = root / "pipe"
    H.build_model("unet", UNET, seed=1).save_pretrained(pipe / "unet")
    tiny_vae().save_pretrained(pipe / "vae")
    (pipe / "scheduler").mkdir()
    (pipe / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_SCHEDULER))
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    table = {"": cond_for("unet", seed=0), PROMPTS[0]: cond_for("unet", seed=1), PROMPTS[1]: cond_for("unet", seed=2)}
    H.save_prompt_embeddings(root / "prompts.safetensors", table)
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return root


def write_config(root: Path, name: str, steps: int = 2, model: Path | None = None, extra: str = "",
                 alpha: float = 1e4) -> Path:
    """A run of the tiny pipeline. alpha is large because the brightness of a random VAE's images moves little with
    the latents (about 1e-4 per latent element), while the distillation term is of order 1 per element."""
    toml = root / f"{name}.toml"
    toml.write_text(f"""
[run]
problem = "diffusers"
steps = {steps}
out_dir = "{root / name}"
checkpoint_every = {steps}
[train]
batch_size = 2
omega = 1.0
alpha = {alpha}
lr_generator = 1e-2
lr_ta = 1e-3
ema_decay = 0.0
[diffusers]
model = "{model or root / 'pipe'}"
embeddings = "{root / 'prompts.safetensors'}"
mode = "shared"
lora_rank = 4
latent_size = 8
{extra}
""")
    return toml


def evaluate(capsys, run: Path, prompts: Path, metrics: str = "brightness") -> dict:
    capsys.readouterr()
    assert cli.main(["evaluate", "--checkpoint", str(run), "--prompts", str(prompts), "--metrics", metrics,
                     "--json"]) == 0
    return json.loads(capsys.readouterr().out)


# ============================================================================================== the decode
def test_decoder_is_the_pipeline_formula_and_frozen():
    vae = tiny_vae()
    decoder = H.VAEDecoder(vae)
    z = torch.randn(2, *LATENT, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = (vae.decode(z / vae.config.scaling_factor).sample + 1) / 2
    torch.testing.assert_close(decoder(z), want)
    assert decoder.scale == 2 and decoder(z).shape == (2, 3, 16, 16)
    assert all(not p.requires_grad for p in vae.parameters())
    zg = z.clone().requires_grad_(True)
    BrightnessReward()(decoder(zg)).sum().backward()
    assert bool(torch.isfinite(zg.grad).all()) and float(zg.grad.abs().sum()) > 0
    assert all(p.grad is None for p in vae.parameters())
    decoder.train()
    assert not vae.training  # frozen: stays in eval mode
    # SD3's VAE: z / scaling_factor + shift_factor
    sd3 = tiny_vae(scaling_factor=1.5305, shift_factor=0.0609)
    with torch.no_grad():
        torch.testing.assert_close(H.VAEDecoder(sd3)(z), (sd3.decode(z / 1.5305 + 0.0609).sample + 1) / 2)
    # gradient checkpointing recomputes the decoder's blocks: same gradient
    zc = z.clone().requires_grad_(True)
    checkpointed = H.VAEDecoder(tiny_vae(), gradient_checkpointing=True)
    BrightnessReward()(checkpointed(zc)).sum().backward()
    assert checkpointed.vae.decoder.gradient_checkpointing and not vae.decoder.gradient_checkpointing
    torch.testing.assert_close(zc.grad, zg.grad)
    with pytest.raises(ValueError, match="latents"):
        decoder(torch.zeros(1, 16, 8, 8))


def test_load_vae_folder_file_and_taesd(tmp_path):
    from safetensors.torch import save_file

    vae = tiny_vae()
    vae.save_pretrained(tmp_path / "pipe" / "vae")
    loaded = H.load_vae(tmp_path / "pipe")  # a pipeline folder: its vae/
    sa, sb = vae.state_dict(), loaded.state_dict()
    assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert H.find_vae(tmp_path / "pipe") == tmp_path / "pipe" / "vae"
    (tmp_path / "pipe" / "unet").mkdir()
    assert H.find_vae(tmp_path / "pipe" / "unet") == tmp_path / "pipe" / "vae"
    file = tmp_path / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in sa.items()}, str(file))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "vae.json")):
        H.load_vae(file)
    (tmp_path / "vae.json").write_text((tmp_path / "pipe" / "vae" / "config.json").read_text())
    z = torch.randn(1, *LATENT)
    torch.testing.assert_close(H.VAEDecoder(H.load_vae(file))(z), H.VAEDecoder(vae)(z))
    torch.manual_seed(3)
    diffusers.AutoencoderTiny(**TAESD).save_pretrained(tmp_path / "taesd")
    tiny = H.load_vae(tmp_path / "taesd", tiny=True)
    assert type(tiny).__name__ == "AutoencoderTiny"
    with torch.no_grad():  # TAESD decodes the denoiser's latents as they are (scaling_factor 1)
        torch.testing.assert_close(H.VAEDecoder(tiny)(z), (tiny.decode(z).sample + 1) / 2)
    assert H.VAEDecoder(tiny).scale == 2
    with pytest.raises(ValueError, match="AutoencoderTiny"):
        H.load_vae(tmp_path / "pipe", tiny=True)
    assert H.split_vae_spec("taesd:/a/b") == ("/a/b", True) and H.split_vae_spec("/a/b") == ("/a/b", False)


# ============================================================================================== through the CLI
def test_reward_gradient_reaches_the_generator_not_the_vae(root):
    spec = run.load_config(write_config(root, "grad"), reward="brightness")
    trainer, built = run.build_trainer(spec)
    reward = built.reward
    assert isinstance(reward, LatentToImageReward) and isinstance(reward.decode, H.VAEDecoder)
    assert built.extras["vae_decoder"] is reward.decode
    vae = reward.decode.vae
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    assert all(not p.requires_grad for p in vae.parameters())
    models = built.models
    # r(decode(G(z))) differentiated by hand: the gradient reaches the generator's LoRA weights
    with torch.no_grad():
        for p in models.generator_params:
            p.normal_(0.0, 0.02)  # LoRA B starts at zero: make every adapter tensor carry a gradient
    z = torch.randn(2, *LATENT, generator=torch.Generator().manual_seed(4))
    cond = H._stack([built.prompts.conditioning(p) for p in PROMPTS])
    r = reward(models.generator(z, cond).float(), list(PROMPTS), cond)
    assert r.shape == (2,) and bool(((r > 0) & (r < 1)).all())  # mean luma of images near [0, 1]
    r.sum().backward()
    grads = [p.grad for p in models.generator_params]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert all(p.grad is None for p in vae.parameters())
    for p in models.generator_params:
        p.grad = None
    metrics = trainer.train_step(0)
    assert metrics["generator_ok"] == 1.0 and math.isfinite(metrics["reward"])
    after = vae.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in vae.parameters())


def test_train_reward_direction_and_evaluate(root, capsys):
    """`train --reward brightness` against `--reward=-1*brightness` from the same start, then `evaluate`."""
    steps = 4
    for name, reward in (("bright", "brightness"), ("dark", "-1*brightness")):
        toml = write_config(root, name, steps=steps)
        assert cli.main(["train", "--config", str(toml), "--no-progress", f"--reward={reward}"]) == 0
    prompts = root / "prompts.txt"
    reports = {name: evaluate(capsys, root / name, prompts) for name in ("bright", "dark")}
    means = {name: rep["metrics"]["brightness"]["mean"] for name, rep in reports.items()}
    # the common start (LoRA B = 0: the teacher at sigma_init), through the same generate_images as `evaluate`
    spec = run.load_config(root / "bright.toml", reward="brightness")
    built = run.build(spec)
    start = run.PROBLEMS["diffusers"].generate_images(built, spec, list(PROMPTS), 0)
    means["start"] = float(BrightnessReward()(start).mean())
    with capsys.disabled():
        print(f"\ndecoded brightness after {steps} steps: " + ", ".join(f"{k} {v:.4f}" for k, v in means.items()))
    for rep in reports.values():
        entry = rep["metrics"]["brightness"]
        assert entry["count"] == len(PROMPTS) and rep["skipped"] == {}
        assert all(math.isfinite(entry[k]) for k in ("mean", "std", "min", "max"))
    assert means["bright"] > means["start"] > means["dark"]
    # `eval` reports the run's own reward on the decoded images
    assert cli.main(["eval", "--checkpoint", str(root / "bright"), "--n", "2"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["n"] == 2 and 0.0 < rep["reward_mean"] < 1.0
    # `sample` writes the latents and, with the VAE, a PNG grid of the decoded images
    capsys.readouterr()
    assert cli.main(["sample", "--checkpoint", str(root / "bright"), "--out", str(root / "x.npy"), "--n", "3"]) == 0
    result = json.loads(capsys.readouterr().out)
    from PIL import Image

    assert result["plot"] == str(root / "x.png") and Image.open(root / "x.png").size == (3 * 16, 16)


def test_vae_options_dtype_and_taesd(root, tmp_path):
    torch.manual_seed(3)
    diffusers.AutoencoderTiny(**TAESD).save_pretrained(tmp_path / "taesd")
    spec = run.load_config(write_config(root, "taesd", extra=f'vae = "taesd:{tmp_path / "taesd"}"\n'
                                                             'dtype = "bfloat16"\nvae_gradient_checkpointing = true'),
                           reward="0.5*brightness+color_match")
    built = run.build(spec)
    decoder = built.reward.decode
    assert type(decoder.vae).__name__ == "AutoencoderTiny" and decoder.vae.decoder.gradient_checkpointing
    assert next(decoder.vae.parameters()).dtype == torch.bfloat16
    images = run.PROBLEMS["diffusers"].generate_images(built, spec, list(PROMPTS), 0)
    assert images.shape == (2, 3, 16, 16) and images.dtype == torch.float32
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    x0 = torch.randn(2, *LATENT, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
    r = built.reward(x0, list(PROMPTS), None)
    r.sum().backward()  # bfloat16 decode, float32 gradient
    with torch.no_grad():  # the prompts reach the scorer: color_match reads the colour each one names
        images = decoder(x0)
        want = 0.5 * BrightnessReward()(images) + ColorMatchReward()(images, list(PROMPTS))
    torch.testing.assert_close(r.detach(), want)
    assert x0.grad.dtype == torch.float32 and bool(torch.isfinite(x0.grad).all()) and float(x0.grad.abs().sum()) > 0
    # a float16 run keeps a VAE whose config says force_upcast (SDXL's) in float32
    spec = run.load_config(write_config(root, "fp16", extra='dtype = "float16"'), reward="brightness")
    assert next(run.build(spec).reward.decode.vae.parameters()).dtype == torch.float32


# ============================================================================================== errors
def test_missing_vae_is_named(root, tmp_path, capsys):
    missing = tmp_path / "nowhere"
    toml = write_config(root, "missing", extra=f'vae = "{missing}"')
    assert cli.main(["train", "--config", str(toml), "--reward", "brightness"]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "config.json" in err and not (root / "missing").exists()
    # a model folder with no vae/ beside it: the error says what to set and where the folder would go
    H.build_model("unet", UNET, seed=1).save_pretrained(tmp_path / "alone" / "unet")
    toml = write_config(root, "alone", model=tmp_path / "alone")
    assert cli.main(["train", "--config", str(toml), "--reward", "brightness"]) == 2
    err = capsys.readouterr().err
    assert "[diffusers] vae" in err and str(tmp_path / "alone" / "vae") in err
    # a VAE folder without its weights names the weights file
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text((root / "pipe" / "vae" / "config.json").read_text())
    toml = write_config(root, "noweights", extra=f'vae = "{tmp_path / "noweights"}"')
    assert cli.main(["train", "--config", str(toml), "--reward", "brightness"]) == 2
    assert str(tmp_path / "noweights" / "diffusion_pytorch_model.safetensors") in capsys.readouterr().err
    # a single-file VAE without its config.json names where the config goes
    (tmp_path / "single.safetensors").write_bytes((root / "pipe" / "vae" / "diffusion_pytorch_model.safetensors")
                                                  .read_bytes())
    toml = write_config(root, "single", extra=f'vae = "{tmp_path / "single.safetensors"}"')
    assert cli.main(["train", "--config", str(toml), "--reward", "brightness"]) == 2
    assert str(tmp_path / "single.json") in capsys.readouterr().err
    # a VAE of another latent space (16 channels, SD3's) is refused by name
    tiny_vae(latent_channels=16).save_pretrained(tmp_path / "vae16")
    toml = write_config(root, "vae16", extra=f'vae = "{tmp_path / "vae16"}"')
    assert cli.main(["train", "--config", str(toml), "--reward", "brightness"]) == 2
    assert "16-channel" in capsys.readouterr().err
    # without a reward the run needs no VAE, but generating images for `evaluate` does
    spec = run.load_config(write_config(root, "novae", model=tmp_path / "alone", alpha=0.0))
    built = run.build(spec)
    with pytest.raises(run.ConfigError, match="vae"):
        run.PROBLEMS["diffusers"].generate_images(built, spec, list(PROMPTS), 0)


def test_prompts_without_conditioning_are_named_and_builds_repeat(root):
    spec = run.load_config(write_config(root, "noprompt"), reward="brightness")
    built = run.build(spec)
    again = run.build(spec).models.generator_params  # LoRA's random init comes from [run] seed
    assert all(torch.equal(a, b) for a, b in zip(built.models.generator_params, again, strict=True))
    with pytest.raises(run.ConfigError, match="a green tree.*embeddings"):
        run.PROBLEMS["diffusers"].generate_images(built, spec, [PROMPTS[0], "a green tree"], 0)
