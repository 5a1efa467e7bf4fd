"""One-click Align on every text-to-image family of the tested ComfyUI (issue 13's table).

Each family is the tiny random instance of families.py: built through ComfyUI's own classes, saved in the family's
file layout, loaded back by ComfyUI's loaders. Per family: DI++ Align (the node's function, under inference mode as
ComfyUI runs nodes) for ALIGN_STEPS steps with the built-in brightness reward; the reward of one-step samples with
fixed noise must rise by MARGIN; One-Step Sample of the aligned MODEL must work; the saved LoRA must load through
core LoraLoaderModelOnly with every layer patched, no "lora key not loaded", and give the aligned MODEL's samples.
Each row prints what was measured (`pytest -s`), which is what docs/FAMILIES.md's table reports.

Runs only with COMFYUI_PATH, like the rest of tests/comfy_host.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pytest

COMFY = os.environ.get("COMFYUI_PATH", "")
if not COMFY or not (Path(COMFY) / "comfy").is_dir():
    pytest.skip("real-ComfyUI tests skipped: set COMFYUI_PATH to a ComfyUI checkout (with its requirements and CPU "
                "torch installed) to run them", allow_module_level=True)

import families  # noqa: E402
import torch  # noqa: E402
from test_comfy_host import declarations, host  # noqa: E402, F401 - host is a fixture

ALIGN_STEPS = 12
ALPHA = 1000.0  # the reward's scale: brightness moves by hundredths, the IKL term of a random network is O(1)
LR = 3e-3  # generator; the TA learns at 1e-3 (the SD1.5 host test's settings)
EVAL_SEEDS = 4  # one-step samples per prompt, the same noise before and after
PROMPTS = ("a cat", "a dog")
# brightness lies in [0, 1]; measured gains in ALIGN_STEPS steps: +0.0078 (SD3.5, the least) to +0.079 (HunyuanDiT),
# docs/FAMILIES.md lists them all; the same runs are bit-identical from one process to the next
MARGIN = 0.005


def mean_reward(model, clip, vae, size: int) -> float:
    """Brightness of one-step samples (fixed seeds) decoded by the VAE, as the reward scores them."""
    from diffinstruct.comfyui import host as comfy_host
    from diffinstruct.comfyui import training as comfy_train
    from diffinstruct.rewards.builtin import BrightnessReward

    decoder = comfy_host.differentiable_decoder(vae)
    scorer = BrightnessReward()
    scores = []
    with torch.no_grad():
        for i, prompt in enumerate(PROMPTS):
            cond = families.conditioning(clip, prompt)
            latent = comfy_train.one_step_sample(model, cond, 100 + i, EVAL_SEEDS, size, size)
            scores.append(scorer(decoder(latent), [prompt] * EVAL_SEEDS).float().mean())
    return float(torch.stack(scores).mean())


@pytest.fixture(scope="module")
def loaded(host):  # noqa: F811 - the fixture imported above
    """family name -> (family, MODEL, CLIP, VAE, stem): its tiny files written and read by ComfyUI's loaders."""
    cache: dict[str, tuple] = {}

    def get(name: str) -> tuple:
        if name not in cache:
            family = families.BY_NAME[name]
            stem = name.replace(" ", "_").replace(".", "")
            built = families.build(family, seed=0)
            files = families.load(family, families.save(family, built, host.tmp / "families" / stem))
            cache[name] = (family, files.model, families.clip_for(family), files.vae, stem)
        return cache[name]

    return get


