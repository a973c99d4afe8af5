"""The non-finite guard: a NaN loss or gradient never reaches the weights, with the fused back pass
and without; the run logs the step, goes back to the last good state and goes on; after
training.max_nonfinite_steps such steps it stops naming the step and the likely causes."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from likeness.trainer import loop
from likeness.trainer.nonfinite import NonFiniteError
from likeness.trainer.optimizer import AdamW, FusedBackPass
from likeness.workspace import Workspace

pytestmark = pytest.mark.usefixtures("one_torch_thread")
QUIET = {"sampling": {"unit": "NEVER", "at_start": False}, "saving": {"unit": "NEVER"}}


def test_fused_back_pass_steps_no_parameter_from_the_first_bad_gradient_on():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    fused = FusedBackPass(AdamW([{"params": list(model.parameters()), "part": "unet"}], lr=0.1), check_finite=True)
    model[1].weight.register_hook(lambda grad: grad * float("nan"))  # the middle layer's gradient turns NaN
    before = [p.detach().clone() for p in model.parameters()]
    fused.start()
    model(torch.ones(2, 3)).sum().backward()
    changed = [not torch.equal(a, p) for a, p in zip(before, model.parameters())]
    # backward reaches the last layer first: it stepped; the NaN weight and all after it did not
    assert not fused.good and fused.stepped == sum(changed) >= 2
    assert changed[4:] == [True, True] and changed[:3] == [False] * 3
    fused.start(finite=False)  # a NaN loss: nothing steps at all
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.ones(2, 3)).sum().backward()
    assert fused.stepped == 0 and all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_per_step_check_reads_no_flag_during_backward_and_flags_the_step_after_it(monkeypatch):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    fused = FusedBackPass(AdamW([{"params": list(model.parameters()), "part": "unet"}], lr=0.1),
                          check_finite=True, check_per_step=True)
    reads = []
    real_bool = torch.Tensor.__bool__
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda t: reads.append(1) or real_bool(t))
    fused.start()
    model(torch.ones(2, 3)).sum().backward()
    assert reads == [] and fused.good  # no host read inside backward
    fused.finish()
    assert len(reads) == 1 and fused.good and fused.stepped == 6  # one read per step
    model[1].weight.register_hook(lambda grad: grad * float("nan"))
    fused.start()
    model(torch.ones(2, 3)).sum().backward()
    fused.finish()
    assert not fused.good and fused.stepped == 6  # every parameter stepped: the caller rolls back


def _nan_loss_at(monkeypatch, steps):
    """Make the loss of the given (0-based) forward passes NaN."""
    real, calls = loop.diffusion_losses, {"n": 0}

    def losses(*args, **kwargs):
        out = real(*args, **kwargs)
        calls["n"] += 1
        return out * float("nan") if calls["n"] - 1 in steps else out
    monkeypatch.setattr(loop, "diffusion_losses", losses)


def _weights_per_step(monkeypatch):
    """Snapshots of the UNet after each optimizer step (a metrics sink sees every step)."""
    seen, snapshots = {}, []
    real = loop.load_models

    def load_models(*args):
        seen["pipe"], trained = real(*args)
        return seen["pipe"], trained
    monkeypatch.setattr(loop, "load_models", load_models)

    class Sink:
        def scalars(self, step, values):
            snapshots.append((step, [p.detach().clone() for p in seen["pipe"].unet.parameters()]))
        def image(self, step, tag, image): pass
        def close(self): pass
    return Sink(), snapshots


@pytest.mark.parametrize("fused", [False, True])
def test_a_nan_loss_is_skipped_and_the_run_goes_on(train_settings, monkeypatch, fused):
    settings = train_settings(training={"epochs": 1}, optimizer={"fused_back_pass": fused}, backups={"unit": "NEVER"},
                              **QUIET)
    _nan_loss_at(monkeypatch, {2})
    sink, snapshots = _weights_per_step(monkeypatch)
    lines = []
    result = loop.train(settings, log=lines.append, sinks=[sink])
    assert result.steps == 6
    assert any("step 3: non-finite loss; update skipped, the weights stay those of step 2" in line for line in lines)
    (_, at_2), (_, at_3) = snapshots[1], snapshots[2]
    assert all(torch.equal(a, b) for a, b in zip(at_2, at_3))  # step 3 changed nothing
    assert not all(torch.equal(a, b) for a, b in zip(at_3, snapshots[3][1]))  # step 4 trained again
    weights = load_file(result.final_checkpoint)
    assert all(torch.isfinite(w).all() for w in weights.values())


@pytest.mark.parametrize("check", ["parameter", "step"])
def test_a_bad_gradient_after_fused_steps_rolls_back_to_the_last_backup(train_settings, monkeypatch, check):
    """A NaN gradient half-way through the fused back pass: some parameters already stepped (with the
    check per step: all of them), so the run goes back to its last backup, replays, and ends with the
    weights of a clean run."""
    settings = train_settings(training={"epochs": 1, "nonfinite_check": check}, optimizer={"fused_back_pass": True},
                              backups={"every": 2, "unit": "STEP"}, **QUIET)
    clean = load_file(loop.train(settings, log=lambda line: None).final_checkpoint)
    ws = Workspace.from_settings(settings)
    for folder in (ws.checkpoints, ws.backups, ws.reports):
        shutil.rmtree(folder)

    real, calls = loop.load_models, {"n": 0}

    def load_models(*args):  # conv_in's gradient comes late in backward: NaN once, at the 4th step
        pipe, trained = real(*args)

        def poison(grad):
            calls["n"] += 1
            return grad * float("nan") if calls["n"] == 4 else grad
        pipe.unet.conv_in.weight.register_hook(poison)
        return pipe, trained
    monkeypatch.setattr(loop, "load_models", load_models)
    lines = []
    result = loop.train(settings, log=lines.append)
    assert any("step 4: non-finite gradient; some parameters had stepped" in line for line in lines)
    assert any("resumed from" in line and "backup-000000002" in line for line in lines)
    weights = load_file(result.final_checkpoint)
    assert weights.keys() == clean.keys() and all(torch.equal(weights[k], clean[k]) for k in clean)


def test_too_many_nan_steps_stop_the_run_naming_step_and_causes(train_settings, monkeypatch):
    settings = train_settings(training={"max_nonfinite_steps": 2, "train_dtype": "float16"},
                              backups={"unit": "NEVER"}, **QUIET)
    _nan_loss_at(monkeypatch, {1, 3})
    with pytest.raises(NonFiniteError) as error:
        loop.train(settings, log=lambda line: None)
    message = str(error.value)
    assert "non-finite loss at step 4" in message and "2 non-finite steps: 2, 4" in message
    assert "learning rate too high" in message and "float16 overflow" in message
