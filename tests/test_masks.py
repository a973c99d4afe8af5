"""Masks: OneTrainer's CLIPSeg algorithm step by step, and the stage on the tiny CLIPSeg."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BatchEncoding

from likeness.content import HashIndex
from likeness.settings import MaskSettings
from likeness.stages import load_rows
from likeness.tasks import masks as masks_module
from likeness.tasks.masks import clipseg_probabilities, masks_stage, refine
from likeness.tasks.resize import resize_stage
from likeness.tasks.scan import scan_stage
from likeness.workspace import Workspace


def _spike(size: int = 9) -> torch.Tensor:
    probs = torch.zeros(1, 1, size, size)
    probs[0, 0, size // 2, size // 2] = 1.0
    return probs


def test_threshold_expand_and_alpha():
    mask = refine(_spike(), (9, 9), MaskSettings(smooth=0, expand=0, threshold=0.5))
    assert mask.sum() == 1 and mask[0, 0, 4, 4] == 1
    grown = refine(_spike(), (9, 9), MaskSettings(smooth=0, expand=2, threshold=0.5, alpha=0.5))
    assert (grown[0, 0, 2:7, 2:7] == 0.5).all() and grown.sum() == 25 * 0.5  # a 5 x 5 box of alpha


def test_smoothing_removes_isolated_spikes_and_resize_reaches_the_image_size():
    assert refine(_spike(), (9, 9), MaskSettings(smooth=1, expand=0, threshold=0.3)).sum() == 0  # 1/9 < 0.3
    blob = torch.zeros(1, 1, 9, 9)
    blob[..., 2:7, 2:7] = 1.0
    mask = refine(blob, (36, 36), MaskSettings(smooth=1, expand=0, threshold=0.3))
    assert mask.shape == (1, 1, 36, 36) and 0 < mask.mean() < 1


class _FakeProcessor:
    def __call__(self, text, images, padding, return_tensors):
        assert len(text) == len(images)
        return BatchEncoding({"input_ids": torch.tensor([[0] if t == "sure" else [1] for t in text])})


class _FakeModel:
    """Logits +10 for the prompt 'sure' (sigmoid ~1) and 0 for 'unsure' (sigmoid 0.5)."""

    def __call__(self, input_ids):
        logits = torch.where(input_ids[:, :1, None] == 0, 10.0, 0.0).expand(-1, 4, 4)
        return type("Out", (), {"logits": logits})()


def test_prompts_are_averaged_after_the_sigmoid():
    images = [Image.new("RGB", (8, 8))] * 2
    probs = clipseg_probabilities(_FakeModel(), _FakeProcessor(), images, ["sure", "unsure"], torch.device("cpu"))
    assert probs.shape == (2, 1, 4, 4)
    assert torch.allclose(probs, torch.full_like(probs, 0.75), atol=1e-4)  # (1 + 0.5) / 2, not sigmoid(5)


@pytest.fixture
def resized(prepare_settings, photo):
    settings = prepare_settings()
    Image.new("L", Image.open(prepare_settings.person / "p1.jpg").size, 255).save(prepare_settings.person / "p1-masklabel.png")
    ws, index = Workspace.from_settings(settings), HashIndex(Workspace.from_settings(settings).hash_index)
    scan, report = scan_stage(settings.concepts, settings.resize.min_side, ws, index)
    assert not report.errors
    return settings, ws, resize_stage(scan, settings.resize, ws, index)


def test_stage_masks_the_subject_only_and_fill_keeps_a_drawn_mask(resized, monkeypatch):
    settings, ws, resize = resized
    fill = settings.masks.model_copy(update={"mode": "fill"})
    result = masks_stage(resize, fill, settings.concepts, ws, HashIndex(ws.hash_index), device="cpu")
    rows = {row["id"]: row for row in load_rows(result)}
    assert (result.processed, result.reused) == (7, 0)
    assert [rows[f"reg/r{i}"]["mask"] for i in range(4)] == [None] * 4
    for i in (0, 2):
        mask = Image.open(rows[f"person/p{i}"]["mask"])
        assert rows[f"person/p{i}"]["mask_origin"] == "clipseg" and mask.mode == "L" and mask.size == (64, 64)
        assert Path(rows[f"person/p{i}"]["mask"]) == ws.prepared / "person" / f"p{i}-masklabel.png"
    drawn = rows["person/p1"]
    user_mask = next(r for r in load_rows(resize) if r["id"] == "person/p1")["user_mask"]
    assert drawn["mask_origin"] == "user" and Path(drawn["mask"]).read_bytes() == Path(user_mask).read_bytes()

    monkeypatch.setattr(masks_module, "load_model", lambda *a: pytest.fail("a model was loaded"))
    again = masks_stage(resize, fill, settings.concepts, ws, HashIndex(ws.hash_index), device="cpu")
    assert (again.processed, again.reused) == (0, 7)


def test_replace_mode_segments_even_drawn_masks_and_flags_odd_ones(resized):
    settings, ws, resize = resized
    everything = settings.masks.model_copy(update={"mode": "replace", "threshold": 0.01, "expand": 64})
    result = masks_stage(resize, everything, settings.concepts, ws, HashIndex(ws.hash_index), device="cpu")
    rows = {row["id"]: row for row in load_rows(result)}
    assert rows["person/p1"]["mask_origin"] == "clipseg"
    assert all(rows[f"person/p{i}"]["coverage"] == 1.0 for i in range(3))
    report = (ws.reports / "masks-report.md").read_text()
    assert "3 mask(s) look wrong" in report and "p0-masklabel.png" in report
    mask = np.asarray(Image.open(rows["person/p0"]["mask"]))
    assert (mask == 255).all()
