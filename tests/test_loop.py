"""The training loop on the tiny SDXL model (CPU, fp32): it learns, keeps its schedule, freezes
parts on time and never trains on validation or held-out images."""

import re

import pytest
import torch
from safetensors.torch import load_file

from likeness.holdout import heldout_ids
from likeness.models.checkpoint import load_checkpoint_metadata
from likeness.models.loading import load_sdxl_pipeline
from likeness.trainer import loop
from likeness.trainer.intervals import Interval
from likeness.trainer.train_data import TrainData, TrainDataError
from likeness.workspace import Workspace

pytestmark = pytest.mark.usefixtures("one_torch_thread")
QUIET = {"sampling": {"unit": "NEVER", "at_start": False}, "backups": {"unit": "NEVER"}}


class Recorder:
    """A metrics sink that keeps what the loop reports."""

    def __init__(self, on_step=None):
        self.scalars_seen, self.images, self.closed, self.on_step = [], [], False, on_step

    def scalars(self, step, values):
        self.scalars_seen.append((step, dict(values)))
        if self.on_step:
            self.on_step(step)

    def image(self, step, tag, image):
        self.images.append((step, tag, image.size))

    def close(self):
        self.closed = True


def test_intervals_fire_on_steps_epochs_and_minutes():
    steps = Interval(3, "STEP", skip_first=3)
    assert [s for s in range(1, 13) if steps.after_step(s)] == [6, 9, 12]
    epochs = Interval(2, "EPOCH")
    assert [e for e in range(1, 7) if epochs.after_epoch(e)] == [2, 4, 6] and not epochs.after_step(2)
    now = [0.0]
    minutes = Interval(10, "MINUTE", clock=lambda: now[0])
    fired = []
    for t in range(0, 3600, 60):
        now[0] = float(t)
        fired += [t] if minutes.after_step(1) else []
    assert fired == [600, 1200, 1800, 2400, 3000] and not Interval(1, "NEVER").after_step(1)


def test_loss_goes_down_when_overfitting(train_settings, prepare_settings):
    person = {"name": "person", "path": str(prepare_settings.person), "caption": {"source": "text", "text": "ohwx man"}}
    settings = train_settings(
        concepts=[person], training={"epochs": 8, "noise": {"min_noising_strength": 0.4, "max_noising_strength": 0.6}},
        optimizer={"name": "ADAMW", "fused_back_pass": False}, **QUIET)
    settings.training.unet.learning_rate = 2e-3
    settings.training.masked_training.enabled = False
    sink = Recorder()
    result = loop.train(settings, log=lambda m: None, sinks=[sink])
    losses = [values["loss"] for _, values in sink.scalars_seen]
    assert result.steps == len(losses) == 24 and sink.closed  # the 3 person photos, 8 epochs
    first, last = sum(losses[:6]) / 6, sum(losses[-6:]) / 6
    assert last < 0.7 * first, losses
    table = result.loss_table.read_text().splitlines()
    assert table[0].startswith("step,epoch,loss,lr_unet,lr_text_encoder") and len(table) == 25
    assert result.loss_curve.read_bytes()[:4] == b"\x89PNG"


