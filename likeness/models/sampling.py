"""Sampler names to diffusers schedulers, and image generation through the shared conditioning.

Two vocabularies, each keeping its own meaning (reference/stack-notes.md, "Sampler names"):
OneTrainer's names (`DPMPP_SDE_KARRAS` is DPMSolverMultistepScheduler with
`algorithm_type="sde-dpmsolver++"` and Karras sigmas) and AUTOMATIC1111's ("DPM++ SDE Karras" is
DPMSolverSDEScheduler with Karras sigmas, which needs `torchsde`; its multistep cousin is
"DPM++ 2M SDE Karras"). Schedulers are built `from_config` of the model's own scheduler config,
so the base model's beta schedule, prediction type and timestep spacing carry over.

`generate` encodes prompts with `likeness.models.conditioning` (the code training uses), through
`likeness.models.prompt_weights` (A1111 weights such as `(ohwx man:1.2)`, prompts past 77 tokens;
plain short prompts encode bit-identically), and hands the embeddings to the diffusers pipeline.
Each image gets its own CPU generator seeded with its seed, so an image depends on (weights,
prompt, seed, settings) only: not on the batch it was in, nor the device. The negative prompt is always encoded as text, an empty one too.
A StableDiffusionPipeline (SD 1.5) works the same way with its one text encoder (`clip_skip_1`;
SD 1.5's conditioning, `conditioning.encode_tokens_sd15`) and no pooled embeddings.

    images = generate(pipe, ["photo of ohwx man"], [""], [42], steps=40, cfg=7.0,
                      sampler="DPMPP_SDE_KARRAS", resolution=1024)
    save_sample(images[0], folder / sample_filename(step=1200, epoch=16, index=0, ext="jpg"))
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import diffusers
import torch
from PIL import Image

from likeness.files import atomic_path
from likeness.models.conditioning import encode_tokens_sd15
from likeness.models.prompt_weights import (
    apply_weights,
    count_chunks,
    encode_prompt_pair,
    parse_prompt,
    tokenize_weighted,
)

IMAGE_FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}


class Sampler(NamedTuple):
    scheduler: str  # a diffusers scheduler class name
    options: Mapping[str, Any] = {}
    needs_torchsde: bool = False


_MULTISTEP, _SDE_MULTISTEP = {"algorithm_type": "dpmsolver++"}, {"algorithm_type": "sde-dpmsolver++"}
KARRAS, NO_KARRAS = {"use_karras_sigmas": True}, {"use_karras_sigmas": False}

SAMPLERS: dict[str, Sampler] = {
    # OneTrainer's names, OneTrainer's meaning (modules/util/create.py, create_noise_scheduler)
    "DDIM": Sampler("DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": False}),
    "EULER": Sampler("EulerDiscreteScheduler", NO_KARRAS),
    "EULER_A": Sampler("EulerAncestralDiscreteScheduler"),
    "DPMPP": Sampler("DPMSolverMultistepScheduler", _MULTISTEP | NO_KARRAS),
    "DPMPP_SDE": Sampler("DPMSolverMultistepScheduler", _SDE_MULTISTEP | NO_KARRAS),
    "UNIPC": Sampler("UniPCMultistepScheduler", NO_KARRAS),
    "EULER_KARRAS": Sampler("EulerDiscreteScheduler", KARRAS),
    "DPMPP_KARRAS": Sampler("DPMSolverMultistepScheduler", _MULTISTEP | KARRAS),
    "DPMPP_SDE_KARRAS": Sampler("DPMSolverMultistepScheduler", _SDE_MULTISTEP | KARRAS),
    "DPMPP_2M_KARRAS": Sampler("DPMSolverMultistepScheduler", _MULTISTEP | KARRAS),
    "UNIPC_KARRAS": Sampler("UniPCMultistepScheduler", KARRAS),
    # AUTOMATIC1111's names, A1111's meaning (as diffusers' scheduler docs map them)
    "Euler": Sampler("EulerDiscreteScheduler", NO_KARRAS),
    "Euler a": Sampler("EulerAncestralDiscreteScheduler"),
    "DPM++ 2M": Sampler("DPMSolverMultistepScheduler", _MULTISTEP | NO_KARRAS),
    "DPM++ 2M Karras": Sampler("DPMSolverMultistepScheduler", _MULTISTEP | KARRAS),
    "DPM++ SDE": Sampler("DPMSolverSDEScheduler", NO_KARRAS, needs_torchsde=True),
    "DPM++ SDE Karras": Sampler("DPMSolverSDEScheduler", KARRAS, needs_torchsde=True),
    "DPM++ 2M SDE": Sampler("DPMSolverMultistepScheduler", _SDE_MULTISTEP | NO_KARRAS),
    "DPM++ 2M SDE Karras": Sampler("DPMSolverMultistepScheduler", _SDE_MULTISTEP | KARRAS),
    "UniPC": Sampler("UniPCMultistepScheduler", NO_KARRAS),
}


def torchsde_available() -> bool:
    return importlib.util.find_spec("torchsde") is not None


def check_sampler(name: str) -> Sampler:
    """The sampler called `name`; a clear error for unknown names or a missing torchsde (check early)."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler: unknown name {name!r}; use one of {', '.join(repr(n) for n in SAMPLERS)}")
    sampler = SAMPLERS[name]
    if sampler.needs_torchsde and not torchsde_available():
        raise ImportError(
            f"sampler {name!r} (A1111's meaning: diffusers' DPMSolverSDEScheduler) needs the torchsde package: "
            f"`pip install torchsde`, or pick {name.replace('SDE', '2M SDE')!r} or OneTrainer's "
            f"{'DPMPP_SDE_KARRAS' if 'Karras' in name else 'DPMPP_SDE'!r}, which need nothing extra")
    return sampler


