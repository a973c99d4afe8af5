"""Kosmos-2 captions: a tiny Kosmos-2 built from configs (a Unigram tokenizer made here) loaded through the
real transformers path, the grounding tags stripped from model-shaped outputs, and the captions stage."""

import string
from pathlib import Path

import pytest
import torch
from PIL import Image

from likeness.settings import CaptionerSettings, CaptionSource, Concept, ResizeSettings
from likeness.stages import load_rows
from likeness.tasks.captions import captions_stage, generate_captions, load_captioner, with_prefix
from likeness.tasks.captions_kosmos2 import GROUNDING_PROMPT, caption_from_generated, is_kosmos2, kosmos2_captions, prompt_words
from likeness.tasks.resize import resize_stage
from likeness.tasks.scan import scan_stage
from likeness.workspace import Workspace

WORDS = "An image of a man woman snowman with dark hair glasses standing in room warming himself by fire".split()
# What microsoft/kosmos-2-patch14-224 returns for its model card's snowman photo, decoded with
# skip_special_tokens=True (the image slots decode to arbitrary words before </image>).
SNOWMAN = ("<image>. the, to and of as in I that' for is was- on’ it with The as at bet he have from by are \" you his “ "
           "this said not has an ( but had we her they will my or were their): up about out who one all been she can "
           "more would It</image><grounding> An image of<phrase> a snowman</phrase><object><patch_index_0044>"
           "<patch_index_0863></object> warming himself by<phrase> a fire</phrase><object><patch_index_0005>"
           "<patch_index_0911></object>.")


def tiny_tokenizer():
    """XLM-RoBERTa's layout (<s> <pad> </s> <unk> first, <mask> last) with a small Unigram vocabulary.

    The processor uses the 64 ids after <unk> as image slots: the vocabulary has more than that."""
    from transformers import XLMRobertaTokenizer

    pieces = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [(f"▁{w}", -2.0 - i / 100) for i, w in enumerate(dict.fromkeys(WORDS))]
    pieces += [(c, -10.0) for c in string.ascii_letters + string.digits + string.punctuation] + [("▁", -5.0)]
    return XLMRobertaTokenizer(vocab=[*pieces, ("<mask>", 0.0)])


@pytest.fixture(scope="module")
def tiny_kosmos2(tmp_path_factory) -> Path:
    """Kosmos-2's architecture shrunk (32-wide, 2 layers, 32 px images, 64 latent queries), saved like the real one."""
    from transformers import Kosmos2Config, Kosmos2ForConditionalGeneration, Kosmos2Processor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    folder = tmp_path_factory.mktemp("tiny-kosmos2")
    images = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = Kosmos2Processor(image_processor=images, tokenizer=tiny_tokenizer())  # adds 1035 tag/box tokens
    text = dict(vocab_size=len(processor.tokenizer), embed_dim=32, layers=2, ffn_dim=64, attention_heads=4,
                max_position_embeddings=256)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Kosmos2ForConditionalGeneration(Kosmos2Config(text_config=text, vision_config=vision,
                                                              latent_query_num=64)).eval()
        # Random weights would mostly pick one of the 1024 box tokens: with their (tied) embeddings at zero
        # the tiny model writes words, letters and phrase tags, as the real one does.
        boxes = processor.tokenizer.convert_tokens_to_ids([f"<patch_index_{i:04d}>" for i in range(1024)])
        with torch.no_grad():
            model.get_input_embeddings().weight[boxes] = 0
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def loaded(tiny_kosmos2):
    return load_captioner(str(tiny_kosmos2), "cpu")


def test_loads_through_the_auto_classes_and_checks_the_kind(tiny_kosmos2, loaded):
    model, processor, device = loaded
    assert type(model).__name__ == "Kosmos2ForConditionalGeneration" and type(processor).__name__ == "Kosmos2Processor"
    assert is_kosmos2(model) and device == torch.device("cpu")
    assert is_kosmos2(load_captioner(str(tiny_kosmos2), "cpu", "kosmos2")[0])
    with pytest.raises(ValueError, match=r"captioner.kind is 'blip' .* kosmos-2 model"):
        load_captioner(str(tiny_kosmos2), "cpu", "blip")


@pytest.mark.parametrize("generated, caption", [
    (SNOWMAN, "a snowman warming himself by a fire"),
    # cut off by max_new_tokens inside a box
    ("<image>x</image><grounding> An image of<phrase> a man</phrase><object><patch_index_0044>", "a man"),
    ("<image>x</image><grounding> a photo of<phrase> a woman</phrase> in a room.", "a photo of a woman in a room"),
    ("<image>x</image><grounding> An image of", ""),
])
def test_tags_and_prompt_words_are_stripped(loaded, generated, caption):
    assert caption_from_generated(loaded[1], generated) == caption
    assert prompt_words() == "An image of" and prompt_words(GROUNDING_PROMPT) in SNOWMAN