def test_samples_saves_and_backups_keep_their_schedule(train_settings):
    settings = train_settings(
        training={"epochs": 3},
        sampling={"every": 4, "unit": "STEP"}, saving={"every": 1, "unit": "EPOCH", "skip_first": 1},
        backups={"every": 1, "unit": "EPOCH", "rolling_count": 1}, schedule={"warmup_steps": 2})
    sink = Recorder()
    lines = []
    result = loop.train(settings, log=lines.append, sinks=[sink])
    ws = Workspace.from_settings(settings)
    assert result.steps == 18  # 3 person + 4 x 0.75 regularization = 6 steps an epoch
    names = sorted(p.name for p in ws.samples.iterdir())
    assert names == [f"step{s:07d}-epoch{s // 6:04d}-00.jpg" for s in (0, 4, 8, 12, 16)]  # epochs done
    assert [(step, tag) for step, tag, _ in sink.images] == [(s, "sample/00") for s in (0, 4, 8, 12, 16)]
    lrs = [values["lr_unet"] for _, values in sink.scalars_seen]
    assert lrs[:3] == [0.0, 0.5e-5, 1e-5] and set(lrs[2:]) == {1e-5}  # warmup: the first step has LR 0
    assert sorted(p.name for p in ws.checkpoints.iterdir()) == ["test-2.safetensors", "test-3.safetensors"]
    assert [(c.epoch, c.step) for c in result.checkpoints] == [(2, 12), (3, 18)]
    info = load_checkpoint_metadata(result.final_checkpoint)
    assert (info.epoch, info.step, info.base_model) == (3, 18, str(settings.model.base_model)) and info.settings_hash
    # rolling count 1: the last state (backups.keep_final, for extending the run later) replaced epoch 2's
    assert [p.name for p in ws.backups.iterdir()] == ["backup-000000018"]
    assert any(re.search(r"step 6/18 epoch 1/3 loss \d\.\d+ [\d.]+ it/s ETA", line) for line in lines)


def test_stop_training_after_freezes_text_encoder_1_at_its_step(train_settings, trained_pipe):
    settings = train_settings(training={"epochs": 1, "text_encoder": {"stop_training_after": 3,
                                                                      "stop_training_after_unit": "STEP"}}, **QUIET)
    snapshots = {}

    def weights(pipe):
        return {part: [p.detach().clone() for p in getattr(pipe, part).parameters()] for part in ("unet", "text_encoder")}

    def on_step(step):
        if not snapshots:  # the weights before the first step, from the saved base model
            snapshots[0] = weights(load_sdxl_pipeline(settings.model.base_model))
        snapshots[step] = weights(trained_pipe["pipe"])

    loop.train(settings, log=lambda m: None, sinks=[Recorder(on_step)])
    assert sorted(snapshots) == list(range(7))

    def same(part, a, b):
        return all(torch.equal(x, y) for x, y in zip(snapshots[a][part], snapshots[b][part]))

    assert not any(same("text_encoder", s, s + 1) for s in (0, 1, 2))  # steps 1-3 train TE1
    assert all(same("text_encoder", 3, s) for s in (4, 5, 6))  # then it is frozen
    assert not any(same("unet", s, s + 1) for s in range(6))  # the UNet trains throughout


def test_validation_and_held_out_images_never_enter_a_batch(train_settings, prepare_settings, prepared_workspace,
                                                            monkeypatch):
    base = train_settings(prepare=False)
    data = base.model_dump(mode="json")
    data["concepts"].append({"name": "val", "path": str(prepare_settings.person), "validation": True,
                             "caption": {"source": "text", "text": "ohwx man"}})
    data["evaluation"]["class_prior_images"] = 2
    data["training"]["epochs"] = 2
    data["sampling"] = {**data["sampling"], **QUIET["sampling"]}
    data["backups"]["unit"] = "NEVER"
    settings = type(base).model_validate(data)
    manifest = TrainData(prepared_workspace(settings), settings).manifest
    seen = []
    real_load = TrainData.load
    monkeypatch.setattr(TrainData, "load", lambda self, samples, epoch: seen.append(samples) or real_load(self, samples, epoch))
    result = loop.train(settings, log=lambda m: None)
    ids = {s.item for batch in seen for s in batch}
    held = heldout_ids(manifest, 2)
    assert len(held) == 2 and "val/p0" in set(manifest["id"])
    assert ids.isdisjoint(held) and not any(i.startswith("val/") for i in ids)
    assert {i for i in ids if i.startswith("reg/")} == set(manifest[manifest["concept"] == "reg"]["id"]) - held
    assert result.steps == len(seen)


def test_missing_prepare_output_names_the_stage_and_command(train_settings):
    settings = train_settings(prepare=False)
    with pytest.raises(TrainDataError, match=r"prepare stage 'manifest'.*likeness prepare --profile"):
        loop.train(settings, log=lambda m: None)


