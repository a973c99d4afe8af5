"""Captions: every source, the prefix first, missing captions listed, and a real (tiny) BLIP."""

from pathlib import Path

import pytest
import torch
from PIL import Image

from likeness.content import HashIndex
from likeness.settings import CaptionerSettings, CaptionSource, Concept, ResizeSettings
from likeness.stages import load_rows
from likeness.tasks import captions as captions_module
from likeness.tasks.captions import (CaptionError, captions_stage, clean_generated, generate_captions, load_captioner,
                                       pick_variations, with_prefix)
from likeness.tasks.resize import resize_stage
from likeness.tasks.scan import scan_stage
from likeness.workspace import Workspace

WORDS = "a an the man woman photo of with glasses hat smiling standing in room red blue shirt dark hair".split()


def test_prefix_goes_first_once():
    assert with_prefix("ohwx man", "a man with dark hair") == "ohwx man, a man with dark hair"
    assert with_prefix("ohwx man", "ohwx man in a suit") == "ohwx man in a suit"
    assert with_prefix("ohwx man", "") == "ohwx man"
    assert with_prefix("", "  a   man\n") == "a man"


def test_generated_captions_are_cleaned():
    assert clean_generated("arafed man with  glasses.") == "man with glasses"
    assert clean_generated("there is araffe woman") == "there is woman"


def test_variations_pick_lines_reproducibly():
    lines = ["one", "two", "three", "four"]
    picked = pick_variations(lines, 20, "42:person/a")
    assert picked == pick_variations(lines, 20, "42:person/a") and set(picked) <= set(lines) and len(set(picked)) > 1
    assert pick_variations(["only"], 3, "x") == ["only"] * 3


def _prepare(tmp_path, photo, concepts):
    ws = Workspace(tmp_path / "ws")
    index = ws.hashes()
    scan, report = scan_stage(concepts, 1, ws, index)
    report.raise_for_errors()
    return ws, resize_stage(scan, ResizeSettings(resolution=64), ws, index)


def test_each_text_source_writes_stem_txt_beside_the_prepared_image(tmp_path, photo):
    for name in ("fixed", "lines", "own", "named"):
        photo(tmp_path / name / "img_01.png", 0, size=(64, 48))
    (tmp_path / "own" / "img_01.txt").write_text("a man in a red shirt\na man smiling\n")
    (tmp_path / "captions.txt").write_text("first caption\n\nsecond caption\n")
    concepts = [
        Concept(name="fixed", path=tmp_path / "fixed", caption=CaptionSource(source="text", text="ohwx man")),
        Concept(name="lines", path=tmp_path / "lines", text_variations=6, caption=CaptionSource(source="text_file", path=tmp_path / "captions.txt")),
        Concept(name="own", path=tmp_path / "own", text_variations=8, caption=CaptionSource(source="per_image", prefix="ohwx man")),
        Concept(name="named", path=tmp_path / "named", caption=CaptionSource(source="filename")),
    ]
    ws, resize = _prepare(tmp_path, photo, concepts)
    result = captions_stage(resize, concepts, CaptionerSettings(), 42, ws, ws.hashes())
    rows = {row["id"]: row for row in load_rows(result, ws)}
    assert rows["fixed/img_01"]["captions"] == ["ohwx man"]
    assert set(rows["lines/img_01"]["captions"]) == {"first caption", "second caption"}
    assert set(rows["own/img_01"]["captions"]) == {"ohwx man, a man in a red shirt", "ohwx man, a man smiling"}
    assert rows["named/img_01"]["captions"] == ["img_01"]
    own_file = ws.prepared / "own" / "img_01.txt"
    assert own_file.read_text().splitlines() == rows["own/img_01"]["captions"]  # one line per variation
    again = captions_stage(resize, concepts, CaptionerSettings(), 42, ws, ws.hashes())
    assert (again.processed, again.reused) == (0, 4)
    (tmp_path / "own" / "img_01.txt").write_text("a new caption\n")
    ws2, resize2 = _prepare(tmp_path, photo, concepts)  # the scan sees the new caption file
    changed = captions_stage(resize2, concepts, CaptionerSettings(), 42, ws2, HashIndex(ws2.hash_index))
    assert (changed.processed, changed.reused) == (1, 3)
    assert own_file.read_text() == "ohwx man, a new caption\n" * 8