@pytest.fixture(scope="module")
def aligned(host, loaded):  # noqa: F811 - the fixture imported above
    """family name -> what Align produced and what was measured (each family runs once, on first use)."""
    cache: dict[str, dict] = {}
    mappings = declarations(host)
    counter = families.NotLoaded()
    logging.getLogger().addHandler(counter)

    def get(name: str) -> dict:
        if name in cache:
            return cache[name]
        family, model, clip, vae, stem = loaded(name)
        size = family.latent_size * 8
        with torch.inference_mode():  # as ComfyUI runs nodes
            before = mean_reward(model, clip, vae, size)
            reward = mappings["DIPPReward"]().build("brightness", 1.0, "auto")[0]
            started = time.perf_counter()
            out = mappings["DIPPAlign"]().align(model, clip, vae, "\n".join(PROMPTS), reward, ALPHA, 1.0,
                                                ALIGN_STEPS, width=size, height=size, learning_rate=LR,
                                                ta_learning_rate=1e-3, batch_size=2, checkpoint_every=ALIGN_STEPS,
                                                checkpoint_dir=str(host.tmp / "family_runs" / stem))["result"]
            seconds = time.perf_counter() - started
            after = mean_reward(out[0], clip, vae, size)
        info = json.loads(out[4])
        cache[name] = {"family": family, "model": model, "clip": clip, "vae": vae, "out": out, "size": size,
                       "before": before, "after": after, "seconds": seconds, "info": info, "mappings": mappings,
                       "counter": counter, "stem": stem}
        print(f"\n{name}: Align {ALIGN_STEPS} steps ({info['process']}) in {seconds:.1f} s, brightness of one-step "
              f"samples {before:.4f} -> {after:.4f} ({after - before:+.4f})")
        return cache[name]

    yield get
    logging.getLogger().removeHandler(counter)


NAMES = [f.name for f in families.FAMILIES]


@pytest.mark.parametrize("name", NAMES)
def test_align_raises_the_reward(aligned, name):
    row = aligned(name)
    assert row["after"] - row["before"] >= MARGIN, (row["before"], row["after"])


@pytest.mark.parametrize("name", NAMES)
def test_one_step_sample_of_the_aligned_model(aligned, name):
    row = aligned(name)
    family, size = row["family"], row["size"]
    cond = families.conditioning(row["clip"], "a cat")
    with torch.inference_mode():
        latent, image = row["mappings"]["DIPPOneStepSample"]().sample(row["out"][0], cond, 0, size, size, 2,
                                                                     vae=row["vae"])[:2]
    latent = latent["samples"]
    side = family.latent_size
    frames = (1,) if name == "Qwen-Image" else ()  # Qwen-Image's LATENT is the video VAE's [B, C, 1, H, W]
    assert tuple(latent.shape) == (2, family.latent_channels, *frames, side, side)
    assert torch.isfinite(latent).all() and (latent[0] - latent[1]).abs().max() > 0  # two seeds, two samples
    assert tuple(image.shape) == (2, size, size, 3) and torch.isfinite(image).all()