@pytest.fixture
def trained_pipe(monkeypatch):
    """The pipeline the loop trains, kept for the test to look at: trained_pipe["pipe"]."""
    kept, real_load_models = {}, loop.load_models

    def load_models(*args):
        kept["pipe"], trained = real_load_models(*args)
        return kept["pipe"], trained

    monkeypatch.setattr(loop, "load_models", load_models)
    return kept


CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"


def test_the_gpu_recipe_runs_bf16_with_checkpointing_ema_and_sampling(train_settings, trained_pipe):
    bf16 = {"weight_dtype": "bfloat16"}
    settings = train_settings(
        training={"epochs": 1, "train_dtype": "bfloat16", "output_dtype": "bfloat16", "gradient_checkpointing": True,
                  "unet": bf16, "text_encoder": bf16, "ema": {"enabled": True}},
        optimizer={"stochastic_rounding": True}, sampling={"every": 3, "unit": "STEP"}, backups={"unit": "NEVER"})
    result = loop.train(settings, log=lambda m: None)
    assert result.steps == 6 and [p.name[:11] for p in result.samples] == ["step0000000", "step0000003", "step0000006"]
    tensors = load_file(result.final_checkpoint)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert any(k.startswith("conditioner.embedders.0.") for k in tensors)
    # EMA on: the checkpoint holds the averaged weights; the model keeps training on its own
    assert not torch.equal(tensors[CONV_IN], trained_pipe["pipe"].unet.conv_in.weight.detach())


def test_gradient_accumulation_and_step_saves(train_settings, trained_pipe):
    settings = train_settings(training={"epochs": 1, "gradient_accumulation_steps": 2, "caption_dropout_probability": 0.5},
                              optimizer={"fused_back_pass": False}, saving={"unit": "STEP", "every": 2}, **QUIET)
    result = loop.train(settings, log=lambda m: None)
    assert result.steps == 3  # 6 batches of 1, 2 per optimizer step
    assert [c.path.name for c in result.checkpoints] == ["test-0-step2.safetensors", "test-1.safetensors"]
    final = load_file(result.final_checkpoint)[CONV_IN]  # EMA off: the trained weights themselves
    assert torch.equal(final, trained_pipe["pipe"].unet.conv_in.weight.detach())


def test_aspect_ratio_buckets_never_mix_sizes_in_a_batch(train_settings, monkeypatch):
    settings = train_settings(resize={"resolution": 128, "mode": "bucket"}, training={"epochs": 2, "batch_size": 2},
                              **QUIET)
    shapes, real_load = [], TrainData.load

    def load(self, samples, epoch):
        batch = real_load(self, samples, epoch)
        shapes.append((tuple(batch.latents.shape), batch.time_ids[:, 4:].tolist()))
        return batch

    monkeypatch.setattr(TrainData, "load", load)
    result = loop.train(settings, log=lambda m: None)
    data = TrainData(Workspace.from_settings(settings), settings)
    buckets = data.index.drop_duplicates("id").set_index("id").loc[data.rows.index, "bucket"]
    assert buckets.nunique() > 1  # the square astronaut and landscape photos: a mixed batch could not be stacked
    assert result.steps == len(shapes) > 0
    for shape, targets in shapes:  # every sample's target size (time ids) is its batch's latent size x 8
        assert all(target == [shape[2] * 8, shape[3] * 8] for target in targets)


def test_gpu_memory_figures_are_columns_on_cuda_and_absent_elsewhere(monkeypatch):
    from likeness.trainer import metrics

    assert metrics.memory_stats(torch.device("cpu")) == {} and metrics.memory_summary(torch.device("cpu")) == ""
    gib = 1024**3
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 2 * gib)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 3 * gib)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 2.5 * gib)
    cuda = torch.device("cuda", 0)
    assert metrics.memory_stats(cuda) == {"mem_allocated_gib": 2.0, "mem_reserved_gib": 3.0, "mem_peak_gib": 2.5}
    assert metrics.memory_summary(cuda) == "mem 2.00/3.00 GiB (peak 2.50)"
