"""Tiny SDXL-shaped, CLIPSeg, DINO and CLIP models from configs: random weights, a fixed seed, no network.

They exercise every code path of the real pipeline (two text encoders of different widths, the
SDXL `text_time` conditioning, an 8x VAE, Euler scheduling, CLIPSeg masks) on 64 px images on a
CPU in seconds. The CLIP tokenizer is built here too: a small byte-level BPE vocabulary learned
deterministically from a built-in corpus of typical prompt words, with CLIP's conventions
(lowercase, `</w>` end-of-word suffix, `<|startoftext|>` / `<|endoftext|>`, all 256 byte
characters, so any text encodes without unknown tokens).

    python -m likeness.models.tiny OUT_DIR [--seed 0]   # or: likeness tiny-models OUT_DIR

writes OUT_DIR/sdxl (a diffusers StableDiffusionXLPipeline folder), OUT_DIR/clipseg (a
CLIPSegForImageSegmentation + CLIPSegProcessor folder), OUT_DIR/dino (a ViTModel + image
processor, the evaluation's DINO) and OUT_DIR/clip (a CLIPModel + CLIPProcessor, the evaluation's
CLIP-I / CLIP-T); load them with `likeness.models.loading.load_sdxl_pipeline` / `load_clipseg` /
`load_dino` / `load_clip` like any real model. `save_tiny_sd15(OUT_DIR)` writes OUT_DIR/sd15, a tiny
SD 1.5-shaped StableDiffusionPipeline folder (one text encoder, no addition embeddings) for
`load_sd15_pipeline`.
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPSegConfig,
    CLIPSegForImageSegmentation,
    CLIPSegProcessor,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    ViTConfig,
    ViTImageProcessorPil,
    ViTModel,
)

from likeness.models.tiny_folders import BUILDER_VERSION, MARKER, is_complete, write_atomically  # noqa: F401  (re-exported)

MAX_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
TE1_WIDTH, TE2_WIDTH, TE2_PROJECTION = 32, 48, 32  # different widths: see text_encoder_configs
TIME_EMBED_DIM = 8  # addition_time_embed_dim; SDXL has 6 time ids
LATENT_SIZE, IMAGE_SIZE = 8, 64  # 4-block VAE: 8x downscale
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]

CORPUS = """
photo of ohwx man, a photo of ohwx woman, portrait photo of a person, close up of a face
a man in a black suit lying on the floor with kittens, a woman standing in a room
a person sitting on a chair by the window, head and shoulders portrait, full body photo
smiling man with a beard wearing glasses, young woman with long hair and a red dress
an old man in a white shirt, a child playing in the garden, a dog and a cat on the sofa
standing outside in the street at night, city lights, forest, beach at sunset, mountains
studio lighting, soft light, natural light, high quality, detailed skin, sharp focus
blurry, low quality, deformed, ugly, bad anatomy, extra fingers, watermark, text
head, face, hair, eyes, nose, mouth, hands, body, clothes, background, person, people
looking at the camera, side view, from above, wearing a hat, holding a cup of coffee
photo of ohwx man lying on the floor of a penthouse, surrounded by kittens, looking into the camera
blurry, grainy, low-res, cartoonish, overexposed, unrealistic, digital artifacts, unnatural lighting
over-sharpened, harsh shadows, natural lighting
"""


@dataclass(frozen=True)
class TinyModels:
    """Where `save_tiny_models` wrote the model folders."""

    sdxl: Path
    clipseg: Path
    dino: Path
    clip: Path


# --- tokenizer -----------------------------------------------------------------------------


def _byte_characters() -> list[str]:
    """GPT-2/CLIP's printable stand-ins for the 256 bytes, in CLIP's vocabulary order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def _corpus_words() -> Counter[tuple[str, ...]]:
    """Corpus words as CLIP pre-tokenizes them, each a tuple of symbols with `</w>` on the last."""
    backend = CLIPTokenizer(vocab={BOS: 0, EOS: 1}, merges=[]).backend_tokenizer
    text = backend.normalizer.normalize_str(CORPUS)
    words = Counter(word for word, _ in backend.pre_tokenizer.pre_tokenize_str(text))
    return Counter({(*w[:-1], w[-1] + "</w>"): n for w, n in words.items()})