@pytest.mark.parametrize("name", NAMES)
def test_saved_lora_loads_through_core_loader(aligned, name, host):  # noqa: F811
    from diffinstruct.comfyui import training as comfy_train
    from diffinstruct.comfyui.files import save_weights

    row = aligned(name)
    model, out, size = row["model"], row["out"], row["size"]
    path = save_weights(out[1], host.tmp / "loras", f"families/{row['stem']}")
    layers = sum(k.endswith(".lora_down.weight") for k in out[1].tensors)
    row["counter"].count = 0
    before = len(model.patches)
    with torch.inference_mode():
        patched = row["mappings"]["LoraLoaderModelOnly"]().load_lora_model_only(model, f"families/{path.name}",
                                                                               1.0)[0]
        cond = families.conditioning(row["clip"], "a dog")
        a = comfy_train.one_step_sample(out[0], cond, 7, 2, size, size)
        b = comfy_train.one_step_sample(patched, cond, 7, 2, size, size)
    print(f"\n{name}: {len(patched.patches) - before} of {layers} LoRA layers patched, "
          f"{row['counter'].count} keys not loaded")
    assert layers > 0 and len(patched.patches) - before == layers
    assert row["counter"].count == 0
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def comfy_x0(patcher, positive, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """ComfyUI's own evaluation of the MODEL, as its samplers make it: conditioning through process_conds (the
    model's extra_conds), then calc_cond_batch with the MODEL's model_options (its patches)."""
    import comfy.model_management
    import comfy.sampler_helpers
    import comfy.samplers

    # as a sampler does: the MODEL's own patches (and no other clone's) are in the shared weights
    comfy.model_management.load_models_gpu([patcher])
    conds = comfy.samplers.process_conds(patcher.model, x, {"positive": comfy.sampler_helpers.convert_cond(positive)},
                                         x.device, latent_image=torch.zeros_like(x), seed=0)
    previous, patcher.model.current_patcher = patcher.model.current_patcher, patcher  # as a sampler sets it
    try:
        return comfy.samplers.calc_cond_batch(patcher.model, [conds["positive"]], x, sigma, patcher.model_options)[0]
    finally:
        patcher.model.current_patcher = previous


def pack_x0(patcher, positive, x: torch.Tensor, sigma: torch.Tensor, copy: bool) -> torch.Tensor:
    """The same through the pack: the denoiser the engine trains (a copy) or samples with (a view)."""
    from diffinstruct.comfyui import host as comfy_host

    denoiser = comfy_host.trainable_copy(patcher) if copy else comfy_host.frozen_view(patcher)
    engine_x = x[:, :, 0] if x.dim() == 5 else x  # the engine's view of Qwen-Image's [B, C, 1, H, W]
    cond = comfy_host.encode_conditioning(patcher, positive[0], tuple(x.shape[-2:]))
    out = denoiser(engine_x, sigma, cond)
    return out.unsqueeze(2) if x.dim() == 5 else out


@pytest.mark.parametrize("name", NAMES)
def test_the_pack_evaluates_the_model_as_comfyui_samples_it(loaded, name):
    """Conditioning extras (pooled outputs, masks, SDXL's y, guidance, num_tokens...) reach the network as they do
    in ComfyUI's sampler: the pack's denoiser and ComfyUI's calc_cond_batch agree at the same noisy input."""
    family, model, clip, _, _ = loaded(name)
    side = family.latent_size
    shape = (1, family.latent_channels, 1, side, side) if name == "Qwen-Image" else (1, family.latent_channels,
                                                                                      side, side)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(shape, generator=gen)
    sigma = model.model.model_sampling.sigma(torch.tensor([500.0]))
    positive = families.conditioning(clip, "a cat")
    with torch.inference_mode():
        theirs = comfy_x0(model, positive, x, sigma)
        view = pack_x0(model, positive, x, sigma, copy=False)
        other = pack_x0(model, families.conditioning(clip, "a dog"), x, sigma, copy=False)
    copied = pack_x0(model, positive, x, sigma, copy=True).detach()  # outside inference mode, as training runs
    torch.testing.assert_close(view, theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(copied, theirs, rtol=1e-4, atol=1e-4)
    assert (other - view).abs().max() > 1e-5  # the comparison sees the conditioning


def call_node(host, name: str, **inputs):  # noqa: F811
    """A core node's function (V1 or V3), as ComfyUI's executor calls it; its outputs as a tuple."""
    cls = host.nodes.NODE_CLASS_MAPPINGS[name]
    if hasattr(cls, "execute") and hasattr(cls, "define_schema"):
        out = cls.execute(**inputs)
        return tuple(out.args if hasattr(out, "args") else out)
    return tuple(getattr(cls(), cls.FUNCTION)(**inputs))


def test_model_patches_from_other_nodes_are_honoured_in_training(host, loaded):  # noqa: F811
    """A MODEL patched by core PatchModelAddDownscale (Kohya Deep Shrink: transformer_options input and output block
    patches that read the step's sigmas): the copy the engine trains computes what ComfyUI samples with the patch,
    not the unpatched network, and a gradient goes back through it. A patch that works in place (FreeU_V2) cannot
    be differentiated: Align says so, naming the patches, instead of autograd's message."""
    from diffinstruct.errors import ConfigError

    _, model, clip, vae, _ = loaded("SD1.5")
    patched = call_node(host, "PatchModelAddDownscale", model=model, block_number=1, downscale_factor=2.0,
                        start_percent=0.0, end_percent=1.0, downscale_after_skip=True, downscale_method="bilinear",
                        upscale_method="bilinear")[0]
    assert patched.model_options["transformer_options"].get("patches")
    x = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(2))
    sigma = model.model.model_sampling.sigma(torch.tensor([400.0]))
    positive = families.conditioning(clip, "a cat")
    with torch.inference_mode():
        theirs = comfy_x0(patched, positive, x, sigma)
        plain = comfy_x0(model, positive, x, sigma)
    ours = pack_x0(patched, positive, x, sigma, copy=True)
    assert (theirs - plain).abs().max() > 1e-3, "the patch changes the model"
    torch.testing.assert_close(ours.detach(), theirs, rtol=1e-4, atol=1e-4)
    ours.float().square().mean().backward()  # a gradient goes back through the patched network

    freeu = call_node(host, "FreeU_V2", model=model, b1=1.3, b2=1.4, s1=0.9, s2=0.2)[0]
    mappings = declarations(host)
    with torch.inference_mode(), pytest.raises(ConfigError, match=r"patches from other nodes \(output_block_patch\)"
                                                                  r".*in place.*FreeU"):
        reward = mappings["DIPPReward"]().build("brightness", 1.0, "auto")[0]
        mappings["DIPPAlign"]().align(freeu, clip, vae, "a cat", reward, ALPHA, 1.0, 1, width=64, height=64,
                                      checkpoint_dir=str(host.tmp / "family_runs" / "freeu"))


def test_guidance_distilled_reference(host, loaded, aligned):  # noqa: F811
    """Flux.1 dev is guided by the conditioning's guidance (FluxGuidance), in one pass: omega other than 1 is
    refused with what to do instead; the run reports the guidance it used; prompts get FluxGuidance's value."""
    from diffinstruct.comfyui import conditioning
    from diffinstruct.comfyui import host as comfy_host
    from diffinstruct.comfyui.specs import ReferenceSpec
    from diffinstruct.errors import ConfigError

    _, dev, dev_clip, _, _ = loaded("Flux.1 dev")
    _, schnell, _, _, _ = loaded("Flux.1 schnell")
    assert comfy_host.guidance_distilled(dev) and not comfy_host.guidance_distilled(schnell)
    assert not comfy_host.guidance_distilled(loaded("Chroma")[1])  # its guidance key is unused: real CFG
    negative = families.conditioning(dev_clip, "")
    with pytest.raises(ConfigError, match=r"omega = 4.5 cannot apply.*guidance-distilled.*FluxGuidance"):
        ReferenceSpec(dev, None, negative, 4.5)
    ReferenceSpec(schnell, None, negative, 4.5)  # CFG applies to schnell
    assert aligned("Flux.1 dev")["info"]["reference_guidance"] == 3.5  # ComfyUI's default for Flux dev
    assert "reference_guidance" not in aligned("Flux.1 schnell")["info"]
    guided = call_node(host, "FluxGuidance", conditioning=families.conditioning(dev_clip, "a cat"), guidance=6.0)[0]
    labels, table = conditioning.conditioning_table(dev, ["a cat", "a dog"], dev_clip, guided, negative, (8, 8), 8)
    assert [float(table[p]["guidance"][0]) for p in labels] == [6.0, 6.0]
    assert conditioning.reference_guidance(dev, table) == 6.0


@pytest.mark.parametrize("weight_dtype", ["fp8_e4m3fn", "bf16"])
@pytest.mark.parametrize("name", ["SD1.5", "Flux.1 dev"])
def test_low_precision_frozen_base(host, aligned, name, weight_dtype):  # noqa: F811
    """A MODEL loaded with a weight dtype (fp8 as UNETLoader's weight_dtype, or bf16): in the shared mode the frozen
    base stays in that dtype, computing in float32 as ComfyUI's own casting layers compute it, with float32 LoRA
    adapters on top; Align raises the reward and its LoRA loads onto that MODEL through the core loader."""
    from diffinstruct.comfyui import host as comfy_host
    from diffinstruct.comfyui.files import save_weights

    dtype = {"fp8_e4m3fn": torch.float8_e4m3fn, "bf16": torch.bfloat16}[weight_dtype]
    family = families.BY_NAME[name]
    stem = f"{name.replace(' ', '_').replace('.', '')}_{weight_dtype}"
    files = families.save(family, families.build(family, seed=0), host.tmp / "families" / stem)
    model = families.load(family, files, {"dtype": dtype}).model
    clip, vae = families.clip_for(family), families.load(family, files).vae
    assert model.model.get_dtype() == dtype

    copy = comfy_host.trainable_copy(model, keep_weight_dtype=True)
    low = sum(p.numel() for p in copy.parameters() if p.dtype == dtype)
    assert low > 0.9 * sum(p.numel() for p in copy.parameters()), "the frozen weights stay as loaded"
    side = family.latent_size
    x = torch.randn((1, family.latent_channels, side, side), generator=torch.Generator().manual_seed(3))
    sigma = model.model.model_sampling.sigma(torch.tensor([300.0]))
    positive = families.conditioning(clip, "a cat")
    with torch.inference_mode():
        theirs = comfy_x0(model, positive, x, sigma)
    cond = comfy_host.encode_conditioning(model, positive[0], (side, side))
    with torch.no_grad():
        ours = copy(x, sigma, cond)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)  # the same function ComfyUI samples
    # with a gradient recorded, backward keeps the stored weights, not a float copy of each (FrozenCast)
    weights = {tuple(m.weight.shape) for m in copy.modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)}
    saved: list[tuple[tuple[int, ...], torch.dtype]] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((tuple(t.shape), t.dtype)) or t,
                                                  lambda t: t):
        copy(x.clone().requires_grad_(True), sigma, cond).sum().backward()
    floats = [shape for shape, d in saved if d == torch.float32 and shape in weights]
    assert not floats, floats[:5]

    mappings = declarations(host)
    size = side * 8
    with torch.inference_mode():
        before = mean_reward(model, clip, vae, size)
        reward = mappings["DIPPReward"]().build("brightness", 1.0, "auto")[0]
        out = mappings["DIPPAlign"]().align(model, clip, vae, "\n".join(PROMPTS), reward, ALPHA, 1.0, ALIGN_STEPS,
                                            width=size, height=size, learning_rate=LR, ta_learning_rate=1e-3,
                                            batch_size=2, checkpoint_every=ALIGN_STEPS,
                                            checkpoint_dir=str(host.tmp / "family_runs" / stem))["result"]
        after = mean_reward(out[0], clip, vae, size)
    info = json.loads(out[4])
    print(f"\n{name} loaded in {weight_dtype}: brightness {before:.4f} -> {after:.4f} ({after - before:+.4f}); "
          f"frozen base {info['frozen_base_dtype']}; the same run from float32 weights gained "
          f"{aligned(name)['after'] - aligned(name)['before']:+.4f}")
    assert info["frozen_base_dtype"] == str(dtype).removeprefix("torch.")
    assert {v.dtype for v in out[1].tensors.values()} == {torch.float32}
    assert after - before >= MARGIN, (before, after)

    path = save_weights(out[1], host.tmp / "loras", f"families/{stem}")
    counter = families.NotLoaded()
    logging.getLogger().addHandler(counter)
    try:
        with torch.inference_mode():
            patched = mappings["LoraLoaderModelOnly"]().load_lora_model_only(model, f"families/{path.name}", 1.0)[0]
    finally:
        logging.getLogger().removeHandler(counter)
    assert len(patched.patches) == sum(k.endswith(".lora_down.weight") for k in out[1].tensors)
    assert counter.count == 0


