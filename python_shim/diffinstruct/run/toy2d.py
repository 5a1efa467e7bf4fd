"""The "toy2d" problem: the 2-D class-conditional Gaussian mixture of toy.py, with an exact reference, an MLP
generator and TA. Its samples are points, so it takes the "none" and "target" rewards, not image rewards."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .builders import build_reward
from .options import Option
from .problems import Built, Problem, register_problem
from .spec import RunSpec


class Toy2D(Problem):
    """The 2-D class-conditional Gaussian mixture of toy.py: exact reference, MLP generator and TA."""

    name = "toy2d"
    options = {
        "classes": Option("int", 4, low=1, high=1000),
        "s2": Option("float", 0.05, low=0.0, open_low=True, help="per-class variance"),
        "hidden": Option("int", 128, low=1, high=1 << 16),
        "sigma_init": Option("float", None, low=0.0, open_low=True, help="generator sigma_init (default 2.5)"),
    }
    rewards = ("none", "target")

    def check(self, spec: RunSpec) -> None:
        a, b = spec.problem_options["sigma_init"], spec.train.sigma_init
        if a is not None and b is not None and a != b:
            raise ConfigError(f"sigma_init is set in both [toy2d] ({a:g}) and [train] ({b:g}); set it in one place")

    def data_numel(self, spec: RunSpec) -> int:
        return 2

    def _sigma_init(self, spec: RunSpec) -> float:
        for v in (spec.problem_options["sigma_init"], spec.train.sigma_init):
            if v is not None:
                return float(v)
        return 2.5

    def build(self, spec: RunSpec) -> Built:
        from .. import toy

        opts = spec.problem_options
        mixture = toy.GaussianMixture(toy.default_means(opts["classes"]), s2=opts["s2"])
        models = toy.build_models(mixture, hidden=opts["hidden"], seed=spec.seed, sigma_init=self._sigma_init(spec))
        return Built(models=models, prompts=toy.class_prompts(opts["classes"]), reward=build_reward(spec),
                     extras={"mixture": mixture})

    def _draw(self, built: Built, n: int, seed: int) -> tuple[Any, Any]:
        import torch

        from .. import toy

        labels = torch.arange(n) % built.extras["mixture"].classes
        return toy.generate(built.models, labels, seed), labels

    def evaluate(self, built: Built, spec: RunSpec, n: int, seed: int) -> dict[str, Any]:
        import torch

        from .. import toy

        mixture = built.extras["mixture"]
        x, labels = self._draw(built, n, seed)
        ref = mixture.sample(labels, generator=torch.Generator().manual_seed(seed + 1))
        ref2 = mixture.sample(labels, generator=torch.Generator().manual_seed(seed + 2))
        per_class = []
        for k in range(mixture.classes):
            sel = labels == k
            per_class.append(float((x[sel].mean(0) - mixture.means[k]).norm()) if bool(sel.any()) else math.nan)
        finite = [d for d in per_class if math.isfinite(d)]
        out: dict[str, Any] = {
            "mmd": toy.mmd(x, ref),
            "class_mean_distance": sum(finite) / len(finite) if finite else math.nan,
            "mmd_reference_floor": toy.mmd(ref2, ref),
            "per_class_mean_distance": per_class,
            "n": n,
        }
        if built.reward is not None:
            with torch.no_grad():
                prompts = [f"class {k}" for k in labels.tolist()]
                out["reward_mean"] = float(built.reward(x, prompts, labels).float().mean())
        return out

    def sample(self, built: Built, spec: RunSpec, n: int, seed: int, points_path: Path,
               plot_path: Path | None) -> dict[str, Any]:
        import numpy as np

        x, labels = self._draw(built, n, seed)
        points_path.parent.mkdir(parents=True, exist_ok=True)
        if points_path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file({"samples": x.detach().float().contiguous(), "labels": labels.contiguous()}, points_path,
                      metadata={"problem": self.name, "n": str(n), "seed": str(seed)})
        else:
            np.save(points_path, x.detach().float().numpy())
        result: dict[str, Any] = {"samples": str(points_path), "n": n, "seed": seed}
        if plot_path is not None:
            import torch

            from ..plotting import plot_samples

            mixture = built.extras["mixture"]
            reference = mixture.sample(labels, generator=torch.Generator().manual_seed(seed + 1))
            target = spec.reward.get("target") if spec.reward["name"] == "target" else None
            plot_samples(x.numpy(), labels.numpy(), plot_path, means=mixture.means.numpy(), target=target,
                         reference=reference.numpy(), title=f"{spec.train.method}, alpha={spec.train.alpha:g}")
            result["plot"] = str(plot_path)
        return result


register_problem(Toy2D())