def _merge(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(word):
        if word[i : i + 2] == pair:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def learn_merges(words: Counter[tuple[str, ...]], max_merges: int = 400) -> list[tuple[str, str]]:
    """Plain BPE: repeatedly merge the most frequent pair (ties: the smallest pair); deterministic."""
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        words = Counter({_merge(w, best): n for w, n in words.items()})
    return merges


@lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """CLIP's layout: 256 bytes, the same with `</w>`, one token per merge, then BOS and EOS."""
    merges = learn_merges(_corpus_words())
    chars = _byte_characters()
    tokens = chars + [c + "</w>" for c in chars] + [a + b for a, b in merges] + [BOS, EOS]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab, tuple(merges)


def build_clip_tokenizer(pad_token: str = EOS) -> CLIPTokenizer:
    """The project's CLIP tokenizer (~1000 tokens); SDXL's tokenizer_2 pads with "!" instead."""
    vocab, merges = _vocab_and_merges()
    # transformers 5 / tokenizers 0.23 take merges as (a, b) tuples only: "a b" strings raise TypeError.
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token=pad_token, model_max_length=MAX_LENGTH)


# --- SDXL ----------------------------------------------------------------------------------


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator for a weight init without disturbing the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def text_encoder_configs(tokenizer: CLIPTokenizer, tokenizer_2: CLIPTokenizer) -> tuple[CLIPTextConfig, CLIPTextConfig]:
    """TE1 like CLIP ViT-L (quick_gelu), TE2 like OpenCLIP bigG (gelu, projection).

    The widths differ on purpose: with equal widths diffusers' single-file loader cannot tell the
    two encoders apart and silently swaps them.
    """
    common = dict(vocab_size=len(tokenizer), num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=MAX_LENGTH, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id)
    te1 = CLIPTextConfig(hidden_size=TE1_WIDTH, intermediate_size=2 * TE1_WIDTH, hidden_act="quick_gelu",
                         pad_token_id=tokenizer.pad_token_id, projection_dim=TE1_WIDTH, **common)
    te2 = CLIPTextConfig(hidden_size=TE2_WIDTH, intermediate_size=2 * TE2_WIDTH, hidden_act="gelu",
                         pad_token_id=tokenizer_2.pad_token_id, projection_dim=TE2_PROJECTION, **common)
    return te1, te2


def build_unet() -> UNet2DConditionModel:
    """SDXL's UNet layout shrunk: (1, 4, 8, 8) latents, text (1, 77, 80), pooled (1, 32), 6 time ids."""
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64), layers_per_block=1, transformer_layers_per_block=(1, 1),
        attention_head_dim=(2, 4), use_linear_projection=True,
        cross_attention_dim=TE1_WIDTH + TE2_WIDTH,  # both encoders' hidden states, concatenated
        addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + TE2_PROJECTION,
    )


def build_vae() -> AutoencoderKL:
    """4 blocks, 3 downsamples: (1, 3, 64, 64) images <-> (1, 4, 8, 8) latents."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 64, 64), sample_size=IMAGE_SIZE, scaling_factor=0.13025,
    )


def build_scheduler() -> EulerDiscreteScheduler:
    """SDXL base 1.0's scheduler config."""
    return EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        timestep_spacing="leading", steps_offset=1, prediction_type="epsilon",
    )


