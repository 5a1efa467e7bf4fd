"""The built-in tiny text-to-image problem behind `make demo` (procedural coloured shapes, 16x16 RGB).

    from diffinstruct.tiny import load_teacher, load_classifier, tokenize
    teacher = load_teacher()                      # D(x, sigma, tokens) -> x0, x in [-1, 1]
    x = sample_teacher(teacher, ["a large red circle at the top left"], seed=0)
"""

from .data import all_prompts, parse_prompt, sample_batch, to_data, to_images, tokenize
from .models import load_classifier, load_teacher
from .sampling import heun_sample, sample_teacher

__all__ = ["all_prompts", "heun_sample", "load_classifier", "load_teacher", "parse_prompt", "sample_batch",
           "sample_teacher", "to_data", "to_images", "tokenize"]
