"""Image and text embeddings for the evaluation scores, head crops, and the cosine metrics.

The metrics are DreamBooth's (Ruiz et al. 2023, section 4.1):
- DINO: mean pairwise cosine similarity of DINO ViT CLS embeddings of generated and real images;
- CLIP-I: the same with CLIP image embeddings;
- CLIP-T: mean cosine similarity of each generated image's CLIP embedding with its prompt's.
DINO and CLIP-I measure likeness, on head crops: the box of the person's mask on a training
photo; on a generated image the box of a CLIPSeg head mask, or a centre crop when it finds none.

Every embedding function takes a loaded `Embedder` and images (or texts) and returns (N, D) unit
vectors; models load through `likeness/models/loading.py` (hub ids or folders, tiny ones in tests).

    dino = load_embedder("dino", "facebook/dino-vits16", device)
    similarity = mean_pairwise_similarity(embed_images(dino, generated), embed_images(dino, photos))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

Box = tuple[int, int, int, int]  # (left, top, right, bottom), Pillow's crop box
CROP_MARGIN = 0.15  # grow a head box by this fraction of its side on each side
CENTRE_FRACTION = 0.6  # the fallback crop: the central 60 % square
FULL_ABOVE = 0.9  # a "head" mask covering more than this is no head box


@dataclass
class Embedder:
    """A loaded embedding model: `kind` is dino or clip."""

    kind: str
    model: Any
    processor: Any
    device: torch.device


def load_embedder(kind: str, name: str, device: torch.device) -> Embedder:
    from likeness.models.loading import load_clip, load_dino

    loaders: dict[str, Callable] = {"dino": load_dino, "clip": load_clip}
    model, processor = loaders[kind](name)
    return Embedder(kind, model.to(device), processor, device)


# --- embeddings ------------------------------------------------------------------------------


@torch.no_grad()
def dino_image_embeddings(embedder: Embedder, images: Sequence[Image.Image]) -> torch.Tensor:
    """(N, D) unit CLS-token embeddings of a DINO ViT."""
    inputs = embedder.processor(images=[i.convert("RGB") for i in images], return_tensors="pt")
    hidden = embedder.model(pixel_values=inputs["pixel_values"].to(embedder.device)).last_hidden_state  # (N, 1 + P, D)
    return F.normalize(hidden[:, 0].float(), dim=-1).cpu()


@torch.no_grad()
def clip_image_embeddings(embedder: Embedder, images: Sequence[Image.Image]) -> torch.Tensor:
    """(N, D) unit CLIP image embeddings (the projected pooled output)."""
    inputs = embedder.processor(images=[i.convert("RGB") for i in images], return_tensors="pt")
    out = embedder.model.get_image_features(pixel_values=inputs["pixel_values"].to(embedder.device))
    return F.normalize(_features(out).float(), dim=-1).cpu()


@torch.no_grad()
def clip_text_embeddings(embedder: Embedder, texts: Sequence[str]) -> torch.Tensor:
    """(N, D) unit CLIP text embeddings; texts longer than 77 tokens are truncated."""
    inputs = embedder.processor(text=list(texts), padding=True, truncation=True, max_length=77, return_tensors="pt")
    out = embedder.model.get_text_features(**{k: v.to(embedder.device) for k, v in inputs.items()})
    return F.normalize(_features(out).float(), dim=-1).cpu()


def _features(out: Any) -> torch.Tensor:
    """transformers 5 returns a model output whose pooler_output is the projection; 4.x a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def embed_images(embedder: Embedder, images: Sequence[Image.Image], batch_size: int = 16) -> torch.Tensor:
    embed = dino_image_embeddings if embedder.kind == "dino" else clip_image_embeddings
    return torch.cat([embed(embedder, images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


# --- metrics ---------------------------------------------------------------------------------


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, M) cosine similarities of (N, D) and (M, D) embeddings (normalised here)."""
    return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T


def mean_pairwise_similarity(generated: torch.Tensor, reference: torch.Tensor) -> float:
    """DINO / CLIP-I: the mean cosine similarity over every (generated, reference) pair."""
    if len(generated) == 0 or len(reference) == 0:
        raise ValueError("likeness needs at least one generated image and one training photo")
    return float(cosine_matrix(generated, reference).mean())


def mean_paired_similarity(images: torch.Tensor, texts: torch.Tensor) -> float:
    """CLIP-T: the mean cosine similarity of image i with text i."""
    if images.shape != texts.shape or len(images) == 0:
        raise ValueError(f"clip_t needs one text per image, got {tuple(images.shape)} and {tuple(texts.shape)}")
    return float(cosine_matrix(images, texts).diagonal().mean())


# --- head crops ------------------------------------------------------------------------------


def mask_box(mask: np.ndarray) -> Box | None:
    """The bounding box of a mask's nonzero pixels; None when it is empty or covers almost everything."""
    on = np.asarray(mask) > 0
    if not on.any() or on.mean() > FULL_ABOVE:
        return None
    rows, cols = np.flatnonzero(on.any(axis=1)), np.flatnonzero(on.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def square_box(box: Box, size: tuple[int, int], margin: float = CROP_MARGIN) -> Box:
    """A square around `box`'s centre, `margin` larger on each side, shifted (and shrunk) to fit the image."""
    width, height = size
    left, top, right, bottom = box
    side = min(int(round(max(right - left, bottom - top) * (1 + 2 * margin))), width, height)
    cx, cy = (left + right) / 2, (top + bottom) / 2
    x0 = int(round(min(max(cx - side / 2, 0), width - side)))
    y0 = int(round(min(max(cy - side / 2, 0), height - side)))
    return x0, y0, x0 + side, y0 + side


def centre_box(size: tuple[int, int], fraction: float = CENTRE_FRACTION) -> Box:
    width, height = size
    side = max(1, int(min(width, height) * fraction))
    x0, y0 = (width - side) // 2, (height - side) // 2
    return x0, y0, x0 + side, y0 + side


def head_crop(image: Image.Image, mask: np.ndarray | None) -> Image.Image:
    """The head of `image`: the square around its mask's box, or the centre crop without one."""
    box = mask_box(mask) if mask is not None else None
    return image.crop(square_box(box, image.size) if box else centre_box(image.size))


def clipseg_head_masks(images: Sequence[Image.Image], clipseg: tuple, mask_settings: Any) -> list[np.ndarray]:
    """uint8 (H, W) head masks of generated images with the prepare stage's CLIPSeg algorithm."""
    from likeness.tasks.masks import segment

    model, processor, device = clipseg
    return segment([i.convert("RGB") for i in images], model, processor, mask_settings, device)

