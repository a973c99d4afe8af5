"""LoRA training through the training loop (issue 16): the saves are LoRA files that diffusers loads."""

import pytest

from likeness.models.lora import is_lora_file
from likeness.trainer import loop


@pytest.mark.usefixtures("one_torch_thread")
def test_lora_training_saves_lora_files(train_settings):
    settings = train_settings(training={"epochs": 1, "method": "lora", "lora": {"rank": 2, "layer_preset": "attn-only"}})
    result = loop.train(settings, log=lambda m: None)
    assert result.checkpoints and all(is_lora_file(c.path) for c in result.checkpoints)
    assert is_lora_file(result.final_checkpoint)
