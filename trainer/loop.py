"""The training loop: plain torch + diffusers, no Prefect. Reads the manifest and the latent cache,
fine-tunes the SDXL or SD 1.5 UNet (and text encoder 1), samples, saves checkpoints, backs up and resumes.

One `train(settings)` call runs (or finishes) a whole training run. It resumes by itself from the
newest complete backup whose fingerprint (training settings + data + base model) matches, so a
killed run started again continues where its last backup left off and ends with the weights an
uninterrupted run would have. Raising `training.epochs` after a finished run continues from its
last state (kept as a backup) instead of starting over: see `likeness.trainer.extend` for the rule,
also for schedules that depend on the total step count. Under `accelerate launch` (several processes, gloo or NCCL) each
process trains its slice of every batch; gradients are averaged before each optimizer step, and
process 0 alone writes samples, checkpoints, backups and reports.

    python -m likeness.trainer.loop PROFILE [training.epochs=2 ...]      # after `likeness prepare`
    accelerate launch --multi_gpu --num_processes 2 -m likeness.trainer.loop demo-cpu   # 2 CPU processes (gloo)

    result = train(settings, log=print, sinks=[TensorBoardSink(...)])
"""

from __future__ import annotations

import gc
import logging
import math
import random
import sys
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from likeness.content import HashIndex, file_digest, folder_digest, model_fingerprint
from likeness.latent_index import model_parts, settings_family
from likeness.models.checkpoint import CheckpointInfo, checkpoint_filename
from likeness.models.checkpoint_sd15 import save_any_checkpoint
from likeness.models.conditioning import EncoderOutput, encode_prompt, encode_prompt_sd15
from likeness.models.loading import load_pipeline
from likeness.models.sampling import generate, sample_filename, save_sample
from likeness.settings import Settings, TrainingSettings
from likeness.trainer.backup import Backup, restore_rng, save_backup
from likeness.trainer.distributed import (
    Processes, average_gradients, digests_agree, mean_over_processes, start_processes,
)
from likeness.trainer.ema import EMA
from likeness.trainer.evaluation import InTrainingEvaluator, grid_mismatch, scalars as evaluation_scalars
from likeness.trainer.extend import describe_continuation, resumable_backup
from likeness.trainer.fingerprint import (  # noqa: F401  (train_key, training_relevant: re-exported)
    TRAIN_VERSION, run_length, settings_hash, train_key, training_fingerprint, training_relevant,
)
from likeness.trainer.intervals import Interval
from likeness.trainer.nonfinite import NonFiniteGuard, RollBack, all_finite, likely_causes
from likeness.trainer.loss import diffusion_losses
from likeness.trainer.metrics import LossLog, MetricsSink, ProgressLine, memory_stats
from likeness.trainer.noise import add_noise, step_generator, training_scheduler
from likeness.trainer.offload import HOST, move, offloaded_parts, on_device
from likeness.trainer.optimizer import (
    FusedBackPass, build_lr_scheduler, build_optimizer, parts_to_train, set_trained_parts,
)
from likeness.trainer.result import SavedCheckpoint, TrainResult
from likeness.trainer.train_data import Batch, TrainData
from likeness.workspace import Workspace

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LOSS_TABLE, LOSS_CURVE = "loss.csv", "loss.png"
Log = Callable[[str], None]


# --- models ----------------------------------------------------------------------------------


def weight_dtypes(settings: Settings) -> dict[str, torch.dtype]:
    """Each model part's weight dtype (training.<part>.weight_dtype), as the loaders take it."""
    parts = ["unet", "vae", *model_parts(settings)]
    return {part: DTYPES[getattr(settings.training, part).weight_dtype] for part in parts}


def load_models(settings: Settings, device: torch.device) -> tuple[Any, list[str]]:
    """The pipeline, each part created in its weight dtype (never an fp32 copy first) and moved to
    `device` (the parts `offloaded_parts` names stay on the CPU), and the parts that train."""
    pipe = load_pipeline(settings.model.base_model, settings.model.model_type, config=settings.model.config,
                         dtype=weight_dtypes(settings))
    return pipe, place_models(pipe, settings, device)


