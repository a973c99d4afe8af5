"""Stage 7, latent cache: VAE latents of every prepared image and frozen text-encoder outputs.

Per image variation (`concept.image_variations`, 1 by default), `cache/latents/<key>.safetensors` holds
    latent  (4, H/8, W/8) float32: the VAE's latent distribution *mode*, unscaled (multiply by
            vae.config.scaling_factor at train time); the VAE runs in float32
    mask    (1, H/8, W/8) float32 in 0..1: the mask downscaled 1/8 (bilinear, antialias);
            absent when the image has no mask (= all ones)
key = sha256(stage version, prepared image bytes hash, mask bytes hash, VAE weights hash, training size,
and only when the concept has augmentations: their settings, the fill colour, and when they draw
at random (seed, image id, variation)). A variation is the prepared image cropped to its training
size (bucket mode: centred, or jittered) and augmented (likeness/augment.py); without random
augmentations every variation is the same file, encoded once.

Per distinct caption, `cache/text/<key>.safetensors` holds the outputs of the text encoders that
are frozen (`training.text_encoder(_2).train = false`; TE2 only by default):
    text_encoder_hidden    (77, D1)  TE1 hidden_states[-(2 + clip_skip)] (penultimate by default)
    text_encoder_2_hidden  (77, D2)  TE2 hidden_states[-(2 + clip_skip)]
    text_encoder_2_pooled  (P,)      TE2's projected pooled output
in the encoder's weight dtype, computed by `conditioning.encode_text` (the one copy training and
sampling use); key = sha256(stage version, caption, each frozen encoder's weights + tokenizer hash,
clip skip, dtype). Identical content shares one file. SD 1.5 (`settings_family`) has one encoder: only
`text_encoder_hidden`, from `conditioning.encode_text_sd15` (last layer, final layer norm), when
text_encoder.train is false. The VAE's scaling factor is read from its config at train time.

`workspace/latents.csv` maps the manifest to them, one row per (image, image variation, text variation):
id, variation (the text variation), caption, latent_path, text_path (empty when no encoder is
frozen), image_variation, bucket (`WxH`), and SDXL's time ids: original_height/width,
crop_top/left, target_height/width (the training size). Bucket mode: the photo's size and this
variation's crop in the scaled image. Pad mode, by default (`resize.pad_time_ids = "padded"`):
the padded square itself, (T, T, 0, 0, T, T), as OneTrainer conditions its pre-padded files and
as inference clients generate; with "original": the photo's size and the manifest's paste offset. Epoch e trains on image variation
e % image_variations and text variation e % text_variations (`epoch_rows`).

    result = latents_stage(manifest_result, settings, ws, ws.hashes())
    latents, masks = load_latents(batch["latent_path"])      # for training: (B, 4, h, w), (B, 1, h, w)
    cached = load_text_outputs(batch["text_path"])           # {"text_encoder_2": EncoderOutput, ...}
    rows = epoch_rows(read_latents_index(ws.latents_index), epoch)  # one row per id for this epoch
    add_time_ids = index_time_ids(rows.loc[ids])                     # (B, 6)
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from PIL import Image, ImageColor
from prefect import get_run_logger, task

from likeness.augment import Augmented, augment, is_active, is_random, variation_rng
from likeness.buckets import Bucket
from likeness.content import HashIndex, bytes_digest, digest_parts, model_fingerprint
from likeness.files import write_atomic
from likeness.latent_index import ENCODERS, INDEX_COLUMNS, TIME_ID_COLUMNS, frozen_encoders, settings_family
from likeness.manifest import bucket_of, read_manifest
from likeness.settings import ImageAugmentations, Settings
from likeness.stages import Counts, ItemRecords, Progress, Row, StageResult, map_cached, write_table
from likeness.tasks.common import StagePolicy, progress
from likeness.workspace import Workspace

if TYPE_CHECKING:  # torch is imported where tensors are made: a cached run does not pay for it
    import torch

LATENTS_VERSION = 2  # 2: image variations, bucket crops, time-id columns
INDEX_VERSION = 2  # latents.csv alone (the cached tensors are unchanged): 2: pad-mode time ids of the padded square


def image_tensor(image: str | Path | Image.Image) -> torch.Tensor:
    """(3, H, W) float32 in [-1, 1], from a file or an image."""
    image = image if isinstance(image, Image.Image) else Image.open(image)
    import torch

    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def mask_tensor(mask: str | Path | Image.Image) -> torch.Tensor:
    """(1, H, W) float32 in [0, 1], from a file or an image."""
    import torch

    mask = mask if isinstance(mask, Image.Image) else Image.open(mask)
    return torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)[None]


def encode_images(vae, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, 4, H/8, W/8): the latent distribution's mode, unscaled."""
    import torch

    with torch.no_grad():
        return vae.encode(images.to(vae.device, vae.dtype)).latent_dist.mode().float().cpu()


