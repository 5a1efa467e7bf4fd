"""DI++'s fused kernels: C/CUDA backends with a pure-PyTorch reference beside them."""

from .api import (
    GeneratorGrad,
    HuberTerms,
    TALoss,
    adam_step,
    add_noise,
    cfg_combine,
    ema_update,
    fill_normal,
    fill_uniform,
    generator_grad,
    huber_terms,
    precond,
    sample_sigma,
    sigma_table,
    ta_loss,
)
from .backend import cuda_backend_status

__all__ = [
    "GeneratorGrad",
    "HuberTerms",
    "TALoss",
    "adam_step",
    "add_noise",
    "cfg_combine",
    "cuda_backend_status",
    "ema_update",
    "fill_normal",
    "fill_uniform",
    "generator_grad",
    "huber_terms",
    "precond",
    "sample_sigma",
    "sigma_table",
    "ta_loss",
]