def place_models(pipe: Any, settings: Settings, device: torch.device) -> list[str]:
    """Move the parts to their devices, mark what trains, turn on gradient checkpointing; the trained parts."""
    training = settings.training
    parts = ["unet", *model_parts(settings)]  # SD 1.5 has no text_encoder_2
    trained = [part for part in parts if getattr(training, part).train]
    offloaded = offloaded_parts(settings)
    for part in ["vae", *parts]:
        module = getattr(pipe, part)
        move(module, HOST if part in offloaded else device)
        module.requires_grad_(part in trained).train(part in trained)
    if training.method == "lora":  # the parts freeze; only their new adapters train
        from likeness.models.lora_train import add_lora_adapters

        add_lora_adapters(pipe, trained, training.lora, settings.run.seed)
    if training.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
        for part in ("text_encoder", "text_encoder_2"):
            if part in trained:
                encoder = getattr(pipe, part)  # transformers 5 renamed it; older versions have the old name
                getattr(encoder, "activation_checkpointing_enable", encoder.gradient_checkpointing_enable)()
    else:
        pipe.unet.disable_gradient_checkpointing()  # models placed again with other settings (benchmarks)
    return trained


def compile_unet(unet: torch.nn.Module, training: TrainingSettings) -> None:
    """training.compile: compile the UNet's forward in place (its state dict keys stay as they are)."""
    if training.compile:
        unet.compile(backend=training.compile_backend)


# --- the run ---------------------------------------------------------------------------------


