"""LoRA training through the training loop (issue 16): the saves are LoRA files that diffusers loads,
and a run stopped after a backup resumes from it to the LoRA of an uninterrupted run."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from likeness.models.lora import is_lora_file
from likeness.trainer import loop
from likeness.trainer.backup import list_backups
from likeness.workspace import Workspace

LORA = {"method": "lora", "lora": {"rank": 2, "layer_preset": "attn-only"}}


@pytest.mark.usefixtures("one_torch_thread")
def test_lora_training_saves_lora_files(train_settings):
    settings = train_settings(training={"epochs": 1, **LORA})
    result = loop.train(settings, log=lambda m: None)
    assert result.checkpoints and all(is_lora_file(c.path) for c in result.checkpoints)
    assert is_lora_file(result.final_checkpoint)


class Interrupt(Exception):
    pass


class StopAt:
    """A metrics sink that stops the run (an exception out of train()) when step `step` is logged."""

    def __init__(self, step: int) -> None:
        self.stop = step

    def scalars(self, step, values):
        if step == self.stop:
            raise Interrupt(step)

    def image(self, step, tag, image):
        pass

    def close(self):
        pass


@pytest.mark.usefixtures("one_torch_thread")
def test_a_stopped_lora_run_resumes_to_the_lora_of_an_uninterrupted_run(train_settings):
    # Text encoder 1 trains too: both parts' adapters and their optimizer state go through the backup.
    settings = train_settings(training={"epochs": 2, **LORA}, sampling={"unit": "NEVER", "at_start": False},
                              saving={"unit": "NEVER"}, backups={"every": 3, "unit": "STEP", "rolling_count": 2})
    ws = Workspace.from_settings(settings)

    uninterrupted = loop.train(settings, log=lambda m: None)
    assert uninterrupted.steps == 12 and uninterrupted.resumed_from is None
    expected = load_file(uninterrupted.final_checkpoint)
    for folder in (ws.checkpoints, ws.backups, ws.reports):
        shutil.rmtree(folder)

    with pytest.raises(Interrupt):
        loop.train(settings, log=lambda m: None, sinks=[StopAt(5)])  # after the backup of step 3, before 6's
    backup = list_backups(ws.backups)[-1]
    assert backup.step == 3

    # The backup holds the adapters and their optimizer state, not the frozen UNet / text encoder.
    pipe, _ = loop.load_models(settings, torch.device("cpu"))
    for part in ("unet", "text_encoder"):
        weights = backup.weights(part)
        adapters = {n: p for n, p in getattr(pipe, part).named_parameters() if p.requires_grad}
        assert weights.keys() == adapters.keys() and weights
        assert all(".lora_A." in k or ".lora_B." in k for k in weights)
        assert all(weights[k].shape == adapters[k].shape for k in weights)
    optimizer = backup.objects()["optimizer"]
    trainable = sum(p.numel() for part in ("unet", "text_encoder") for p in getattr(pipe, part).parameters()
                    if p.requires_grad)
    in_groups = sum(len(group["params"]) for group in optimizer["param_groups"])
    assert in_groups == sum(len(backup.weights(part)) for part in ("unet", "text_encoder"))
    state_numel = sum(t.numel() for s in optimizer["state"].values() for t in s.values() if torch.is_tensor(t))
    assert 0 < state_numel <= 2 * trainable  # Adafactor's statistics of the adapters, no more
    unet_numel = sum(p.numel() for p in pipe.unet.parameters())
    assert sum(t.numel() for t in backup.weights("unet").values()) < unet_numel / 20

    resumed = loop.train(settings, log=lambda m: None)
    assert resumed.resumed_from == backup.path and resumed.steps == 12
    weights = load_file(resumed.final_checkpoint)
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[k], expected[k]) for k in expected)  # bitwise: one thread, same arithmetic
