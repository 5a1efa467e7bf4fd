"""DI++'s fused kernels: C/CUDA backends with a pure-PyTorch reference beside them.

ops.OPS is the op table (each kernel's C entry, reference and argument checks); backends() says
which backend can run which op here and why not, use_backend() / DIPP_BACKEND force one.
"""

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
from .ops import backends
from .registry import BackendUnavailable, NoBackend, use_backend

__all__ = [
    "BackendUnavailable",
    "GeneratorGrad",
    "HuberTerms",
    "NoBackend",
    "TALoss",
    "adam_step",
    "add_noise",
    "backends",
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
    "use_backend",
]