def build_tiny_sdxl(seed: int = 0) -> StableDiffusionXLPipeline:
    """A complete SDXL pipeline with random weights; the same seed gives bit-identical weights."""
    tokenizer, tokenizer_2 = build_clip_tokenizer(), build_clip_tokenizer(pad_token="!")
    te1_config, te2_config = text_encoder_configs(tokenizer, tokenizer_2)
    parts: dict[str, Callable[[], torch.nn.Module]] = {
        "unet": build_unet, "vae": build_vae,
        "text_encoder": lambda: CLIPTextModel(te1_config),
        "text_encoder_2": lambda: CLIPTextModelWithProjection(te2_config),
    }
    modules = {}
    for offset, (name, build) in enumerate(parts.items()):  # one seed per part: order-independent
        with _seeded(seed * 1000 + offset):
            modules[name] = build().eval()
    return StableDiffusionXLPipeline(
        **modules, tokenizer=tokenizer, tokenizer_2=tokenizer_2, scheduler=build_scheduler(),
        force_zeros_for_empty_prompt=True, add_watermarker=False,
    )


# --- CLIPSeg -------------------------------------------------------------------------------


def clipseg_config(tokenizer: CLIPTokenizer) -> CLIPSegConfig:
    """CIDAS/clipseg-rd64-refined's layout shrunk: 352 px input, 22x22 patches, 2 decoder layers."""
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=MAX_LENGTH, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  patch_size=16, image_size=352)
    return CLIPSegConfig(
        text_config=text, vision_config=vision, projection_dim=32, extract_layers=[1, 2], reduce_dim=16,
        decoder_num_attention_heads=4, decoder_intermediate_size=32, use_complex_transposed_convolution=True,
    )


def build_tiny_clipseg(seed: int = 0) -> tuple[CLIPSegForImageSegmentation, CLIPSegProcessor]:
    """CLIPSeg with random weights and its processor.

    For B (image, prompt) pairs the logits are (B, 352, 352): the decoder upsamples the 22x22
    patch grid 16x (transformers squeezes only the channel axis, so B=1 gives (1, 352, 352)).
    """
    tokenizer = build_clip_tokenizer()
    with _seeded(seed * 1000 + 100):
        model = CLIPSegForImageSegmentation(clipseg_config(tokenizer)).eval()
    # The PIL backend needs no torchvision; the saved config loads with whichever backend is installed.
    images = ViTImageProcessorPil(do_resize=True, size={"height": 352, "width": 352}, resample=2,
                                  do_rescale=True, do_normalize=True, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
    return model, CLIPSegProcessor(image_processor=images, tokenizer=tokenizer)


# --- DINO and CLIP (evaluation) -------------------------------------------------------------


EMBED_IMAGE_SIZE, EMBED_PATCH = 64, 8  # 8x8 patches: real DINO/CLIP use 224 px, 16 / 14 px patches


def build_tiny_dino(seed: int = 0) -> tuple[ViTModel, ViTImageProcessorPil]:
    """facebook/dino-vits16's layout shrunk (no pooler: the metric reads the CLS token), and its processor."""
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                       image_size=EMBED_IMAGE_SIZE, patch_size=EMBED_PATCH, qkv_bias=True)
    with _seeded(seed * 1000 + 200):
        model = ViTModel(config, add_pooling_layer=False).eval()
    processor = ViTImageProcessorPil(do_resize=True, size={"height": EMBED_IMAGE_SIZE, "width": EMBED_IMAGE_SIZE},
                                     resample=3, do_rescale=True, do_normalize=True,
                                     image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
    return model, processor


def build_tiny_clip(seed: int = 0) -> tuple[CLIPModel, CLIPProcessor]:
    """openai/clip-vit-large-patch14's layout shrunk (image and text towers, 32-d projections), and its processor."""
    tokenizer = build_clip_tokenizer()
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=MAX_LENGTH, hidden_act="quick_gelu",
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=EMBED_IMAGE_SIZE, patch_size=EMBED_PATCH, hidden_act="quick_gelu")
    with _seeded(seed * 1000 + 300):
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)).eval()
    images = CLIPImageProcessorPil(size={"shortest_edge": EMBED_IMAGE_SIZE},
                                   crop_size={"height": EMBED_IMAGE_SIZE, "width": EMBED_IMAGE_SIZE})
    return model, CLIPProcessor(image_processor=images, tokenizer=tokenizer)


