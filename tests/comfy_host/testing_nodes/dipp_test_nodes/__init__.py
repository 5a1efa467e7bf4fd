"""A test-only ComfyUI node pack: a tiny SD1.5-architecture checkpoint (MODEL, CLIP, VAE) built in memory.

The host tests swap it in for CheckpointLoaderSimple in the shipped workflows (same outputs, same order).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import tiny_comfy  # noqa: E402


class TestTinySD15Checkpoint:
    DESCRIPTION = "A tiny random SD1.5-architecture model, text encoder and TAESD VAE (tests only)."
    CATEGORY = "testing"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 1000})}}

    def load(self, seed):
        return tiny_comfy.tiny_model(seed), tiny_comfy.tiny_clip(seed), tiny_comfy.tiny_vae(seed)


NODE_CLASS_MAPPINGS = {"TestTinySD15Checkpoint": TestTinySD15Checkpoint}
