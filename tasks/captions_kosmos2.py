"""Kosmos-2 captions (`microsoft/kosmos-2-patch14-224`), the captioner beside BLIP in `captions.py`.

Kosmos-2 is a grounded decoder: given an image and the prompt `<grounding>An image of` it goes on
with the caption, marking each entity with `<phrase>..</phrase><object><patch_index_....>..</object>`
(the box as two of 32x32 patch indices). Loading goes through transformers' auto classes
(`Kosmos2ForConditionalGeneration` + `Kosmos2Processor`); a caption is the generated text after
`</image>` with every tag removed (the processor's `post_process_generation`), the prompt's words
taken off the front and the end period dropped: `a man with dark hair standing in a room`. The
concept's token prefix goes first in `captions.py`: `ohwx man, a man with dark hair ...`.

Grounding costs about five tokens per entity (phrase tags and a two-index box), so it needs
`captioner.max_new_tokens` 64 or more (the model card uses 128): unset, it gets
`MAX_NEW_TOKENS` = 64 (BLIP gets 40, see `captions.token_budget`).

    settings.captioner.model = "microsoft/kosmos-2-patch14-224"   # kind "auto" detects it
    captions = kosmos2_captions(images, model, processor, max_new_tokens=64, device=device)
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from PIL import Image

if TYPE_CHECKING:
    import torch

MODEL_TYPE = "kosmos-2"  # config.model_type of Kosmos2ForConditionalGeneration
GROUNDING_PROMPT = "<grounding>An image of"
MAX_NEW_TOKENS = 64  # the default budget: the grounding tags need room besides the words
_TAG = re.compile(r"<[^<>]*>")


def is_kosmos2(model: Any) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) == MODEL_TYPE


def prompt_words(prompt: str = GROUNDING_PROMPT) -> str:
    """The prompt as it reads once its tags are gone: `An image of`."""
    return " ".join(_TAG.sub(" ", prompt).split())


def caption_from_generated(processor: Any, text: str, prompt: str = GROUNDING_PROMPT) -> str:
    """A decoded Kosmos-2 output -> the caption alone: tags stripped, prompt words off, no end period."""
    caption, _entities = processor.post_process_generation(text)  # text after </image>, tags removed
    caption = " ".join(_TAG.sub("", caption).split())  # a box cut off by max_new_tokens leaves a bare tag
    words = prompt_words(prompt)
    if caption.lower().startswith(words.lower()):
        caption = caption[len(words):]
    return caption.strip(" ,;:").rstrip(".").strip()


def kosmos2_captions(images: list[Image.Image], model: Any, processor: Any, max_new_tokens: int,
                     device: torch.device, prompt: str = GROUNDING_PROMPT) -> list[str]:
    """One caption per image; the batch shares the prompt, so no padding is needed (`generate` runs without gradients)."""
    inputs = processor(text=[prompt] * len(images), images=images, return_tensors="pt").to(device)
    # input_ids (B, T): <s> <image> 64 image slots </image> + the prompt; pixel_values (B, 3, 224, 224)
    ids = model.generate(pixel_values=inputs["pixel_values"], input_ids=inputs["input_ids"],
                         attention_mask=inputs["attention_mask"],
                         image_embeds_position_mask=inputs["image_embeds_position_mask"],
                         max_new_tokens=max_new_tokens, use_cache=True)  # (B, T + new)
    texts = processor.batch_decode(ids, skip_special_tokens=True)
    return [caption_from_generated(processor, text, prompt) for text in texts]
