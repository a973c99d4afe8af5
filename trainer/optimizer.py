"""Adafactor and AdamW with fp32 maths per parameter, bf16 stochastic rounding and a fused back pass.

Each optimizer steps one parameter at a time (`step_param`), so the same maths serves a plain
`optimizer.step()` and the fused back pass, where a hook steps each parameter inside backward and
frees its gradient at once (SDXL fine-tunes in about 10 GB). Optimizer state is kept in float32
whatever the weights' dtype; bf16 weights get the fp32 result rounded stochastically, so updates
far below bf16's resolution still move the weights in expectation.

    optimizer = build_optimizer({"unet": unet.parameters(), "text_encoder": te1.parameters()}, settings)
    fused = FusedBackPass(optimizer, settings.training.gradient_accumulation_steps)  # if fused_back_pass
    scheduler = build_lr_scheduler(optimizer, settings.schedule, total_steps)
    loss.backward(); optimizer.step(); scheduler.step()   # step() finds no gradients when fused
    set_trained_parts(optimizer, parts_to_train(settings.training, epoch, global_step))  # after every step
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from itertools import chain
from typing import Any

import torch
from diffusers.optimization import get_scheduler
from torch.optim.lr_scheduler import LambdaLR

from likeness.settings import ScheduleSettings, Settings, TrainingSettings

PARTS = ("unet", "text_encoder", "text_encoder_2")


def stochastic_round_(target: torch.Tensor, source: torch.Tensor, generator: torch.Generator) -> None:
    """Write fp32 `source` into bf16 `target`, rounding up or down with odds by distance (unbiased).

    bf16 is the top 16 bits of fp32: add uniform noise below those bits, then cut them off.
    """
    noise = torch.randint(0, 1 << 16, source.shape, dtype=torch.int32, device=source.device, generator=generator)
    bits = source.contiguous().view(torch.int32) + noise
    bits.bitwise_and_(-65536)  # 0xFFFF0000: keep sign, exponent and bf16's 7 mantissa bits
    target.copy_(bits.view(torch.float32))


class StepwiseOptimizer(torch.optim.Optimizer):
    """Base of our optimizers: `step_param(p)` updates one parameter; groups carry "part" and "train"."""

    def __init__(self, params: Any, defaults: dict[str, Any], stochastic_rounding: bool = True, seed: int = 0) -> None:
        super().__init__(params, defaults)
        self.stochastic_rounding, self.seed = stochastic_rounding, seed
        # Group indices, not group dicts: load_state_dict replaces the dicts.
        self._group_index = {p: gi for gi, group in enumerate(self.param_groups) for p in group["params"]}
        self._index_of = {p: i for i, p in enumerate(self._group_index)}
        self._generators: dict[torch.device, torch.Generator] = {}

    def group_of(self, p: torch.Tensor) -> dict[str, Any]:
        return self.param_groups[self._group_index[p]]

    def init_state(self, state: dict[str, Any], p: torch.Tensor, group: dict[str, Any]) -> None:
        raise NotImplementedError

    def update(self, weight: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        """Update fp32 `weight` in place from fp32 `grad`."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if group["train"] and p.grad is not None:
                    self.step_param(p)
        return loss

    @torch.no_grad()
    def step_param(self, p: torch.Tensor) -> None:
        group, state = self.group_of(p), self.state[p]
        if not state:
            state["step"] = 0
            self.init_state(state, p, group)
        state["step"] += 1
        weight = p if p.dtype == torch.float32 else p.float()
        self.update(weight, p.grad.float(), state, group)
        if weight is not p:
            self._write_back(p, weight, state["step"])

    def _write_back(self, p: torch.Tensor, weight: torch.Tensor, step: int) -> None:
        if not (self.stochastic_rounding and p.dtype == torch.bfloat16):
            p.copy_(weight)
            return
        if p.device not in self._generators:
            self._generators[p.device] = torch.Generator(device=p.device)
        generator = self._generators[p.device]
        # Seeded by (seed, parameter, its step): a resumed run rounds exactly as an uninterrupted one.
        generator.manual_seed(((self.seed * 1_000_003 + self._index_of[p]) * 1_000_033 + step) % (1 << 63))
        stochastic_round_(p, weight, generator)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, but keeps float state in float32 (torch casts it to the weights' dtype, e.g. bf16)."""
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        saved = {p: state_dict["state"][i] for i, p in zip(saved_ids, params) if i in state_dict["state"]}
        super().load_state_dict(state_dict)
        for p, state in saved.items():
            self.state[p] = {
                k: v.to(device=p.device, dtype=torch.float32) if torch.is_tensor(v) and v.is_floating_point() else v
                for k, v in state.items()
            }


class Adafactor(StepwiseOptimizer):
    """Adafactor (Shazeer & Stern 2018) with transformers' conventions, fp32 maths.

    Factored second moment for >= 2-D tensors, beta2_t = 1 - step^decay_rate, update divided by
    max(1, RMS(update)/clip_threshold), decoupled weight decay p -= weight_decay*lr*p, optional
    first moment (beta1), relative step / parameter scaling / warmup init as transformers.
    `factor_conv`: "kernel" factors a conv kernel (out, in, kh, kw) over its last two dims, as
    transformers does (state (out, in, kh) + (out, in, kw): 6x out x in for 3x3, twice the weight
    for 1x1); "matrix" factors it as the (out, in*kh*kw) matrix (state out + in*kh*kw).
    """

    def __init__(
        self, params: Any, lr: float = 1e-5, eps: float = 1e-30, eps2: float = 1e-3, clip_threshold: float = 1.0,
        decay_rate: float = -0.8, beta1: float | None = None, weight_decay: float = 0.0, scale_parameter: bool = False,
        relative_step: bool = False, warmup_init: bool = False, stochastic_rounding: bool = True, seed: int = 0,
        factor_conv: str = "kernel",
    ) -> None:
        if warmup_init and not relative_step:
            raise ValueError("optimizer.adafactor.warmup_init needs relative_step = true")
        if factor_conv not in ("kernel", "matrix"):
            raise ValueError(f"optimizer.adafactor.factor_conv: unknown value {factor_conv!r}; use 'kernel' or 'matrix'")
        defaults = dict(lr=lr, eps=eps, eps2=eps2, clip_threshold=clip_threshold, decay_rate=decay_rate, beta1=beta1,
                        weight_decay=weight_decay, scale_parameter=scale_parameter, relative_step=relative_step,
                        warmup_init=warmup_init, factor_conv=factor_conv, part="params", train=True)
        super().__init__(params, defaults, stochastic_rounding, seed)

    @staticmethod
    def factored_shape(shape: torch.Size, group: dict[str, Any]) -> torch.Size:
        """The shape the second moment is factored over: a conv kernel as (out, in*kh*kw) with "matrix"."""
        if len(shape) > 2 and group.get("factor_conv", "kernel") == "matrix":
            return torch.Size((shape[0], shape[1:].numel()))
        return shape

    def init_state(self, state: dict[str, Any], p: torch.Tensor, group: dict[str, Any]) -> None:
        f32 = dict(dtype=torch.float32, device=p.device)
        shape = self.factored_shape(p.shape, group)
        if p.ndim >= 2:
            state["exp_avg_sq_row"] = torch.zeros(shape[:-1], **f32)  # (..., rows)
            state["exp_avg_sq_col"] = torch.zeros(shape[:-2] + shape[-1:], **f32)  # (..., cols)
        else:
            state["exp_avg_sq"] = torch.zeros(p.shape, **f32)
        if group["beta1"] is not None:
            state["exp_avg"] = torch.zeros(p.shape, **f32)

    @staticmethod
    def _rms(x: torch.Tensor) -> torch.Tensor:
        return x.norm(2) / math.sqrt(x.numel())

    def _lr(self, weight: torch.Tensor, step: int, group: dict[str, Any]) -> float | torch.Tensor:
        lr = group["lr"]
        if group["relative_step"]:
            lr = min(1e-6 * step if group["warmup_init"] else 1e-2, 1.0 / math.sqrt(step))
        if group["scale_parameter"]:
            lr = self._rms(weight).clamp(min=group["eps2"]) * lr
        return lr

    def update(self, weight: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        lr = self._lr(weight, state["step"], group)
        beta2t = 1.0 - math.pow(state["step"], group["decay_rate"])
        shape = grad.shape
        if "exp_avg_sq_row" in state:
            grad = grad.reshape(self.factored_shape(shape, group))
        squared = grad**2 + group["eps"]
        if "exp_avg_sq_row" in state:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            row.mul_(beta2t).add_(squared.mean(dim=-1), alpha=1.0 - beta2t)
            col.mul_(beta2t).add_(squared.mean(dim=-2), alpha=1.0 - beta2t)
            # Rank-1 estimate of the second moment: row x col / mean(row).
            row_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt().unsqueeze(-1)
            update = (row_factor * col.unsqueeze(-2).rsqrt() * grad).view(shape)
        else:
            state["exp_avg_sq"].mul_(beta2t).add_(squared, alpha=1.0 - beta2t)
            update = state["exp_avg_sq"].rsqrt() * grad
        update.div_((self._rms(update) / group["clip_threshold"]).clamp(min=1.0)).mul_(lr)
        if group["beta1"] is not None:
            update = state["exp_avg"].mul_(group["beta1"]).add_(update, alpha=1.0 - group["beta1"])
        if group["weight_decay"]:
            weight.add_(weight, alpha=-group["weight_decay"] * float(lr))
        weight.sub_(update)


class AdamW(StepwiseOptimizer):
    """AdamW (Loshchilov & Hutter 2019) with torch's update rule and fp32 moments."""

    def __init__(
        self, params: Any, lr: float = 1e-5, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
        weight_decay: float = 0.01, stochastic_rounding: bool = True, seed: int = 0,
    ) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, part="params", train=True)
        super().__init__(params, defaults, stochastic_rounding, seed)

    def init_state(self, state: dict[str, Any], p: torch.Tensor, group: dict[str, Any]) -> None:
        state["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        state["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)

    def update(self, weight: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        (beta1, beta2), lr, step = group["betas"], group["lr"], state["step"]
        weight.mul_(1.0 - lr * group["weight_decay"])
        state["exp_avg"].lerp_(grad, 1.0 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        denominator = (state["exp_avg_sq"].sqrt() / math.sqrt(1.0 - beta2**step)).add_(group["eps"])
        weight.addcdiv_(state["exp_avg"], denominator, value=-lr / (1.0 - beta1**step))


def part_learning_rate(settings: Settings, part: str) -> float:
    return getattr(settings.training, part).learning_rate or settings.optimizer.learning_rate


def build_optimizer(params_by_part: Mapping[str, Iterable[torch.nn.Parameter]], settings: Settings) -> StepwiseOptimizer:
    """One parameter group per model part ("unet", "text_encoder", "text_encoder_2"), each with its LR."""
    unknown = set(params_by_part) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown model parts {sorted(unknown)}: expected some of {PARTS}")
    groups = []
    for part, params in params_by_part.items():
        params = [p for p in params if p.requires_grad]
        if not params:
            raise ValueError(f"training.{part}: no trainable parameters were given for this part")
        groups.append({"params": params, "part": part, "lr": part_learning_rate(settings, part)})
    opt = settings.optimizer
    common = dict(weight_decay=opt.weight_decay, stochastic_rounding=opt.stochastic_rounding, seed=settings.run.seed)
    if opt.name == "ADAMW":
        a = opt.adamw
        return AdamW(groups, lr=opt.learning_rate, betas=(a.beta1, a.beta2), eps=a.eps, **common)
    a = opt.adafactor
    return Adafactor(
        groups, lr=opt.learning_rate, eps=a.eps, eps2=a.eps2, clip_threshold=a.clip_threshold,
        decay_rate=a.decay_rate, beta1=a.beta1, scale_parameter=a.scale_parameter,
        relative_step=a.relative_step, warmup_init=a.warmup_init, factor_conv=a.factor_conv, **common,
    )


class FusedBackPass:
    """Steps each parameter inside backward, as soon as its gradient is complete, and frees the gradient.

    The loop still calls `optimizer.step()` (it finds no gradients) and `scheduler.step()`; the LR a
    group has when backward runs is the one used. Not combinable with gradient accumulation: the
    gradient would have to be kept across backward passes, which is what this avoids.

    With `check_finite`, each gradient is checked before its parameter steps: from the first
    non-finite one on, no parameter of this backward pass steps (`good` turns False; `stepped`
    says how many already had). That reads each check on the host, one device sync per parameter;
    `check_per_step=True` instead folds the checks into one flag on the device, read by `finish()`
    after backward (every parameter steps; a bad gradient leaves `good` False with `stepped` > 0, so
    the caller goes back to a saved state). Call `start()` before and `finish()` after each backward.
    """

    def __init__(self, optimizer: StepwiseOptimizer, gradient_accumulation_steps: int = 1,
                 check_finite: bool = False, check_per_step: bool = False) -> None:
        if gradient_accumulation_steps > 1:
            raise ValueError(
                "optimizer.fused_back_pass cannot be combined with training.gradient_accumulation_steps "
                f"= {gradient_accumulation_steps}: set one of them off (accumulation steps 1)"
            )
        self.optimizer = optimizer
        self.check_finite, self.check_per_step, self.good, self.stepped = check_finite, check_per_step, True, 0
        self._finite: torch.Tensor | None = None  # the per-step flag, on the device
        self._handles = [
            p.register_post_accumulate_grad_hook(self._hook)
            for group in optimizer.param_groups for p in group["params"]
        ]

    def start(self, finite: bool = True) -> None:
        """A new backward pass; `finite=False` (a non-finite loss) lets no parameter step in it."""
        self.good, self.stepped, self._finite = finite, 0, None

    def finish(self) -> None:
        """After backward: with `check_per_step`, read the step's one flag (its one host sync)."""
        if self._finite is not None and not bool(self._finite):
            self.good = False
        self._finite = None

    def _hook(self, p: torch.Tensor) -> None:
        if self.good and self.check_finite:
            finite = torch.isfinite(p.grad).all()
            if self.check_per_step:
                self._finite = finite if self._finite is None else self._finite & finite
            elif not bool(finite):
                self.good = False
        if self.good and self.optimizer.group_of(p)["train"]:
            self.optimizer.step_param(p)
            self.stepped += 1
        p.grad = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


_SCHEDULERS = {"CONSTANT": "constant", "LINEAR": "linear", "COSINE": "cosine", "COSINE_WITH_RESTARTS": "cosine_with_restarts"}


def build_lr_scheduler(optimizer: torch.optim.Optimizer, schedule: ScheduleSettings, total_steps: int) -> LambdaLR:
    """LR schedule of settings.schedule over `total_steps` optimizer steps; warmup_steps applies to all.

    Warmup ramps linearly from 0 at step 0 (diffusers' and OneTrainer's convention); CONSTANT with
    warmup is "constant with warmup". Each group keeps its own base LR.
    """
    name = _SCHEDULERS[schedule.scheduler]
    if name == "constant" and schedule.warmup_steps > 0:
        name = "constant_with_warmup"
    return get_scheduler(
        name, optimizer, num_warmup_steps=schedule.warmup_steps,
        num_training_steps=max(total_steps, 1), num_cycles=schedule.cycles,
    )


def parts_to_train(training: TrainingSettings, epoch: int, step: int, model_parts: Iterable[str] = PARTS) -> set[str]:
    """Parts of `model_parts` (SD 1.5: no text_encoder_2) that still train at `epoch` after `step`
    optimizer steps (stop_training_after N: count < N)."""
    parts = set()
    for part in model_parts:
        part_settings = getattr(training, part)
        count = {"EPOCH": epoch, "STEP": step}.get(part_settings.stop_training_after_unit)
        if part_settings.train and (count is None or count < part_settings.stop_training_after):
            parts.add(part)
    return parts


def set_trained_parts(optimizer: StepwiseOptimizer, parts: set[str]) -> None:
    """Stop (or resume) updating each group's part: requires_grad and the group's "train" flag."""
    for group in optimizer.param_groups:
        group["train"] = group["part"] in parts
        for p in group["params"]:
            p.requires_grad_(group["train"])