class Trainer:
    """Everything one run holds; `train()` below drives it epoch by epoch."""

    def __init__(self, settings: Settings, procs: Processes, log: Log, sinks: Sequence[MetricsSink]) -> None:
        self.settings, self.procs, self.sinks = settings, procs, list(sinks)
        self.log = log if procs.main else (lambda message: None)
        self.ws = Workspace.from_settings(settings)
        self.data = TrainData(self.ws, settings, procs.world_size, procs.rank)
        pipe, trained = load_models(settings, procs.device)
        total_steps = self.data.total_steps(settings.training.epochs, settings.training.gradient_accumulation_steps)
        self._init_step(pipe, trained, total_steps)
        self.fingerprint = training_fingerprint(settings, self.ws) if procs.main else ""
        self.saved: list[SavedCheckpoint] = []
        self.shared: set[Path | str] = set()  # checkpoints ("base": the base model) given evaluation images
        self.samples: list[Path] = []
        during = settings.evaluation.during_training.enabled
        self.evaluator = InTrainingEvaluator(settings, self.ws, procs.device) if during and procs.main else None
        s = settings
        self.sample_timer = Interval(s.sampling.every, s.sampling.unit)
        self.save_timer = Interval(s.saving.every, s.saving.unit, s.saving.skip_first)
        self.backup_timer = Interval(s.backups.every, s.backups.unit)
        self.guard = NonFiniteGuard(s.training.max_nonfinite_steps, self._likely_causes, self.log)

    @classmethod
    def step_only(cls, settings: Settings, procs: Processes, pipe: Any, trained: list[str], total_steps: int,
                  log: Log = print) -> Trainer:
        """The training step alone (`forward_backward` + `optimizer_step`) on models already loaded by
        `load_models` or built otherwise, without a workspace or data: what bench/gpu_step.py times."""
        t = cls.__new__(cls)
        t.settings, t.procs, t.sinks, t.log, t.data = settings, procs, [], log, None
        t._init_step(pipe, trained, total_steps)
        t.guard = NonFiniteGuard(settings.training.max_nonfinite_steps, t._likely_causes, log)
        return t

    def _init_step(self, pipe: Any, trained: list[str], total_steps: int) -> None:
        """The models, optimizer, LR schedule, EMA and noise schedule the step uses."""
        settings = self.settings
        self.sd15 = settings_family(settings) == "sd15"
        self.parts = ("unet", *model_parts(settings))
        self.pipe, self.trained, self.total_steps = pipe, trained, total_steps
        self.params = {part: [p for p in getattr(self.pipe, part).parameters() if p.requires_grad] for part in self.trained}
        self.all_params = [p for part in self.trained for p in self.params[part]]
        self.optimizer = build_optimizer(self.params, settings)
        self.accumulation = settings.training.gradient_accumulation_steps
        self.fused = self._fused_back_pass()
        self.lr_scheduler = build_lr_scheduler(self.optimizer, settings.schedule, self.total_steps)
        ema = settings.training.ema
        self.ema = EMA(self.all_params, ema.decay, ema.update_step_interval, ema.on_cpu) if ema.enabled else None
        self.noise_scheduler = training_scheduler(self.pipe.scheduler.config)
        self.scaling = self.pipe.vae.config.scaling_factor
        self.step, self.losses, self.pending = 0, LossLog(), []
        compile_unet(self.pipe.unet, settings.training)

    def _fused_back_pass(self) -> FusedBackPass | None:
        if not self.settings.optimizer.fused_back_pass:
            return None
        if self.procs.world_size > 1:
            # Each hook would step its parameter before the gradients of the other processes arrive.
            self.log("warning: optimizer.fused_back_pass is off with several processes: gradients are "
                     "averaged across processes before a normal optimizer step (more memory)")
            return None
        return FusedBackPass(self.optimizer, self.accumulation, check_finite=True,
                             check_per_step=self.settings.training.nonfinite_check == "step")

    def _likely_causes(self) -> str:
        t = self.settings.training
        lrs = {group["part"]: float(group["lr"]) for group in self.optimizer.param_groups}
        return likely_causes(lrs, t.train_dtype, {part: getattr(t, part).weight_dtype for part in self.trained})

    @property
    def epoch(self) -> int:
        return self.data.sampler.position.epoch if self.data is not None else 0

    # --- resume and backups ------------------------------------------------------------------

    def resume(self) -> Path | None:
        """Load the newest complete backup with this run's fingerprint that continues into this run's
        length (process 0 finds it, all load it); see trainer/extend.py."""
        found: list[Any] = [resumable_backup(self.ws.backups, self.fingerprint, self.settings) if self.procs.main
                            else None]
        if self.procs.world_size > 1:
            dist.broadcast_object_list(found, src=0)
        backup: Backup | None = found[0]
        if backup is None:
            return None
        for part in self.trained:
            self._load_trained_weights(part, backup.weights(part), backup.path)
        objects = backup.objects()
        self.optimizer.load_state_dict(objects["optimizer"])
        self.lr_scheduler.load_state_dict(objects["lr_scheduler"])
        if backup.progress.get("total_steps", self.total_steps) != self.total_steps:
            self._stretch_schedule()
        self.data.sampler.load_state_dict(objects["sampler"])
        if self.ema is not None:
            self.ema.load_state_dict(objects["ema"])
        self.step, self.losses = backup.step, LossLog(objects["losses"])
        if self.evaluator is not None:  # the evaluation history goes on where the backup left it
            self.evaluator.history = list(objects.get("evaluations") or [])
        saved = [SavedCheckpoint(self.ws.absolute(path), sha, int(epoch), int(step))
                 for path, sha, epoch, step in objects.get("saved", [])]
        self.saved = [c for c in saved if c.path.exists()]  # a finished run's checkpoints stay listed
        restore_rng(objects["rng"])
        for line in describe_continuation(backup.progress, self.settings, self.total_steps):
            self.log(line)
        self.log(f"resumed from {backup.path} (step {self.step}, epoch {self.epoch})")
        return backup.path

    def _stretch_schedule(self) -> None:
        """Another total step count: each group's LR is the new schedule's at the current step
        (the scheduler's lambdas are this run's; only its step count came from the backup)."""
        scheduler = self.lr_scheduler
        for group, base, factor in zip(self.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
            group["lr"] = base * factor(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def backup(self) -> None:
        if self.procs.main:
            weights = {part: self._trained_weights(part) for part in self.trained}
            objects = {"optimizer": self.optimizer.state_dict(), "lr_scheduler": self.lr_scheduler.state_dict(),
                       "sampler": self.data.sampler.state_dict(), "losses": self.losses.rows,
                       "ema": self.ema.state_dict() if self.ema is not None else None,
                       "evaluations": self.evaluator.history if self.evaluator is not None else [],
                       "saved": [[self.ws.relative(c.path), c.sha256, c.epoch, c.step] for c in self.saved]}
            progress = {"epoch": self.epoch, "step": self.step, "batch": self.data.sampler.position.batch,
                        "length": run_length(self.settings), "total_steps": self.total_steps}
            path = save_backup(self.ws.backups, step=self.step, fingerprint=self.fingerprint, weights=weights,
                               objects=objects, progress=progress,
                               keep=self.settings.backups.rolling_count)
            self.log(f"backup {path}")
        self.procs.barrier()

    def _trained_weights(self, part: str) -> dict[str, torch.Tensor]:
        """What a backup keeps of a part: all its weights, or with LoRA only the adapters."""
        module = getattr(self.pipe, part)
        if self.settings.training.method != "lora":
            return module.state_dict()
        from likeness.models.lora_train import adapter_weights

        return adapter_weights(module)

    def _load_trained_weights(self, part: str, weights: dict[str, torch.Tensor], where: Path) -> None:
        module = getattr(self.pipe, part)
        if self.settings.training.method != "lora":
            module.load_state_dict(weights)
            return
        from likeness.models.lora_train import load_adapter_weights

        load_adapter_weights(module, weights, f"{where}/{part}")

    # --- one optimizer step ------------------------------------------------------------------

    def forward_backward(self, batch: Batch, micro_step: int) -> float:
        """Loss of one batch, backpropagated (scaled for accumulation); returns the unscaled mean."""
        s, device = self.settings.training, self.procs.device
        generator = step_generator(micro_step, self.procs.world_size, self.procs.rank, device)
        latents = batch.latents.to(device) * self.scaling  # (B, 4, H/8, W/8)
        noisy = add_noise(latents, self.noise_scheduler, s.noise, generator)
        with self.autocast():
            embeds, pooled = self._encode(batch, generator)
            unet_dtype = self.pipe.unet.dtype
            added = None if pooled is None else {  # SD 1.5: no pooled embeddings, no time ids
                "text_embeds": pooled.to(unet_dtype), "time_ids": batch.time_ids.to(device, unet_dtype)}
            predicted = self.pipe.unet(noisy.noisy_latents.to(unet_dtype), noisy.timesteps, embeds.to(unet_dtype),
                                       added_cond_kwargs=added).sample  # (B, 4, H/8, W/8)
        losses = diffusion_losses(
            predicted, noisy.target, noisy.timesteps, self.noise_scheduler.alphas_cumprod, s.loss, s.masked_training,
            mask=batch.masks.to(device), loss_weight=batch.loss_weight.to(device),
            v_prediction=noisy.prediction_type == "v_prediction", generator=generator)  # (B,)
        loss = losses.mean()
        value = loss.item()
        if self.fused is not None:  # it steps inside backward: a non-finite loss must stop it before
            self.fused.start(finite=math.isfinite(value))
        if loss.requires_grad and (self.fused is None or self.fused.good):  # False once every part stopped
            (loss / self.accumulation).backward()
            if self.fused is not None:
                self.fused.finish()
        return value

    def autocast(self):
        dtype = DTYPES[self.settings.training.train_dtype]
        return torch.autocast(self.procs.device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()

    def _encode(self, batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prompt embeddings (B, 77, W) and pooled (B, P); SD 1.5 has no pooled (None)."""
        t, device, pipe = self.settings.training, self.procs.device, self.pipe
        cached = {part: EncoderOutput(out.hidden.to(device), None if out.pooled is None else out.pooled.to(device))
                  for part, out in batch.cached.items()}
        pooled = None
        if self.sd15:
            embeds = encode_prompt_sd15(pipe.text_encoder, pipe.tokenizer, batch.captions, t.text_encoder.clip_skip,
                                        cached=cached.get("text_encoder"))  # (B, 77, W)
        else:
            embeds, pooled = encode_prompt(
                pipe.text_encoder, pipe.text_encoder_2, pipe.tokenizer, pipe.tokenizer_2, batch.captions,
                t.text_encoder.clip_skip, t.text_encoder_2.clip_skip,
                cached_1=cached.get("text_encoder"), cached_2=cached.get("text_encoder_2"))  # (B, 77, W), (B, P)
        if t.caption_dropout_probability > 0:  # dropped captions train the unconditional case: zero embeddings
            keep = torch.rand(len(batch.captions), generator=generator, device=generator.device)
            keep = (keep >= t.caption_dropout_probability).to(device, embeds.dtype)  # (B,)
            embeds = embeds * keep[:, None, None]
            pooled = None if pooled is None else pooled * keep.to(pooled.dtype)[:, None]
        return embeds, pooled

    def optimizer_step(self, loss: float = 0.0) -> dict[str, float]:
        """Average gradients across processes, step (unless fused), advance the LR, update EMA and parts.

        A non-finite loss (`loss`: the mean over processes) or gradient skips the update: see
        trainer/nonfinite.py.
        """
        lrs = {f"lr_{group['part']}": float(group["lr"]) for group in self.optimizer.param_groups}
        if self.fused is None and self.procs.world_size > 1:
            average_gradients([p for p in self.all_params if p.requires_grad], self.procs.world_size)
        finite = self._step_is_finite(loss)
        if finite:
            self.optimizer.step()  # with the fused back pass every gradient is already applied and freed
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_scheduler.step()
        if self.ema is not None and finite:
            self.ema.step(self.all_params, self.step)
        self.step += 1
        set_trained_parts(self.optimizer, parts_to_train(self.settings.training, self.epoch, self.step, self.parts))
        return lrs

    def _step_is_finite(self, loss: float) -> bool:
        """Whether this step's loss and gradients are finite; logs (and counts) a bad one, raises
        RollBack when the fused back pass already stepped some parameters with it."""
        if self.fused is not None:
            if self.fused.good and math.isfinite(loss):
                return True
            what = "loss" if not math.isfinite(loss) else "gradient"
            if self.fused.stepped:
                self.guard.record(self.step, what, "some parameters had stepped (fused back pass): "
                                  "going back to the last backup")
                raise RollBack(self.step)
            self.guard.record(self.step, what, f"update skipped, the weights stay those of step {self.step}")
            return False
        finite_loss = math.isfinite(loss)
        if finite_loss and all_finite(p.grad for p in self.all_params if p.requires_grad):
            return True
        self.guard.record(self.step, "gradient" if finite_loss else "loss",
                          f"update skipped, the weights stay those of step {self.step}")
        return False

    # --- samples and checkpoints -------------------------------------------------------------

    def averaged(self):
        """Sampling and saving use the EMA weights when EMA is on (as OneTrainer)."""
        return self.ema.applied_to(self.all_params) if self.ema is not None else nullcontext()

    def sample(self, epoch: int) -> None:
        if self.procs.main:
            s = self.settings.sampling
            seeds = [random.SystemRandom().randrange(2**31) if p.random_seed else p.seed for p in s.prompts]
            with self.averaged(), self.autocast(), on_device(self.pipe, offloaded_parts(self.settings), self.procs.device):
                images = generate(self.pipe, [p.prompt for p in s.prompts], [p.negative_prompt for p in s.prompts],
                                  seeds, steps=s.steps, cfg=s.cfg_scale, sampler=s.sampler,
                                  resolution=s.resolution or self.settings.resize.resolution,
                                  clip_skip_1=self.settings.training.text_encoder.clip_skip,
                                  clip_skip_2=self.settings.training.text_encoder_2.clip_skip)
            for index, image in enumerate(images):
                path = save_sample(image, self.ws.samples / sample_filename(self.step, epoch, index, s.image_format))
                self.samples.append(path)
                for sink in self.sinks:
                    sink.image(self.step, f"sample/{index:02d}", image)
            self.log(f"samples at step {self.step}, epoch {epoch}: {len(images)} image(s) in {self.ws.samples}")
        self.procs.barrier()

    def save(self, epoch: int, at_epoch_end: bool) -> None:
        if self.settings.backups.before_save:
            self.backup()
        if self.procs.main:
            s = self.settings.saving
            name = checkpoint_filename(s.prefix, epoch, s.format)
            if not at_epoch_end:  # a STEP / MINUTE save: <prefix>-<epoch>-step<step>, names stay apart
                name = f"{s.prefix}-{epoch}-step{self.step}" + (".safetensors" if s.format == "safetensors" else "")
            info = CheckpointInfo(str(self.settings.model.base_model), epoch, self.step, settings_hash(self.settings))
            with self.averaged():
                path = self._save_weights(self.ws.checkpoints / name, info)
            digest = file_digest(path) if path.is_file() else folder_digest(path, HashIndex())
            self.saved.append(SavedCheckpoint(path, digest, epoch, self.step))
            self.log(f"saved {path}")
            self.share_evaluation()
        self.procs.barrier()

    def evaluate(self, epoch: int, saved: bool) -> str | None:
        """The in-training evaluation when due (process 0), logged to the loss table and the sinks;
        returns why early stop ends the run now (None: go on), the same on every process."""
        reason = None
        if self.evaluator is not None and self.evaluator.due(epoch, saved):
            with self.averaged(), self.autocast(), on_device(self.pipe, offloaded_parts(self.settings), self.procs.device):
                row = self.evaluator.evaluate(self.pipe, self.step, epoch)
            values = evaluation_scalars(row)
            if epoch > 0 and self.losses.rows:
                self.losses.rows[-1].update({name.replace("/", "_"): value for name, value in values.items()})
            for sink in self.sinks:
                sink.scalars(self.step, values)
            self.log(f"evaluation at epoch {epoch}: " + ", ".join(f"{k[5:]} {v:.4f}" for k, v in values.items()))
            self.share_evaluation()
            reason = self.evaluator.stop_reason()
        if self.procs.world_size > 1:
            shared = [reason]
            dist.broadcast_object_list(shared, src=0)
            reason = shared[0]
        return reason

    def share_evaluation(self) -> None:
        """Hand the last in-training evaluation's images to the evaluate stage for the weights that made
        them: each checkpoint saved at that step (after it, or before it at the last epoch) or, at
        step 0, the base model; where the grid would compute them alike (`grid_mismatch`)."""
        if self.evaluator is None or self.evaluator.last is None:
            return
        step = self.evaluator.last[0]
        holders = [c for c in self.saved if c.step == step and c.path not in self.shared]
        base = step == 0 and "base" not in self.shared
        if not holders and not base:
            return
        why = grid_mismatch(self.settings, self.procs.device, checkpoint=bool(holders))
        if why is not None:
            self.log(f"the evaluate stage will generate the evaluation images of step {step} again: {why}")
            self.shared.update([*(c.path for c in holders), "base"])
            return
        index = self.ws.hashes()  # the grid's: it finds these digests without reading the files
        for c in holders:
            if c.path.is_file():
                index.remember(c.path, c.sha256)
            shared = self.evaluator.share(model_fingerprint(str(c.path), index), step)
            self.shared.add(c.path)
            self.log(f"{shared} evaluation image(s) of step {step} recorded for {c.path.name}: the evaluate stage reuses them")
        if base:
            shared = self.evaluator.share(model_fingerprint(str(self.settings.model.base_model), index), step)
            self.shared.add("base")
            self.log(f"{shared} evaluation image(s) of the base model recorded: the evaluate stage reuses them")
        index.save()

    def _save_weights(self, path: Path, info: CheckpointInfo) -> Path:
        """A single-file checkpoint (or diffusers folder); with LoRA, one LoRA file of the adapters."""
        t = self.settings.training
        if t.method != "lora":
            return save_any_checkpoint(self.pipe, path, info, t.output_dtype, self.settings.saving.format)
        from likeness.models.lora_train import save_lora_checkpoint

        return save_lora_checkpoint(self.pipe, self.trained, path, info, t.lora.rank, t.lora.alpha, t.output_dtype)

    def reports(self) -> tuple[Path, Path]:
        table, curve = self.ws.report(LOSS_TABLE), self.ws.report(LOSS_CURVE)
        if self.procs.main:
            self.losses.write_csv(table)
            if self.losses.rows:
                self.losses.plot(curve, title=f"{self.settings.run.name}: training loss")
        return table, curve


# --- the loop --------------------------------------------------------------------------------


def train_epoch(t: Trainer, progress: ProgressLine) -> bool:
    """The rest of the current epoch: batches, accumulation, optimizer steps and the step timers.

    Returns whether a step timer asked for a backup after the epoch's last step: it is taken after
    the end-of-epoch samples and saves, so a resumed run never skips them.
    """
    epoch, micro, total, backup_due = t.epoch, 0, 0.0, False
    for samples in t.data.sampler:
        total = total + t.forward_backward(t.data.load(samples, epoch), t.step * t.accumulation + micro)
        micro += 1
        if micro < t.accumulation:
            continue
        loss = mean_over_processes(total / t.accumulation, t.procs)
        lrs = t.optimizer_step(loss)
        t.pending.append(({"step": t.step, "epoch": epoch}, loss, {**lrs, **memory_stats(t.procs.device)}))
        micro, total = 0, 0.0
        sample, save = t.sample_timer.after_step(t.step), t.save_timer.after_step(t.step)
        backup_due = t.backup_timer.after_step(t.step)
        if sample or save or backup_due or len(t.pending) >= t.settings.training.read_loss_every:
            read_losses(t, progress)
        if sample:
            t.sample(t.epoch)
        if save:
            t.save(t.epoch, at_epoch_end=False)
        if backup_due and t.epoch == epoch:
            t.backup()
            backup_due = False
    read_losses(t, progress)
    return backup_due


def read_losses(t: Trainer, progress: ProgressLine) -> None:
    """Record the losses of the steps since the last read: the loss table's rows, the sinks and the
    progress line, every training.read_loss_every steps (the non-finite guard reads each step's
    loss already, before backward: the fused back pass must not apply a NaN)."""
    if not t.pending:
        return
    for where, loss, rest in t.pending:
        t.losses.add(**where, loss=loss, **rest)
        for sink in t.sinks:
            sink.scalars(where["step"], {"loss": loss, **{k: v for k, v in rest.items() if k.startswith("lr_")}})
    t.pending = []
    progress.update(t.step, t.epoch, t.losses.rows[-1]["loss"])


def train(settings: Settings, *, log: Log = print, sinks: Sequence[MetricsSink] = ()) -> TrainResult:
    """Train (or finish training) the run `settings` describes; see the module docstring."""
    procs = start_processes(settings.run.device)
    t = Trainer(settings, procs, log, sinks)
    resumed = t.resume()
    set_trained_parts(t.optimizer, parts_to_train(settings.training, t.epoch, t.step, t.parts))
    epochs = settings.training.epochs
    t.log(f"training {', '.join(t.trained)} for {epochs} epochs, {t.total_steps} steps on {procs.device}"
          f" ({procs.world_size} process(es)); {len(t.data.rows)} images")
    if resumed is None and settings.sampling.at_start and settings.sampling.unit != "NEVER":
        t.sample(0)
    during = settings.evaluation.during_training
    if during.enabled and during.at_start and t.epoch == 0:  # the base model's scores: the reference
        t.evaluate(0, saved=True)
    progress = ProgressLine(t.log, t.total_steps, epochs, procs.device, first_step=t.step)
    stopped = None
    while t.epoch < epochs:
        try:
            backup_due = train_epoch(t, progress)
        except RollBack:
            rolled_back = True  # rebuilt outside the handler: its traceback still holds the old trainer
        else:
            rolled_back = False
        if rolled_back:
            carried = t.guard.events, t.saved, t.samples  # not the guard: it holds the old trainer
            if t.fused is not None:
                t.fused.remove()
            del t  # the only reference: its models are freed before the rebuilt trainer loads them again
            t = rebuilt_from_last_backup(settings, procs, carried, log, sinks)
            continue
        done = t.epoch  # epochs complete
        progress.update(t.step, done, t.losses.rows[-1]["loss"] if t.losses.rows else float("nan"), force=True)
        if t.sample_timer.after_epoch(done):
            t.sample(done)
        saved = done < epochs and t.save_timer.after_epoch(done)
        if saved:
            t.save(done, at_epoch_end=True)
        if during.enabled and (stopped := t.evaluate(done, saved or done == epochs)):
            t.log(f"early stop after epoch {done} of {epochs}: {stopped}")
            break
        if done < epochs and (t.backup_timer.after_epoch(done) or backup_due):
            t.backup()
    final = save_final(t, t.epoch if stopped else epochs)
    if procs.world_size > 1:  # the same model everywhere, or a loud error
        t.log(f"weights identical on all {procs.world_size} processes (sha256 {digests_agree(t.all_params, procs)[:16]})")
    if settings.backups.keep_final and not (resumed is not None and t.step == _backup_step(resumed)):
        t.backup()  # the last state: raising training.epochs later continues from here (trainer/extend.py)
    table, curve = t.reports()
    for sink in t.sinks:
        sink.close()
    history = t.evaluator.history if t.evaluator is not None else []
    return TrainResult(t.saved, final, t.step, t.epoch if stopped else epochs, table, curve, resumed, t.samples,
                       history, stopped)


def rebuilt_from_last_backup(settings: Settings, procs: Processes, carried: tuple[list, list, list],
                             log: Log, sinks: Sequence[MetricsSink]) -> Trainer:
    """A fresh trainer at the last backup (or the start): what a killed and restarted run would do.

    Only the fused back pass rolls back (one process). `carried`: the old trainer's non-finite
    steps so far, saved checkpoints and samples.
    """
    gc.collect()
    if procs.device.type == "cuda":
        torch.cuda.empty_cache()
    events, saved, samples = carried
    fresh = Trainer(settings, procs, log, sinks)
    fresh.guard.events = events
    if fresh.resume() is None:
        fresh.log("no backup yet: training again from the start")
    fresh.saved = [c for c in saved if c.step <= fresh.step]
    fresh.samples = samples
    set_trained_parts(fresh.optimizer, parts_to_train(settings.training, fresh.epoch, fresh.step, fresh.parts))
    return fresh


def _backup_step(path: Path) -> int:
    return int(path.name.removeprefix("backup-"))


def save_final(t: Trainer, epoch: int | None = None) -> Path:
    """The checkpoint of the last epoch, or of `epoch` after an early stop (always written, also when
    a timer saved it just before)."""
    s, epoch = t.settings.saving, t.settings.training.epochs if epoch is None else epoch
    path = t.ws.checkpoints / checkpoint_filename(s.prefix, epoch, s.format)
    if not any(c.path == path for c in t.saved):
        t.save(epoch, at_epoch_end=True)
    return path


def main(argv: list[str] | None = None) -> None:
    """`python -m likeness.trainer.loop PROFILE [key=value ...]` (the overrides as `--set` takes them)."""
    from likeness.profiles import load_profile

    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO)
    result = train(load_profile(argv[0] if argv else "demo-cpu", argv[1:]))
    from accelerate import PartialState

    if PartialState().is_main_process:  # under `accelerate launch`, one summary
        print(result.summary())


if __name__ == "__main__":
    main()