def test_model_shaped_ids_decode_to_the_caption(loaded, monkeypatch):
    model, processor, device = loaded
    image = Image.new("RGB", (48, 40), "gray")
    prompt_ids = processor(text=[GROUNDING_PROMPT], images=[image], return_tensors="pt")["input_ids"]  # (1, T)
    continuation = ("<phrase> a man</phrase><object><patch_index_0044><patch_index_0863></object> with dark hair"
                    "<phrase> glasses</phrase><object><patch_index_0100><patch_index_0400></object>.")
    new = processor.tokenizer(continuation, add_special_tokens=False).input_ids + [processor.tokenizer.eos_token_id]
    seen = {}

    def fake_generate(**inputs):
        seen.update(inputs)
        return torch.cat([inputs["input_ids"], torch.tensor([new])], dim=1)

    monkeypatch.setattr(model, "generate", fake_generate)
    assert kosmos2_captions([image], model, processor, 64, device) == ["a man with dark hair glasses"]
    assert torch.equal(seen["input_ids"], prompt_ids) and seen["max_new_tokens"] == 64
    assert seen["pixel_values"].shape == (1, 3, 32, 32) and seen["image_embeds_position_mask"].sum() == 64


def test_real_generation_gives_clean_text(loaded):
    model, processor, device = loaded
    images = [Image.new("RGB", (32, 32), c) for c in ("red", "blue")]
    captions = generate_captions(images, model, processor, 10, device)
    inputs = processor(text=[GROUNDING_PROMPT] * 2, images=images, return_tensors="pt")
    raw = processor.batch_decode(model.generate(**inputs, max_new_tokens=10), skip_special_tokens=True)
    assert all("</image><grounding> An image of" in text for text in raw)  # what the stripping starts from
    assert len(captions) == 2 and all(captions)
    assert not any("<" in c or ">" in c or c.lower().startswith("an image of") for c in captions)
    assert all(text.endswith(c) for text, c in zip(raw, captions))  # the generated words, kept in order


def test_captions_stage_puts_the_token_first(tmp_path, photo, tiny_kosmos2, loaded):
    photo(tmp_path / "p" / "a.png", 0, size=(64, 64))
    photo(tmp_path / "p" / "b.png", 1, size=(64, 64))
    concept = Concept(name="p", path=tmp_path / "p", caption=CaptionSource(source="captioner", prefix="ohwx man"))
    ws = Workspace(tmp_path / "ws")
    index = ws.hashes()
    scan, report = scan_stage([concept], 1, ws, index)
    report.raise_for_errors()
    resize = resize_stage(scan, ResizeSettings(resolution=64), ws, index)
    settings = CaptionerSettings(model=str(tiny_kosmos2), kind="kosmos2", max_new_tokens=12, batch_size=2)
    rows = load_rows(captions_stage(resize, [concept], settings, 0, ws, ws.hashes(), device="cpu"), ws)
    model, processor, device = loaded
    images = [Image.open(r["prepared"]) for r in load_rows(resize, ws)]
    expected = [with_prefix("ohwx man", c) for c in generate_captions(images, model, processor, 12, device)]
    assert [r["captions"][0] for r in rows] == expected
    assert all(c.startswith("ohwx man") and "<" not in c for c in expected)


def test_the_default_token_budget_is_per_captioner_kind(tmp_path, photo, tiny_kosmos2, loaded, monkeypatch):
    from likeness.tasks import captions as captions_module
    from likeness.tasks.captions import token_budget

    model, _, _ = loaded
    assert CaptionerSettings().max_new_tokens is None
    assert token_budget(None, model) == 64 and token_budget(12, model) == 12
    assert token_budget(None, torch.nn.Linear(1, 1)) == 40  # BLIP and other plain captioners
    photo(tmp_path / "p" / "a.png", 0, size=(64, 64))
    concept = Concept(name="p", path=tmp_path / "p", caption=CaptionSource(source="captioner", prefix="ohwx man"))
    ws = Workspace(tmp_path / "ws")
    index = ws.hashes()
    scan, _ = scan_stage([concept], 1, ws, index)
    resize = resize_stage(scan, ResizeSettings(resolution=64), ws, index)
    budgets = []
    monkeypatch.setattr(captions_module, "generate_captions",
                        lambda images, m, p, budget, d: budgets.append(budget) or ["a man"] * len(images))
    captions_stage(resize, [concept], CaptionerSettings(model=str(tiny_kosmos2)), 0, ws, index, device="cpu")
    assert budgets == [64]  # kind "auto", no budget set: Kosmos-2's