def make_scheduler(name: str, base_config: Mapping[str, Any], seed: int | None = None) -> Any:
    """A fresh diffusers scheduler for `name`, built from the model's scheduler config.

    `seed` seeds DPMSolverSDEScheduler's Brownian tree, which ignores the pipeline's generator.
    """
    sampler = check_sampler(name)
    options = dict(sampler.options)
    if sampler.scheduler == "DPMSolverSDEScheduler":
        options["noise_sampler_seed"] = seed
    return getattr(diffusers, sampler.scheduler).from_config(base_config, **options)


def sample_filename(step: int, epoch: int, index: int, ext: str = "jpg") -> str:
    """`step0001200-epoch0016-00.jpg`: sorts by step; step and epoch in the name."""
    ext = ext.lower().lstrip(".")
    if ext not in IMAGE_FORMATS:
        raise ValueError(f"sampling.image_format: unknown image format {ext!r}; use one of {', '.join(IMAGE_FORMATS)}")
    return f"step{step:07d}-epoch{epoch:04d}-{index:02d}.{ext}"


def save_sample(image: Image.Image, path: str | Path, quality: int = 95) -> Path:
    """Write an image atomically, its format from the suffix."""
    path = Path(path)
    fmt = IMAGE_FORMATS.get(path.suffix.lower().lstrip("."))
    if fmt is None:
        raise ValueError(f"{path}: unknown image suffix; use one of {', '.join('.' + e for e in IMAGE_FORMATS)}")
    with atomic_path(path) as tmp:
        image.convert("RGB").save(tmp, format=fmt, **({"quality": quality} if fmt != "PNG" else {}))
    return path


def generate(
    pipe: Any,
    prompts: Sequence[str],
    negative_prompts: Sequence[str] | None,
    seeds: Sequence[int],
    *,
    steps: int = 40,
    cfg: float = 7.0,
    sampler: str = "DPMPP_SDE_KARRAS",
    resolution: int | tuple[int, int] = 1024,
    clip_skip_1: int = 0,
    clip_skip_2: int = 0,
) -> list[Image.Image]:
    """One PIL image per (prompt, negative prompt, seed); the pipeline's modes and scheduler are restored after."""
    negative_prompts = list(negative_prompts) if negative_prompts is not None else [""] * len(prompts)
    if not len(prompts) == len(negative_prompts) == len(seeds):
        raise ValueError(f"generate: {len(prompts)} prompts, {len(negative_prompts)} negative prompts and "
                         f"{len(seeds)} seeds: give one of each per image")
    height, width = _size(resolution)
    check_sampler(sampler)
    images = []
    with _inference(pipe):
        base_config = pipe.scheduler.config
        for prompt, negative, seed in zip(prompts, negative_prompts, seeds):
            pipe.scheduler = make_scheduler(sampler, base_config, seed)
            result = pipe(**_embeddings(pipe, prompt, negative, clip_skip_1, clip_skip_2), num_inference_steps=steps,
                          guidance_scale=cfg, height=height, width=width,
                          generator=torch.Generator("cpu").manual_seed(seed), output_type="pil")
            images.append(result.images[0])
    return images


