"""Training, sampling and evaluation for the node pack, over ComfyUI objects or the package's own.

`train` is what the Train and Align nodes run: it copies the MODEL (comfy.trainable_copy), builds the
engine (engine.assemble + engine.build_engine, the config from the LossSpec and TrainOptions), trains it with
runner.run under ComfyHooks (ComfyUI's progress bar; its Cancel button honoured between steps, after a
checkpoint of the completed steps; resume from the checkpoint folder), and returns the aligned MODEL, its
weights (LoRA in ComfyUI's format, or full weights), the curves and a preview. Everything runs outside
inference mode (ComfyUI executes nodes inside it).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import distributed, engine, runner
from .. import metrics as mlog
from ..checks import check_int, is_int
from ..config import train_option
from ..errors import ConfigError
from ..generator import OneStepGenerator, default_sigma_init
from ..prompts import PromptList, _cat
from ..rewards import LatentToImageReward, load_spec
from . import checkpointing as comfy_checkpointing
from . import host as host
from . import live as comfy_live
from .conditioning import NULL, conditioning_table, reference_guidance, same_token_count
from .copies import low_precision
from .files import curves_image, lora_for_host, merge_lora
from .specs import LossSpec, RewardSpec, TrainedWeights

LOG = logging.getLogger("diffinstruct")


@dataclass
class TrainOptions:
    steps: int
    checkpoint_dir: str
    batch_size: int = train_option("batch_size", default=1)
    lr_generator: float = train_option("lr_generator", default=1e-4)
    ema_decay: float = train_option("ema_decay", default=0.95)
    seed: int = train_option("seed", default=0)
    width: int = 512
    height: int = 512
    checkpoint_every: int = 50
    resume: bool = True
    use_ema: bool = True
    bf16: bool = train_option("bf16", default=False)
    gradient_checkpointing: bool = False  # recompute the networks' blocks in backward (comfyui/checkpointing.py)
    preview_count: int = 4
    node_id: str | None = None
    live: comfy_live.LiveSettings = field(default_factory=comfy_live.LiveSettings)

    def check(self, downscale: int) -> None:
        for name, low in (("steps", 1), ("batch_size", 1), ("checkpoint_every", 1), ("seed", 0),
                          ("preview_count", 1)):
            check_int(name, getattr(self, name), low)
        for name in ("width", "height"):
            value = getattr(self, name)
            if not is_int(value) or value < downscale or value % downscale:
                raise ConfigError(f"{name} must be a positive multiple of {downscale} pixels, got {value!r}")
        if not self.checkpoint_dir or not str(self.checkpoint_dir).strip():
            raise ConfigError("checkpoint_dir is empty: name a folder for the run's checkpoints")
        out = Path(self.checkpoint_dir).expanduser()
        if out.exists() and not out.is_dir():  # before any setup, not after the models are copied
            raise ConfigError(f"checkpoint_dir {out} exists and is not a folder")
        self.live.check()


@dataclass
class TrainResult:
    model: Any
    weights: TrainedWeights
    curves: torch.Tensor
    preview: torch.Tensor
    summary: dict[str, Any] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)  # what the node shows on the canvas when it is done
    warning: bool = False

    def ui(self) -> dict[str, list[Any]]:
        return {"text": ["\n".join(self.lines)], **({"warning": [True]} if self.warning else {})}


# ============================================================================================== models
def same_model(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if host.is_comfy_model(a) and host.is_comfy_model(b):
        return a.model is b.model and getattr(a, "patches_uuid", None) == getattr(b, "patches_uuid", None)
    return False


def build_reward(spec: RewardSpec | None, model: Any, vae: Any, device: torch.device) -> Any:
    if spec is None:
        return None
    if vae is None:
        raise ConfigError("the reward scores images: connect a VAE")
    scorer = load_spec(spec.spec_string(), models_dir=host.models_dir()).to(device).requires_grad_(False).eval()
    decoder = host.differentiable_decoder(vae, device)
    return LatentToImageReward(lambda x0: decoder(host.to_raw_latent(model, x0)), scorer, spec.spec_string())


# ============================================================================================== training
class ComfyHooks(runner.RunHooks):
    """runner.run's hooks inside ComfyUI: its progress bar (with the live view's picture every N steps), the
    status on the node, and its Cancel button checked before every step.

    Any exception between steps (Cancel's InterruptProcessingException above all) first checkpoints the completed
    steps, so the run resumes from there; the node and the log say where. Outside ComfyUI (host.HostHooks finds no
    comfy) the bar and Cancel do nothing, and the live view still runs (its pictures are the previews' record)."""

    not_a_folder = "checkpoint folder {out} exists and is not a folder"
    holds_a_run = ("checkpoint folder {out} already holds a run (newest {newest}); enable resume to continue it, "
                   "or choose another folder")
    beyond_steps = "the run in {out} is at step {step}, beyond steps = {steps}; raise steps"

    def __init__(self, node_id: str | None = None, live: comfy_live.LiveView | None = None,
                 out_dir: Path | None = None, on_cpu: bool = False) -> None:
        self.node_id = node_id
        self.live = live
        self.out_dir = out_dir
        self.on_cpu = on_cpu  # a real model on the CPU: warn, with an estimate once the first step is timed
        self.cpu_estimate: str | None = None
        self._t0 = 0.0
        self.steps = 0
        self.previews: list[comfy_live.Update] = []
        self._warned = False
        self._host: host.HostHooks | None = None

    def started(self, start: int, steps: int) -> None:
        self.steps = steps
        self._host = host.HostHooks(steps, self.node_id)
        self._host.progress(start)
        where = f"resuming {self.out_dir} at step {start}" if start else f"run folder {self.out_dir}"
        LOG.info("diffinstruct: %s (%d steps)", where, steps)
        lines = [f"step {start} of {steps}", where]
        if self.on_cpu:
            lines.append("WARNING: training on the CPU (no GPU found): a step can take minutes; the time per step "
                         "follows after the first one")
            LOG.warning("diffinstruct: %s", lines[-1])
        host.send_status(self.node_id, lines, warning=self.on_cpu)
        self._t0 = time.perf_counter()

    def before_step(self, step: int) -> None:
        if self._host is not None:
            self._host.check_interrupt()

    def after_step(self, completed: int, record: dict[str, Any]) -> None:
        if self.on_cpu and self.cpu_estimate is None:
            per_step = time.perf_counter() - self._t0
            left = (self.steps - completed) * per_step
            when = f"{left / 60:.0f} min" if left >= 90 else f"{left:.0f} s"
            self.cpu_estimate = (f"WARNING: on the CPU one step took {per_step:.1f} s: the {self.steps - completed} "
                                 f"steps left take about {when}")
            LOG.warning("diffinstruct: %s", self.cpu_estimate)
            host.send_status(self.node_id, [f"step {completed} of {self.steps}", self.cpu_estimate], warning=True)
        update = None
        if self.live is not None:
            self.live.observe(record)
            if self.live.due(completed, self.steps):
                update = self.live.update(completed, record)
                self.previews.append(update)
        if self._host is not None:
            self._host.progress(completed, update.image if update is not None else None)
        if update is not None:
            extra = [self.cpu_estimate] if self.cpu_estimate else []
            host.send_status(self.node_id, [f"{update.lines[0]} of {self.steps}", *update.lines[1:], *extra],
                             update.warning or bool(extra))
            LOG.info("diffinstruct: %s", "; ".join(update.lines))
            if update.warning and not self._warned:
                self._warned = True
                LOG.warning("diffinstruct: %s", update.lines[-1])

    def checkpoint_on(self, exc: BaseException) -> bool:
        return True

    def interrupted(self, exc: BaseException, completed: int, in_step: bool, written: Path | None,
                    resume_from: str | None) -> None:
        saved = written if written is not None else (Path(resume_from) if resume_from else None)
        if saved is not None:
            lines = [f"stopped after {completed} steps: checkpoint {saved}",
                     "queue the same workflow again to resume from it"]
        else:
            lines = [f"stopped after {completed} steps: no checkpoint was written", f"run folder {self.out_dir}"]
        LOG.warning("diffinstruct: %s", "; ".join(lines))
        host.send_status(self.node_id, lines, warning=True)


def train(loss: LossSpec, generator_model: Any, opts: TrainOptions, vae: Any = None,
          prompts: Sequence[str] | None = None, clip: Any = None) -> TrainResult:
    """Train a one-step generator from `generator_model` with `loss`; see the module docstring.

    The run's copies of the networks live only in `_train`'s frame: after a failed or cancelled run the
    exception's traceback would keep them alive (ComfyUI holds on to it), so its frames are cleared.
    """
    try:
        return _train(loss, generator_model, opts, vae, prompts, clip)
    except RuntimeError as exc:
        traceback.clear_frames(exc.__traceback__)
        patches = host.model_patches(loss.reference.model) or host.model_patches(generator_model)
        if patches and "modified by an inplace operation" in str(exc):
            raise ConfigError(f"the MODEL carries patches from other nodes ({', '.join(patches)}) that change "
                              f"tensors in place, which training cannot differentiate (FreeU's patch does); train "
                              f"the unpatched MODEL and apply the patch to the aligned one") from exc
        raise
    except BaseException as exc:
        traceback.clear_frames(exc.__traceback__)
        raise
    finally:
        host.release_memory()


def _train(loss: LossSpec, generator_model: Any, opts: TrainOptions, vae: Any, prompts: Sequence[str] | None,
           clip: Any) -> TrainResult:
    ref = loss.reference
    process, label = host.model_family(ref.model)
    host.model_family(generator_model)
    downscale = host.vae_downscale(vae) if vae is not None else 8
    opts.check(downscale)
    device = host.model_device(ref.model)
    latent_hw = (opts.height // downscale, opts.width // downscale)
    latent_shape = (host.latent_channels(ref.model), *latent_hw)
    shared = loss.ta.mode == "lora"
    same = same_model(generator_model, ref.model)
    if shared and not same:
        raise ConfigError("TA mode 'lora' shares one frozen base between the reference, the TA and the generator, "
                          "so the generator MODEL must be the reference MODEL; use TA mode 'full' to start from "
                          "another generator")
    started = time.perf_counter()
    with torch.inference_mode(False), torch.enable_grad():
        labels, table = conditioning_table(ref.model, prompts, clip, ref.positive, ref.negative, latent_hw, downscale)
        # shared mode: the frozen base keeps the dtype the MODEL was loaded in (fp8 / bf16 weight_dtype)
        teacher = host.trainable_copy(ref.model, device=device, keep_weight_dtype=shared)
        frozen = low_precision(teacher) if shared else None
        gen_init = None if same else host.trainable_copy(generator_model, device=device)
        sigma_init = default_sigma_init(teacher)
        # LoRA init from the run's seed, without touching the host's RNG
        models = engine.assemble(teacher, latent_shape, mode="shared" if shared else "full", rank=loss.ta.rank,
                                 sigma_init=sigma_init, generator_init=gen_init, seed=opts.seed, device=device)
        if opts.gradient_checkpointing:  # after assemble: full mode's copies get their own wrappers
            for module in (*models.modules, models.reference):
                comfy_checkpointing.enable(module)
        ta_start = "reference" if shared else carry_over_ta(models.ta, generator_model)
        prompt_list = PromptList(labels, encode=lambda p: table[p], null=NULL)
        reward = build_reward(loss.reward, ref.model, vae, device)
        config = engine.trainer_config(loss, opts, sigma_init=sigma_init)
        # under torchrun (comfyui/cluster.py) the ranks train data-parallel; in ComfyUI this is one process
        trainer = engine.build_engine(models, prompt_list, config, reward, device=device, rank=distributed.rank(),
                                      world_size=distributed.world_size(), data_parallel=distributed.active())
        out = Path(opts.checkpoint_dir).expanduser()
        meta = {"base_model": label, "host": "comfyui" if host.is_comfy_model(ref.model) else "package",
                "ta_mode": loss.ta.mode, "rank": loss.ta.rank, "reward": loss.reward.spec_string() if loss.reward
                else "", "width": opts.width, "height": opts.height}
        start_net = gen_init if gen_init is not None else models.reference  # the reference's samples' source
        live = comfy_live.start(models.generator, OneStepGenerator(start_net, sigma_init),
                                image_decoder(vae, ref.model, device), labels, table, latent_shape, opts.seed, device,
                                opts.live)
        hooks = ComfyHooks(opts.node_id, live, out, on_cpu=device.type == "cpu" and host.is_comfy_model(ref.model))
        run = runner.run(trainer, runner.RunOptions(opts.steps, out, opts.checkpoint_every, resume=opts.resume,
                                                    metadata=meta, curves=False), hooks)
        result = _finish(trainer, loss, generator_model, models, teacher, labels, table, vae, opts, label)
        result.summary.update(start_step=run["start_step"], wall_seconds=time.perf_counter() - started,
                              checkpoint_dir=str(out), process=process, previews=len(hooks.previews),
                              ta_start=ta_start)
        if frozen is not None:
            result.summary["frozen_base_dtype"] = str(frozen).removeprefix("torch.")
        guidance = reference_guidance(ref.model, table)
        if guidance is not None:
            result.summary["reference_guidance"] = guidance
        result.lines, result.warning = result_lines(result.summary, hooks.previews)
        if frozen is not None:
            result.lines.insert(0, f"frozen base in {result.summary['frozen_base_dtype']} as loaded, LoRA in float32")
        if guidance is not None:
            result.lines.insert(0, f"reference: guidance-distilled, guidance {guidance:g} from the conditioning "
                                   f"(FluxGuidance), one pass")
        if hooks.cpu_estimate:
            result.lines.append(hooks.cpu_estimate.replace("WARNING: ", "note: "))
    return result


def image_decoder(vae: Any, model: Any, device: torch.device) -> Any:
    """Model-space latents -> images [B, 3, H, W] in [0, 1] (the channels' sigmoid when there is no VAE)."""
    if vae is None:
        return lambda x0: x0[:, :3].float().sigmoid()
    decoder = host.differentiable_decoder(vae, device)
    return lambda x0: decoder(host.to_raw_latent(model, x0.float()))


def result_lines(summary: dict[str, Any], previews: Sequence[comfy_live.Update]) -> tuple[list[str], bool]:
    """What Train / Align show on the canvas when done: reward before -> after, the last preview's diversity and
    distance (and its warning), the steps, the checkpoint folder."""
    lines = []
    first, last = summary.get("reward_first"), summary.get("reward_last")
    if first is not None and last is not None:
        lines.append(f"reward {first:.4g} -> {last:.4g} ({last - first:+.4g})")
    warning = bool(previews) and previews[-1].warning
    if previews:
        lines += [ln for ln in previews[-1].lines if ln.startswith(("diversity", "distance", "WARNING"))]
    start, steps = summary.get("start_step", 0), summary.get("steps")
    lines.append(f"steps {start} -> {steps}" + (f" (resumed at {start})" if start else ""))
    lines.append(f"checkpoint folder {summary.get('checkpoint_dir')}")
    lines.append(f"{summary.get('wall_seconds', 0.0):.1f} s")
    return lines, warning


def _finish(trainer: Any, loss: LossSpec, generator_model: Any, models: Any, teacher: Any, labels: list[str],
            table: dict[str, Any], vae: Any, opts: TrainOptions, label: str) -> TrainResult:
    cfg = trainer.cfg
    comfy = host.is_comfy_model(generator_model)
    metadata = {"diffinstruct.method": cfg.method, "diffinstruct.alpha": f"{cfg.alpha:g}",
                "diffinstruct.omega": f"{cfg.omega:g}", "diffinstruct.steps": str(opts.steps),
                "diffinstruct.base_model": label, "diffinstruct.sigma_init": f"{models.generator.sigma_init:g}",
                "diffinstruct.reward": loss.reward.spec_string() if loss.reward else "",
                "diffinstruct.ema": str(bool(opts.use_ema))}
    scope = runner.ema_weights(trainer) if opts.use_ema else contextlib.nullcontext()
    with scope, torch.no_grad():
        if loss.ta.mode == "lora":
            tensors = lora_for_host(teacher, "generator", comfy_prefix=comfy)
            weights = TrainedWeights("lora", tensors, metadata, comfy_format=comfy)
        else:
            net = models.generator.denoiser
            state = net.model.diffusion_model.state_dict() if comfy else net.state_dict()
            weights = TrainedWeights("full", {k: v.detach().cpu().clone() for k, v in state.items()}, metadata,
                                     comfy_format=comfy)
        preview = _preview(models.generator, labels, table, vae, generator_model, opts, models.latent_shape)
    aligned = aligned_model(generator_model, weights, models.generator.sigma_init)
    if loss.ta.mode != "lora":  # a later Train from this generator continues this TA (carry_over_ta)
        attach_ta(aligned, {k: v.detach().cpu().clone() for k, v in models.ta.state_dict().items()})
    records = mlog.read_jsonl(Path(opts.checkpoint_dir).expanduser() / runner.METRICS_FILE)
    last = records[-1] if records else {}
    summary = {"steps": opts.steps, "last": mlog.jsonable(last),
               "reward_first": _first_finite(records, "reward"), "reward_last": _first_finite(records[::-1], "reward")}
    return TrainResult(aligned, weights, curves_image(records), preview, summary)


def _first_finite(records: Sequence[dict[str, Any]], key: str) -> float | None:
    for r in records:
        v = r.get(key)
        if isinstance(v, int | float) and math.isfinite(v):
            return float(v)
    return None


def _latents(n: int, shape: Sequence[int], seed: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randn((n, *shape), generator=gen).to(device)


def _preview(generator: OneStepGenerator, labels: list[str], table: dict[str, Any], vae: Any, model: Any,
             opts: TrainOptions, latent_shape: Sequence[int]) -> torch.Tensor:
    n = min(opts.preview_count, max(len(labels), 1))
    chosen = [labels[i % len(labels)] for i in range(n)]
    device = host.model_device(model)
    cond = _cat([table[p] for p in chosen])
    z = _latents(n, latent_shape, opts.seed, device)
    x0 = generator(z, cond).float()
    if vae is None:
        return host.to_image(x0[:, :3].sigmoid())
    decoder = host.differentiable_decoder(vae, device)
    return host.to_image(decoder(host.to_raw_latent(model, x0)))


# ============================================================================================== aligned MODEL
TA_ATTACHMENT = "diffinstruct.ta"


def attach_ta(model: Any, state: dict[str, torch.Tensor]) -> None:
    """Keep a full-mode run's TA weights (on the CPU) with the MODEL it produced: ComfyUI's attachments travel
    with the MODEL's clones (LoRA loaders, patches); a package denoiser keeps them as an attribute."""
    if host.is_comfy_model(model):
        model.set_attachments(TA_ATTACHMENT, state)
    else:
        model.diffinstruct_ta = state


def carried_ta(model: Any) -> dict[str, torch.Tensor] | None:
    if host.is_comfy_model(model):
        return getattr(model, "attachments", {}).get(TA_ATTACHMENT)
    return getattr(model, "diffinstruct_ta", None)


def carry_over_ta(ta: Any, generator_model: Any) -> str:
    """Start a full-mode TA from the TA of the run that produced `generator_model`, when there is one.

    The TA models the generator's own distribution; a fresh TA (a copy of the reference) models the teacher's and
    spends the run's first steps catching up. This is what the demo's stage 3 does. Measured on the tiny_demo
    workflow (400 + 150 steps, TA lr 10x the generator's): carried over, stage 3 gains +2.76 learned reward and
    keeps 97.3 % of the teacher's diversity; from a fresh TA +2.57 and 99.4 %. At these settings it buys reward,
    not diversity (the TA's learning rate is what kept diversity, issue 17). Returns where the TA started, for the
    summary."""
    state = carried_ta(generator_model)
    if state is None:
        return "reference"
    own = ta.state_dict()
    if own.keys() != state.keys() or any(own[k].shape != state[k].shape for k in own):
        LOG.warning("diffinstruct: the generator's earlier TA does not fit this TA; starting from the reference")
        return "reference"
    with torch.no_grad():
        ta.load_state_dict(state)
    return "carried over from the generator's run"


def aligned_model(model: Any, weights: TrainedWeights, sigma_init: float) -> Any:
    """The input MODEL with the trained weights applied, as ComfyUI applies them (LoRA through its own LoRA
    loader, full weights as "set" patches), or a merged copy of a package denoiser."""
    if host.is_comfy_model(model):
        import comfy.sd

        if weights.kind == "lora":
            out = comfy.sd.load_lora_for_models(model, None, weights.tensors, 1.0, 0.0)[0]
        else:
            out = model.clone()
            patches = {f"diffusion_model.{k}": ("set", (v,)) for k, v in weights.tensors.items()}
            applied = out.add_patches(patches, 1.0, 1.0)
            if len(applied) != len(patches):
                raise RuntimeError(f"only {len(applied)} of {len(patches)} trained weights match the MODEL")
        out.model_options["diffinstruct"] = {"sigma_init": float(sigma_init), **weights.metadata}
        return out
    with torch.inference_mode(False):
        out = copy.deepcopy(model)
        if weights.kind == "lora":
            merge_lora(out, weights.tensors)
        else:
            out.load_state_dict(weights.tensors)
    out.diffinstruct_sigma_init = float(sigma_init)
    return out


# ============================================================================================== sampling / evaluation
def one_step_sample(model: Any, positive: Any, seed: int, batch_size: int, width: int, height: int,
                    downscale: int = 8) -> torch.Tensor:
    """Raw LATENT samples [B, C, h, w] of the one-step generator g(z, c) = D(sigma_init z, sigma_init, c);
    conditioning entries are used in turn. A MODEL not aligned by this pack uses the default sigma_init."""
    check_int("batch_size", batch_size, 1)
    for name, value in (("width", width), ("height", height)):
        if not is_int(value) or value < downscale or value % downscale:
            raise ConfigError(f"{name} must be a positive multiple of {downscale} pixels, got {value!r}")
    entries = host.conditioning_entries(positive, "positive conditioning")
    hw = (height // downscale, width // downscale)
    with torch.no_grad():
        denoiser = host.frozen_view(model)
        sigma_init = host.sigma_init_of(model) or default_sigma_init(denoiser)
        device = host.model_device(model)
        conds = [host.encode_conditioning(model, entries[i % len(entries)], hw, downscale) for i in range(batch_size)]
        conds = list(same_token_count(dict(enumerate(conds))).values())
        z = _latents(batch_size, (host.latent_channels(model), *hw), seed, device)
        x0 = OneStepGenerator(denoiser, sigma_init)(z, _cat(conds))
        return host.to_raw_latent(model, x0.float()).cpu()


@dataclass
class Evaluation:
    mean: float
    std: float
    per_prompt: dict[str, float]
    images: torch.Tensor

    def report(self) -> str:
        lines = [f"reward mean {self.mean:.6g}  std {self.std:.6g}  over {len(self.per_prompt)} prompt(s)"]
        lines += [f"  {v:.6g}  {p}" for p, v in self.per_prompt.items()]
        return "\n".join(lines)


def evaluate(model: Any, clip: Any, vae: Any, prompts: Sequence[str], reward: RewardSpec, seed: int = 0,
             samples_per_prompt: int = 1, width: int = 512, height: int = 512) -> Evaluation:
    """Reward statistics of one-step samples: `samples_per_prompt` per prompt, the same noise for every model."""
    check_int("samples_per_prompt", samples_per_prompt, 1)
    if vae is None:
        raise ConfigError("evaluation scores images: connect a VAE")
    prompts = host.parse_prompts(prompts)
    downscale = host.vae_downscale(vae)
    entries = host.encode_prompts(clip, prompts)
    device = host.model_device(model)
    scorer = load_spec(reward.spec_string(), models_dir=host.models_dir()).to(device).eval()
    decoder = host.differentiable_decoder(vae, device)
    scores: dict[str, list[float]] = {}
    images = []
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            latent = one_step_sample(model, [entries[prompt]], seed + i, samples_per_prompt, width, height, downscale)
            img = decoder(latent.to(device))
            scores[prompt] = [float(v) for v in scorer(img, [prompt] * samples_per_prompt).float().cpu()]
            images.append(host.to_image(img))
    flat = torch.tensor([v for vs in scores.values() for v in vs], dtype=torch.float64)
    std = float(flat.std(unbiased=True)) if flat.numel() > 1 else 0.0
    return Evaluation(float(flat.mean()), std, {p: sum(v) / len(v) for p, v in scores.items()}, torch.cat(images))