# --- saving --------------------------------------------------------------------------------


def _save_sdxl(folder: Path, seed: int) -> None:
    build_tiny_sdxl(seed).save_pretrained(folder)


def _save_clipseg(folder: Path, seed: int) -> None:
    model, processor = build_tiny_clipseg(seed)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def _save_pair(build: Callable[[int], tuple]) -> Callable[[Path, int], None]:
    def save(folder: Path, seed: int) -> None:
        model, processor = build(seed)
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
    return save


def save_tiny_models(out_dir: Path, seed: int = 0) -> TinyModels:
    """Write out_dir/sdxl, clipseg, dino and clip; complete folders of the same seed are reused."""
    out_dir = Path(out_dir)
    return TinyModels(
        sdxl=write_atomically(out_dir / "sdxl", "sdxl", seed, _save_sdxl),
        clipseg=write_atomically(out_dir / "clipseg", "clipseg", seed, _save_clipseg),
        dino=write_atomically(out_dir / "dino", "dino", seed, _save_pair(build_tiny_dino)),
        clip=write_atomically(out_dir / "clip", "clip", seed, _save_pair(build_tiny_clip)),
    )


# --- SD 1.5 --------------------------------------------------------------------------------


SD15_TE_WIDTH = 48  # one encoder: the UNet's cross_attention_dim


def build_sd15_unet() -> UNet2DConditionModel:
    """SD 1.5's UNet layout shrunk: (1, 4, 8, 8) latents, text (1, 77, 48), no addition embeddings."""
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=(2, 4),
        cross_attention_dim=SD15_TE_WIDTH,  # SD 1.5: conv proj_in/proj_out (no linear projection)
    )


def build_sd15_scheduler() -> PNDMScheduler:
    """SD 1.5's scheduler config (PNDM, scaled_linear 0.00085-0.012, leading, offset 1)."""
    return PNDMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        timestep_spacing="leading", steps_offset=1, skip_prk_steps=True, set_alpha_to_one=False,
        prediction_type="epsilon",
    )


def build_tiny_sd15(seed: int = 0) -> StableDiffusionPipeline:
    """A complete SD 1.5-shaped pipeline (one CLIP ViT-L-like encoder, VAE scale 0.18215), random weights."""
    tokenizer = build_clip_tokenizer()
    te_config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=SD15_TE_WIDTH, intermediate_size=2 * SD15_TE_WIDTH,
        num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=MAX_LENGTH, hidden_act="quick_gelu",
        projection_dim=SD15_TE_WIDTH, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    parts: dict[str, Callable[[], torch.nn.Module]] = {
        "unet": build_sd15_unet, "vae": build_vae, "text_encoder": lambda: CLIPTextModel(te_config),
    }
    modules = {}
    for offset, (name, build) in enumerate(parts.items()):
        with _seeded(seed * 1000 + 500 + offset):
            modules[name] = build().eval()
    modules["vae"].register_to_config(scaling_factor=0.18215)
    return StableDiffusionPipeline(**modules, tokenizer=tokenizer, scheduler=build_sd15_scheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _save_sd15(folder: Path, seed: int) -> None:
    build_tiny_sd15(seed).save_pretrained(folder)


def save_tiny_sd15(out_dir: Path, seed: int = 0) -> Path:
    """Write out_dir/sd15 (a diffusers StableDiffusionPipeline folder); a complete one of the same seed is reused."""
    return write_atomically(Path(out_dir) / "sd15", "sd15", seed, _save_sd15)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write tiny random SDXL, CLIPSeg, DINO and CLIP models (no network).")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    built = save_tiny_models(args.out_dir, seed=args.seed)
    print(f"SDXL pipeline: {built.sdxl}\nCLIPSeg:       {built.clipseg}\nDINO:          {built.dino}\nCLIP:          {built.clip}")


if __name__ == "__main__":
    main()
