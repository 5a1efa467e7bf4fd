"""Diff-Instruct++ for one-step text-to-image generators: fused kernels, engine, ComfyUI nodes."""

__version__ = "0.1.0"
