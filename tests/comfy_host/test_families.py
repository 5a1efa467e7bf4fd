"""Every text-to-image family of the tested ComfyUI, tiny and random (families.py): built through ComfyUI's
model classes, saved in the family's file layout, loaded by ComfyUI's loaders, sampled by its KSampler path.

Runs only with COMFYUI_PATH, like the rest of tests/comfy_host.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

COMFY = os.environ.get("COMFYUI_PATH", "")
if not COMFY or not (Path(COMFY) / "comfy").is_dir():
    pytest.skip("real-ComfyUI tests skipped: set COMFYUI_PATH to a ComfyUI checkout (with its requirements and CPU "
                "torch installed) to run them", allow_module_level=True)

import families  # noqa: E402
import torch  # noqa: E402

# the parameterisation each family's real checkpoints sample with (comfy.model_sampling class in the MRO)
PARAMETERISATION = {"SD1.5": "EPS", "SDXL": "EPS", "PixArt-alpha": "EPS", "PixArt-sigma": "EPS",
                    "HunyuanDiT 1.2": "EPS"}  # the rest are rectified flow: CONST
LATENT_FORMAT = {"SD1.5": "SD15", "SDXL": "SDXL", "SD3.5": "SD3", "PixArt-alpha": "SD15", "PixArt-sigma": "SDXL",
                 "AuraFlow": "SDXL", "HunyuanDiT 1.2": "SDXL", "Qwen-Image": "Wan21"}  # the rest: Flux


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    sys.path.insert(0, COMFY)
    try:
        from comfy.cli_args import args

        args.cpu = True  # before comfy.model_management is imported
        import comfy.model_management
        import comfy.sd  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"real-ComfyUI tests skipped: ComfyUI at {COMFY} does not import here ({exc})")
    assert Path(comfy.model_management.__file__).resolve().parents[1] == Path(COMFY).resolve()
    return tmp_path_factory.mktemp("families")


def test_the_family_list_covers_the_issue():
    wanted = {"SD1.5", "SDXL", "SD3.5", "PixArt-alpha", "PixArt-sigma", "Flux.1 dev", "Flux.1 schnell", "Chroma",
              "Lumina 2", "Qwen-Image", "HiDream", "AuraFlow", "HunyuanDiT 1.2"}
    assert wanted <= set(families.BY_NAME)


@pytest.mark.parametrize("name", [f.name for f in families.FAMILIES])
def test_family_loads_through_comfyui_and_samples(folder, name):
    family = families.BY_NAME[name]
    built = families.build(family, seed=3)
    paths = families.save(family, built, folder / name.replace(" ", "_"))
    assert set(paths) == ({"checkpoint"} if family.layout == "checkpoint" else {"diffusion_model", "vae"})
    loaded = families.load(family, paths)

    # ComfyUI's verdict on the file: from its keys, or (SD1.5, SDXL) from the real widths
    if family.tiny_detected:
        assert loaded.verdicts == [family.config_class]
    else:
        assert loaded.verdicts == [None]
        assert families.full_size_verdict(family) == family.config_class
    base = loaded.model.model
    assert type(base) is type(built)
    assert type(base.model_config).__name__ == family.config_class
    assert type(base.latent_format).__name__ == LATENT_FORMAT.get(name, "Flux")
    kind = PARAMETERISATION.get(name, "CONST")
    assert any(c.__name__ == kind for c in type(base.model_sampling).__mro__), type(base.model_sampling).__mro__
    theirs, ours = base.diffusion_model.state_dict(), built.diffusion_model.state_dict()
    assert theirs.keys() == ours.keys()
    for key, value in ours.items():  # the loader filled the network with the file's weights
        torch.testing.assert_close(theirs[key].float(), value.float(), msg=key)
    assert loaded.vae.latent_channels == family.latent_channels

    clip = families.clip_for(family)
    cat, dog, empty = (families.conditioning(clip, p) for p in ("a cat", "a dog", ""))
    with torch.inference_mode():
        a = families.sample(loaded.model, cat, empty, family.latent_channels, 1, 1.0, family.latent_size)
        b = families.sample(loaded.model, dog, empty, family.latent_channels, 1, 1.0, family.latent_size)
    side = family.latent_size
    shape = (1, family.latent_channels, 1, side, side) if name == "Qwen-Image" else (1, family.latent_channels,
                                                                                      side, side)
    assert tuple(a.shape) == shape and torch.isfinite(a).all() and torch.isfinite(b).all()
    assert (a - b).abs().max() > 1e-4, "the prompt's conditioning must reach the network"
