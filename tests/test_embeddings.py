"""Likeness and prompt-fidelity metrics: cosine maths on constructed embeddings, head crops, and the
tiny DINO / CLIP on real photos (a photo is closer to itself, slightly changed, than to another photo)."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance
from skimage import data

from likeness.models.embeddings import (
    Embedder,
    centre_box,
    clip_text_embeddings,
    cosine_matrix,
    embed_images,
    head_crop,
    mask_box,
    mean_paired_similarity,
    mean_pairwise_similarity,
    square_box,
)
from likeness.models.tiny import build_tiny_clip, build_tiny_dino

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def embedders():
    dino, dino_processor = build_tiny_dino(seed=0)
    clip, clip_processor = build_tiny_clip(seed=0)
    cpu = torch.device("cpu")
    return {"dino": Embedder("dino", dino, dino_processor, cpu), "clip": Embedder("clip", clip, clip_processor, cpu)}


def photo(factory, size: int = 128) -> Image.Image:
    image = factory()
    image = np.stack([image] * 3, axis=-1) if image.ndim == 2 else image
    return Image.fromarray(image).convert("RGB").resize((size, size))


def test_cosine_metrics_on_constructed_embeddings():
    generated = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    reference = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    expected = cosine_matrix(generated, reference)
    assert torch.allclose(expected, torch.tensor([[1.0, 2 ** -0.5], [0.0, 2 ** -0.5]]))
    assert mean_pairwise_similarity(generated, reference) == pytest.approx((1 + 2 * 2 ** -0.5) / 4)
    assert mean_paired_similarity(generated, torch.tensor([[5.0, 0.0], [1.0, 0.0]])) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="one text per image"):
        mean_paired_similarity(generated, reference[:1])
    with pytest.raises(ValueError, match="at least one"):
        mean_pairwise_similarity(generated[:0], reference)


def test_mask_box_and_the_square_head_crop():
    mask = np.zeros((100, 80), np.uint8)
    mask[20:40, 30:40] = 255  # 10 wide, 20 tall
    assert mask_box(mask) == (30, 20, 40, 40)
    left, top, right, bottom = square_box((30, 20, 40, 40), (80, 100), margin=0.25)
    assert right - left == bottom - top == 30 and (left + right) / 2 == 35 and (top + bottom) / 2 == 30
    assert square_box((0, 0, 10, 10), (80, 100), margin=0.5) == (0, 0, 20, 20)  # shifted inside the image
    assert mask_box(np.zeros((10, 10))) is None and mask_box(np.full((10, 10), 255)) is None
    image = Image.new("RGB", (80, 100))
    assert head_crop(image, mask).size == (26, 26)  # 20 px tall, 15 % margin on each side
    assert head_crop(image, None).size == (48, 48) and centre_box((80, 100)) == (16, 26, 64, 74)


@pytest.mark.parametrize("kind", ["dino", "clip"])
def test_a_photo_is_closer_to_itself_than_to_another_photo(embedders, kind):
    astronaut = photo(data.astronaut)
    changed = ImageEnhance.Brightness(astronaut.crop((4, 4, 124, 124)).resize((128, 128))).enhance(1.1)
    others = [photo(data.coffee), photo(data.chelsea), photo(data.rocket)]
    embeddings = embed_images(embedders[kind], [astronaut, changed, *others])  # (5, D)
    assert embeddings.shape[0] == 5 and torch.allclose(embeddings.norm(dim=-1), torch.ones(5), atol=1e-5)
    similarity = cosine_matrix(embeddings[:1], embeddings)[0]
    assert similarity[0] == pytest.approx(1.0, abs=1e-5)
    assert similarity[1] > similarity[2:].max()


def test_clip_text_embeddings_follow_the_text(embedders):
    texts = clip_text_embeddings(embedders["clip"], ["photo of ohwx man", "photo of ohwx man", "a dog and a cat on the sofa"])
    assert texts.shape == (3, 32)
    assert torch.allclose(texts[0], texts[1]) and not torch.allclose(texts[0], texts[2])