@pytest.mark.parametrize("name", ["SD1.5", "Flux.1 dev"])
def test_align_in_bf16(host, loaded, name):  # noqa: F811
    """Align with bf16 on (autocast; frozen weights kept in bf16): the reward of one-step samples rises as in
    float32, and the LoRA it saves is finite."""
    family, model, clip, vae, stem = loaded(name)
    size = family.latent_size * 8
    mappings = declarations(host)
    folder = host.tmp / "family_runs" / f"{stem}_autocast"  # its own run: nothing to resume from
    assert not folder.exists()
    with torch.inference_mode():
        before = mean_reward(model, clip, vae, size)
        reward = mappings["DIPPReward"]().build("brightness", 1.0, "auto")[0]
        out = mappings["DIPPAlign"]().align(model, clip, vae, "\n".join(PROMPTS), reward, ALPHA, 1.0, ALIGN_STEPS,
                                            width=size, height=size, learning_rate=LR, ta_learning_rate=1e-3,
                                            batch_size=2, checkpoint_every=ALIGN_STEPS, bf16=True,
                                            checkpoint_dir=str(folder))["result"]
        after = mean_reward(out[0], clip, vae, size)
    print(f"\n{name}: Align {ALIGN_STEPS} steps in bf16, brightness {before:.4f} -> {after:.4f} "
          f"({after - before:+.4f})")
    assert json.loads(out[4])["start_step"] == 0  # trained from the start, in bf16
    assert all(bool(torch.isfinite(t).all()) for t in out[1].tensors.values())
    assert after > before + MARGIN