def is_sd15(pipe: Any) -> bool:
    """An SD 1.5-shaped pipeline: one text encoder (StableDiffusionPipeline), no pooled embeddings or time ids."""
    return getattr(pipe, "text_encoder_2", None) is None


def _embeddings(pipe: Any, prompt: str, negative: str, clip_skip_1: int, clip_skip_2: int) -> dict[str, torch.Tensor]:
    """The pipeline call's embedding arguments; SD 1.5 uses clip_skip_1 only."""
    if is_sd15(pipe):
        embeds, negative_embeds = encode_prompt_pair_sd15(pipe.text_encoder, pipe.tokenizer, prompt, negative,
                                                          clip_skip_1)
        return {"prompt_embeds": embeds, "negative_prompt_embeds": negative_embeds}
    embeds, pooled, negative_embeds, negative_pooled = _encode(pipe, prompt, negative, clip_skip_1, clip_skip_2)
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled, "negative_prompt_embeds": negative_embeds,
            "negative_pooled_prompt_embeds": negative_pooled}


def encode_weighted_sd15(text_encoder: torch.nn.Module, tokenizer: Any, prompt: str, clip_skip: int = 0,
                         min_chunks: int = 1) -> torch.Tensor:
    """An A1111-weighted prompt for SD 1.5: (1, 77 N, W), as `prompt_weights.encode_weighted` but with
    SD 1.5's text conditioning (`conditioning.encode_tokens_sd15`)."""
    tokens = tokenize_weighted(tokenizer, parse_prompt(prompt), min_chunks)
    hidden = apply_weights(encode_tokens_sd15(text_encoder, tokens.ids, clip_skip).hidden, tokens.weights)
    return hidden.reshape(1, -1, hidden.shape[-1])  # (N, 77, W) -> (1, 77 N, W)


def encode_prompt_pair_sd15(text_encoder: torch.nn.Module, tokenizer: Any, prompt: str, negative_prompt: str,
                            clip_skip: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """SD 1.5 prompt and negative prompt embeddings of equal length (1, 77 N, W) each."""
    chunks = max(count_chunks(tokenizer, prompt), count_chunks(tokenizer, negative_prompt))
    return (encode_weighted_sd15(text_encoder, tokenizer, prompt, clip_skip, chunks),
            encode_weighted_sd15(text_encoder, tokenizer, negative_prompt, clip_skip, chunks))


def _encode(pipe: Any, prompt: str, negative: str, clip_skip_1: int,
            clip_skip_2: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A1111-weighted prompt and negative prompt: (1, 77 N, W1 + W2) each, (1, P) pooled each."""
    return encode_prompt_pair(pipe.text_encoder, pipe.text_encoder_2, pipe.tokenizer, pipe.tokenizer_2, prompt,
                              negative, clip_skip_1, clip_skip_2)


def _size(resolution: int | tuple[int, int]) -> tuple[int, int]:
    height, width = (resolution, resolution) if isinstance(resolution, int) else resolution
    if height <= 0 or width <= 0 or height % 8 or width % 8:
        raise ValueError(f"resolution: {resolution!r} must be positive multiples of 8 (the VAE downscales 8x)")
    return height, width


@contextmanager
def _inference(pipe: Any) -> Iterator[None]:
    """Eval mode and no grad while generating; train modes and the scheduler come back after.

    Progress bars are switched off on `pipe` and stay off (sampling runs inside training and logs).
    """
    modules = [m for m in (pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None))
               if m is not None]
    modes, scheduler = [m.training for m in modules], pipe.scheduler
    pipe.set_progress_bar_config(disable=True)
    try:
        for module in modules:
            module.eval()
        with torch.no_grad():
            yield
    finally:
        pipe.scheduler = scheduler
        for module, mode in zip(modules, modes):
            module.train(mode)