def downscale_masks(masks: torch.Tensor, factor: int = 8) -> torch.Tensor:
    """(B, 1, H, W) -> (B, 1, H/8, W/8), bilinear with antialiasing (as OneTrainer)."""
    import torch.nn.functional as F

    size = (masks.shape[-2] // factor, masks.shape[-1] // factor)
    return F.interpolate(masks, size=size, mode="bilinear", antialias=True, align_corners=False)


# --- loading ---------------------------------------------------------------------------------


@dataclass
class Encoders:
    vae: object | None = None
    text: dict[str, tuple[object, object]] | None = None  # part -> (tokenizer, encoder)


def load_encoders(settings: Settings, need_vae: bool, parts: list[str], device: str) -> Encoders:
    """Only the components needed (no UNet), from a diffusers folder / hub id or a single file."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    from likeness.models.loading import (
        check_diffusers_sd15_folder,
        check_diffusers_sdxl_folder,
        is_single_file,
        load_pipeline,
    )
    from likeness.models.devices import resolve_device

    base, resolved, family = settings.model.base_model, resolve_device(device), settings_family(settings)
    dtypes = {part: getattr(torch, getattr(settings.training, part).weight_dtype) for part in parts}
    if is_single_file(base):  # components cannot be read alone from an original-layout file
        pipe = load_pipeline(base, family, config=settings.model.config, torch_dtype=torch.float32)
        vae = pipe.vae if need_vae else None
        text = {p: (getattr(pipe, ENCODERS[p][1]), getattr(pipe, p).to(dtypes[p])) for p in parts}
    else:
        if Path(base).is_dir():
            (check_diffusers_sd15_folder if family == "sd15" else check_diffusers_sdxl_folder)(Path(base))
        vae = AutoencoderKL.from_pretrained(base, subfolder="vae", dtype=torch.float32) if need_vae else None
        classes = {"text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection}
        text = {p: (AutoTokenizer.from_pretrained(base, subfolder=ENCODERS[p][1]),
                    classes[p].from_pretrained(base, subfolder=p, dtype=dtypes[p])) for p in parts}
    if vae is not None:
        vae = vae.to(resolved).eval()  # loaded in float32
    text = {p: (tok, enc.to(resolved).eval()) for p, (tok, enc) in text.items()}
    return Encoders(vae, text)


# --- the stage -------------------------------------------------------------------------------


def fingerprints(settings: Settings, index: HashIndex) -> dict:
    """What the cache keys record of the model: the VAE's and each frozen encoder's content."""
    base = settings.model.base_model
    config = model_fingerprint(settings.model.config, index) if settings.model.config else None
    text = {p: (model_fingerprint(base, index, ENCODERS[p][:2]), getattr(settings.training, p).clip_skip,
                getattr(settings.training, p).weight_dtype) for p in frozen_encoders(settings)}
    prints = {"vae": (model_fingerprint(base, index, ("vae",)), config), "text": (text, config),
              "resolution": settings.resize.resolution}
    if settings_family(settings) == "sd15":  # SD 1.5 encodes text differently; SDXL keys stay as they were
        prints["text"] = (text, config, "sd15")
    return prints


def latents_key(manifest: StageResult, settings: Settings, ws: Workspace) -> str:
    index = ws.hashes()
    key = digest_parts("latents", LATENTS_VERSION, manifest.table_digest, fingerprints(settings, index),
                       variation_plan(settings), settings.resize.mode, INDEX_VERSION, _pad_time_ids(settings))
    index.save()
    return key


def latents_stage(manifest: StageResult, settings: Settings, ws: Workspace, index: HashIndex,
                  device: str = "auto", progress: Progress | None = None) -> StageResult:
    """Encode what the cache lacks (models load only then); write `latents.csv` and the stage table."""
    df = read_manifest(ws.manifest, ws)
    prints, parts = fingerprints(settings, index), frozen_encoders(settings)
    rows = df.to_dict("records")
    items = image_variations(rows, settings)
    latent_rows, counts = _cache_images(items, settings, prints, ws, index, device, progress)
    captions = sorted({line for caption in df["caption"] for line in caption.split("\n")}) if parts else []
    text_rows, text_counts = _cache_captions(captions, settings, parts, prints, ws, index, device)
    text_files = {caption: row["text_file"] for caption, row in zip(captions, text_rows, strict=True)}
    outputs = {str(ws.latents_index): _write_index(ws, index, rows, items, latent_rows, text_files,
                                                   pad=_pad_time_ids(settings))}
    for row in latent_rows + text_rows:
        outputs.update(row["outputs"])
    result = write_table(ws, "latents", LATENTS_VERSION, [], counts, outputs=outputs,
                         extra={"text_processed": text_counts.processed, "text_reused": text_counts.reused})
    index.save()
    return result


def variation_plan(settings: Settings) -> dict:
    """Per concept, what its image variations depend on beyond the images: count, augmentations, seed."""
    return {c.name: (c.image_variations, _augmentation_key(c.augmentations, settings)) for c in settings.concepts}


def _augmentation_key(aug: ImageAugmentations, settings: Settings) -> tuple | None:
    if not is_active(aug):
        return None
    return aug.model_dump(mode="json"), settings.resize.background, settings.run.seed if is_random(aug) else None


def image_variations(rows: list[Row], settings: Settings) -> list[Row]:
    """One item per (manifest row, image variation), with its training size and augmentations."""
    concepts = {c.name: c for c in settings.concepts}
    items = []
    for row in rows:
        concept = concepts.get(row["concept"])
        aug = concept.augmentations if concept else ImageAugmentations()
        for variation in range(concept.image_variations if concept else 1):
            items.append({**row, "image_variation": variation, "target": bucket_of(row), "augmentations": aug})
    return items


def _cache_images(items: list[Row], settings: Settings, prints: dict, ws: Workspace, index: HashIndex, device: str,
                  progress: Progress | None) -> tuple[list[Row], Counts]:
    """Latent rows for `items`, in order; identical keys (variations without randomness) are encoded once."""
    vae = cache(lambda: load_encoders(settings, need_vae=True, parts=[], device=device).vae)
    unique: dict[str, Row] = {}
    for item in items:
        aug = _augmentation_key(item["augmentations"], settings)
        random_draw = (item["id"], item["image_variation"]) if is_random(item["augmentations"]) else None
        item["key"] = digest_parts(LATENTS_VERSION, item["prepared_hash"], item["mask_hash"], prints["vae"],
                                   item["target"], aug, random_draw)
        unique.setdefault(item["key"], item)
    # Grouped by training size, so a VAE batch mostly holds one size.
    todo = sorted(unique.values(), key=lambda item: item["target"])
    done, counts = map_cached(todo, lambda item: item["key"],
                              lambda batch: _encode_images(batch, vae(), settings, ws, index),
                              ItemRecords(ws.item_records("latents"), index, ws), settings.latents.batch_size, progress)
    by_key = {item["key"]: row for item, row in zip(todo, done, strict=True)}
    return [by_key[item["key"]] for item in items], counts


def _cache_captions(captions: list[str], settings: Settings, parts: list[str], prints: dict, ws: Workspace,
                    index: HashIndex, device: str) -> tuple[list[Row], Counts]:
    # A second load for a single-file checkpoint (it is read whole); folders load each component alone.
    encoders = cache(lambda: load_encoders(settings, need_vae=False, parts=parts, device=device).text)

    def key(row: Row) -> str:
        return digest_parts(LATENTS_VERSION, row["caption"], prints["text"])

    return map_cached([{"caption": c} for c in captions], key,
                      lambda batch: _encode_captions(batch, encoders(), settings, ws, index, key),
                      ItemRecords(ws.item_records("text"), index, ws), settings.latents.batch_size)


def _pad_time_ids(settings: Settings) -> str | None:
    """"padded" or "original" in pad mode; None in bucket mode (time ids of the photo and the crop)."""
    return settings.resize.pad_time_ids if settings.resize.mode == "pad" else None


def time_id_values(row: Row, latent: Row, target: Bucket, pad: str | None) -> list[int]:
    """original (h, w), crop (top, left), target (h, w) of one image variation."""
    if pad == "padded":
        return [target.height, target.width, 0, 0, target.height, target.width]
    crop = (row["offset_top"], row["offset_left"]) if pad == "original" else (latent["crop_top"], latent["crop_left"])
    return [row["original_height"], row["original_width"], *crop, target.height, target.width]


def _write_index(ws: Workspace, index: HashIndex, rows: list[Row], items: list[Row], latent_rows: list[Row],
                 text_files: dict[str, str], pad: str | None) -> str:
    """`latents.csv`: one row per (image, image variation, text variation); returns the sha256 of the file."""
    latents_by_id = defaultdict(list)
    for item, latent in zip(items, latent_rows, strict=True):
        latents_by_id[item["id"]].append((item["image_variation"], latent))
    table = []
    for row in rows:
        target = Bucket.parse(bucket_of(row))
        for image_variation, latent in sorted(latents_by_id[row["id"]], key=lambda pair: pair[0]):
            sizes = time_id_values(row, latent, target, pad)
            table += [{"id": row["id"], "variation": v, "caption": caption, "latent_path": ws.relative(latent["latent_file"]),
                       "text_path": ws.relative(text_files[caption]) if caption in text_files else "",
                       "image_variation": image_variation,
                       "bucket": target.key, **dict(zip(TIME_ID_COLUMNS, map(int, sizes), strict=True))}
                      for v, caption in enumerate(row["caption"].split("\n"))]
    data = pd.DataFrame(table, columns=INDEX_COLUMNS).to_csv(index=False, lineterminator="\n").encode("utf-8")
    write_atomic(ws.latents_index, data)
    index.remember(ws.latents_index, bytes_digest(data))
    return bytes_digest(data)


def make_variation(item: Row, seed: int, fill: tuple[int, int, int] = (255, 255, 255)) -> Augmented:
    """The pixels of one image variation: the prepared image (and mask) cropped to size and augmented."""
    image = Image.open(item["prepared_path"]).convert("RGB")
    mask = Image.open(item["mask_path"]).convert("L") if item["mask_path"] else None
    rng = variation_rng(seed, item["id"], item["image_variation"])
    return augment(image, mask, item["augmentations"], Bucket.parse(item["target"]), rng, fill)


def _encode_images(batch: list[Row], vae, settings: Settings, ws: Workspace, index: HashIndex) -> list[Row]:
    import torch

    fill = ImageColor.getrgb(settings.resize.background)[:3]
    variations = [make_variation(item, settings.run.seed, fill) for item in batch]
    by_size = defaultdict(list)
    for i, variation in enumerate(variations):
        by_size[variation.image.size].append(i)
    latents: list[torch.Tensor | None] = [None] * len(batch)
    for members in by_size.values():  # the VAE takes one size per call
        encoded = encode_images(vae, torch.stack([image_tensor(variations[i].image) for i in members]))
        for i, latent in zip(members, encoded, strict=True):
            latents[i] = latent  # (4, H/8, W/8)
    out = []
    for item, variation, latent in zip(batch, variations, latents, strict=True):
        tensors = {"latent": latent.contiguous()}
        if variation.mask is not None:
            tensors["mask"] = downscale_masks(mask_tensor(variation.mask)[None])[0].contiguous()
        row = _write(ws.latent_cache / f"{item['key']}.safetensors", tensors, index, "latent_file")
        out.append({**row, "crop_left": variation.crop_left, "crop_top": variation.crop_top})
    return out


def _encode_captions(batch: list[Row], text: dict, settings: Settings, ws: Workspace, index: HashIndex, key) -> list[Row]:
    from likeness.models.conditioning import encode_text, encode_text_sd15

    captions = [row["caption"] for row in batch]
    tensors: list[dict[str, torch.Tensor]] = [{} for _ in batch]
    encode = encode_text_sd15 if settings_family(settings) == "sd15" else encode_text
    for part, (tokenizer, encoder) in text.items():
        out = encode(encoder, tokenizer, captions, getattr(settings.training, part).clip_skip)
        for i in range(len(batch)):
            tensors[i][f"{part}_hidden"] = out.hidden[i].cpu().contiguous()  # (77, W)
            if part == "text_encoder_2" and out.pooled is not None:
                tensors[i][f"{part}_pooled"] = out.pooled[i].cpu().contiguous()  # (P,)
    return [_write(ws.text_cache / f"{key(row)}.safetensors", t, index, "text_file")
            for row, t in zip(batch, tensors, strict=True)]


def _write(path: Path, tensors: dict[str, torch.Tensor], index: HashIndex, name: str) -> Row:
    from safetensors.torch import save

    data = save(tensors, metadata={"format": "pt", "likeness_version": str(LATENTS_VERSION)})
    digest = bytes_digest(data)
    write_atomic(path, data)
    index.remember(path, digest)
    return {name: str(path), "outputs": {str(path): digest}}


# --- Prefect task ----------------------------------------------------------------------------


@task(name="cache-latents", cache_policy=StagePolicy(key_fn=latents_key))
def cache_latents(manifest: StageResult, settings: Settings, ws: Workspace, device: str = "auto") -> StageResult:
    """Latents + downscaled masks per image and text-encoder outputs per caption, keyed by content."""
    result = latents_stage(manifest, settings, ws, ws.hashes(), device, progress("latents"))
    get_run_logger().info(result.summary())
    return ws.portable(result)