def test_missing_per_image_captions_list_the_files_or_fall_back(tmp_path, photo):
    for name in ("a", "b", "c"):
        photo(tmp_path / "p" / f"{name}.png", 0, size=(32, 32))
    (tmp_path / "p" / "a.txt").write_text("ohwx man, a caption\n")
    (tmp_path / "p" / "c.txt").write_text("\n  \n")  # empty counts as missing
    lenient = Concept(name="p", path=tmp_path / "p", caption=CaptionSource(source="per_image", prefix="ohwx man", on_missing="prefix_only"))
    ws, resize = _prepare(tmp_path, photo, [lenient])
    strict = lenient.model_copy(update={"caption": CaptionSource(source="per_image")})
    with pytest.raises(CaptionError) as raised:
        captions_stage(resize, [strict], CaptionerSettings(), 0, ws, ws.hashes())
    assert "b.txt" in str(raised.value) and "c.txt" in str(raised.value) and "a.txt" not in str(raised.value)
    assert "on_missing" in str(raised.value)
    rows = load_rows(captions_stage(resize, [lenient], CaptionerSettings(), 0, ws, ws.hashes()), ws)
    assert [r["captions"] for r in rows] == [["ohwx man, a caption"], ["ohwx man"], ["ohwx man"]]
    by_name = lenient.model_copy(update={"caption": CaptionSource(source="per_image", on_missing="filename")})
    rows = load_rows(captions_stage(resize, [by_name], CaptionerSettings(), 0, ws, ws.hashes()), ws)
    assert [r["captions"] for r in rows] == [["ohwx man, a caption"], ["b"], ["c"]]


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory) -> Path:
    """A BLIP captioner with random weights and a 25-word vocabulary, saved like a real one."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipProcessor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    folder = tmp_path_factory.mktemp("tiny-blip")
    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *WORDS])}
    tokenizer = BertTokenizer(vocab=vocab, bos_token="[DEC]")
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                encoder_hidden_size=32, max_position_embeddings=64, bos_token_id=5, eos_token_id=3, pad_token_id=0, sep_token_id=3)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=32)).eval()
    model.save_pretrained(folder)
    BlipProcessor(image_processor=BlipImageProcessorPil(size={"height": 32, "width": 32}), tokenizer=tokenizer).save_pretrained(folder)
    return folder


def test_captioner_source_runs_blip_through_transformers(tmp_path, photo, tiny_blip, monkeypatch):
    photo(tmp_path / "p" / "a.png", 0, size=(64, 64))
    photo(tmp_path / "p" / "b.png", 1, size=(64, 64))
    concept = Concept(name="p", path=tmp_path / "p", caption=CaptionSource(source="captioner", prefix="ohwx man"))
    ws, resize = _prepare(tmp_path, photo, [concept])
    settings = CaptionerSettings(model=str(tiny_blip), max_new_tokens=8, batch_size=2)
    rows = load_rows(captions_stage(resize, [concept], settings, 0, ws, ws.hashes(), device="cpu"), ws)
    model, processor, device = load_captioner(str(tiny_blip), "cpu")
    images = [Image.open(r["prepared"]) for r in load_rows(resize, ws)]
    expected = [with_prefix("ohwx man", c) for c in generate_captions(images, model, processor, 8, device)]
    assert [r["captions"][0] for r in rows] == expected
    assert any(len(c.split()) > 2 for c in expected) and all(c.startswith("ohwx man") for c in expected)
    assert all(w in WORDS + ["ohwx", "man,"] for c in expected for w in c.split())
    monkeypatch.setattr(captions_module, "load_captioner", lambda *a: pytest.fail("the captioner was loaded"))
    again = captions_stage(resize, [concept], settings, 0, ws, ws.hashes(), device="cpu")
    assert (again.processed, again.reused) == (0, 2)


