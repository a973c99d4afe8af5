"""SDXL and SD 1.5 conditioning, the one copy: text embeddings and size/crop time ids for training,
sampling, evaluation and the latent cache alike (no drift between them).

Text (as OneTrainer and diffusers' SDXL pipeline): both tokenizers pad/truncate to 77 tokens;
each encoder contributes `hidden_states[-(2 + clip_skip)]` (the penultimate layer at clip skip 0,
without the final layer norm); the two are concatenated on the feature axis; the pooled vector is
text encoder 2's projected embedding. An encoder being trained runs live (with grad); a frozen
one's outputs may come from the cache instead (`EncoderOutput` tensors, as the latent stage
stores them).

Size (SDXL micro-conditioning): `original_size + crop_top_left + target_size`, each in (height,
width) order, as diffusers' `StableDiffusionXLPipeline._get_add_time_ids` builds them. Training
reads them from latents.csv: a padded square is conditioned as (T, T, 0, 0, T, T) by default, as
OneTrainer's pre-padded files and inference (`resize.pad_time_ids`, tasks/latents.py).

    ids = tokenize(pipe.tokenizer, ["photo of ohwx man"])                     # (1, 77)
    embeds, pooled = encode_prompt(pipe.text_encoder, pipe.text_encoder_2,
                                   pipe.tokenizer, pipe.tokenizer_2, ["photo of ohwx man"])
    add_time_ids = time_ids((1024, 1024), (0, 0), (1024, 1024))               # (1, 6)

SD 1.5 (`encode_prompt_sd15`): one encoder, `final_layer_norm(hidden_states[-(1 + clip_skip)])`
(the last layer at clip skip 0), no pooled embeddings, no time ids.

    embeds = encode_prompt_sd15(pipe.text_encoder, pipe.tokenizer, ["photo of ohwx man"])  # (1, 77, W)
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

MAX_TOKENS = 77

Size = Sequence[int] | Sequence[Sequence[int]] | torch.Tensor


@dataclass
class EncoderOutput:
    """One text encoder's contribution, computed live or read from the cache."""

    hidden: torch.Tensor  # (B, 77, W): hidden_states[-(2 + clip_skip)], no final layer norm
    pooled: torch.Tensor | None = None  # (B, P): projected pooled output (text encoder 2 only)


def tokenize(tokenizer: Any, prompts: Sequence[str]) -> torch.Tensor:
    """(B, 77) token ids: BOS, the prompt, EOS, then padding; longer prompts are truncated."""
    return tokenizer(list(prompts), padding="max_length", max_length=MAX_TOKENS, truncation=True,
                     return_tensors="pt").input_ids


def encode_tokens(text_encoder: torch.nn.Module, input_ids: torch.Tensor, clip_skip: int = 0) -> EncoderOutput:
    """Run one CLIP text encoder; with grad only when some of its parameters are being trained."""
    out = _run_encoder(text_encoder, input_ids, clip_skip)
    # hidden_states: embeddings + one per layer; SDXL counts from the penultimate layer.
    return EncoderOutput(hidden=out.hidden_states[-(2 + clip_skip)], pooled=getattr(out, "text_embeds", None))


def encode_text(text_encoder: torch.nn.Module, tokenizer: Any, prompts: Sequence[str],
                clip_skip: int = 0) -> EncoderOutput:
    return encode_tokens(text_encoder, tokenize(tokenizer, prompts), clip_skip)


def encode_prompt(
    text_encoder: torch.nn.Module | None,
    text_encoder_2: torch.nn.Module | None,
    tokenizer: Any,
    tokenizer_2: Any,
    prompts: Sequence[str],
    clip_skip_1: int = 0,
    clip_skip_2: int = 0,
    *,
    cached_1: EncoderOutput | None = None,
    cached_2: EncoderOutput | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL prompt embeddings (B, 77, W1 + W2) and pooled embeddings (B, P).

    An encoder with a `cached_*` output is not run (it may then be None); the other runs live.
    """
    first = cached_1 if cached_1 is not None else _live(text_encoder, tokenizer, prompts, clip_skip_1, "text_encoder")
    second = cached_2 if cached_2 is not None else _live(text_encoder_2, tokenizer_2, prompts, clip_skip_2,
                                                         "text_encoder_2")
    if second.pooled is None:
        raise ValueError("text_encoder_2 gave no pooled output: it must be a CLIPTextModelWithProjection "
                         "(or the cached output must include the pooled tensor)")
    hidden_2 = second.hidden.to(first.hidden.device, first.hidden.dtype)
    return torch.cat([first.hidden, hidden_2], dim=-1), second.pooled  # (B, 77, W1 + W2), (B, P)


def _live(encoder: torch.nn.Module | None, tokenizer: Any, prompts: Sequence[str], clip_skip: int,
          name: str) -> EncoderOutput:
    if encoder is None or tokenizer is None:
        raise ValueError(f"{name}: give the encoder and its tokenizer, or its cached output")
    return encode_text(encoder, tokenizer, prompts, clip_skip)


def time_ids(original_size: Size, crop_top_left: Size, target_size: Size, *, dtype: torch.dtype = torch.float32,
             device: torch.device | str | None = None) -> torch.Tensor:
    """(B, 6) SDXL time ids: original (h, w), crop top-left (top, left), target (h, w).

    Each argument is one (h, w) pair for the whole batch or one pair per sample ((B, 2)).
    """
    parts = [_pairs(value, name) for value, name in
             ((original_size, "original_size"), (crop_top_left, "crop_top_left"), (target_size, "target_size"))]
    batch = max(p.shape[0] for p in parts)
    if any(p.shape[0] not in (1, batch) for p in parts):
        raise ValueError(f"time_ids: batch sizes differ ({[p.shape[0] for p in parts]}); give one pair or B pairs each")
    return torch.cat([p.expand(batch, 2) for p in parts], dim=1).to(device=device, dtype=dtype)  # (B, 6)


def _pairs(value: Size, name: str) -> torch.Tensor:
    pairs = torch.as_tensor(value, dtype=torch.float64)
    pairs = pairs[None] if pairs.ndim == 1 else pairs
    if pairs.ndim != 2 or pairs.shape[1] != 2:
        raise ValueError(f"time_ids: {name} must be an (h, w) pair or a list of them, got shape {tuple(pairs.shape)}")
    return pairs  # (B or 1, 2)


# --- SD 1.5: one text encoder, no pooled embeddings, no time ids ------------------------------


def encode_tokens_sd15(text_encoder: torch.nn.Module, input_ids: torch.Tensor, clip_skip: int = 0) -> EncoderOutput:
    """SD 1.5's text conditioning: `final_layer_norm(hidden_states[-(1 + clip_skip)])`, no pooled output.

    Clip skip 0 is the last layer (A1111's "clip skip 1"), as diffusers' StableDiffusionPipeline and
    OneTrainer's SD 1.5 model encode it; unlike SDXL the final layer norm is applied.
    """
    out = _run_encoder(text_encoder, input_ids, clip_skip)
    trained = any(p.requires_grad for p in text_encoder.parameters())
    with nullcontext() if trained else torch.no_grad():
        hidden = _final_layer_norm(text_encoder)(out.hidden_states[-(1 + clip_skip)])
    return EncoderOutput(hidden=hidden)  # (B, 77, W)


def _run_encoder(text_encoder: torch.nn.Module, input_ids: torch.Tensor, clip_skip: int) -> Any:
    """The encoder's outputs with every hidden state; with grad only when some of its parameters train."""
    layers = text_encoder.config.num_hidden_layers
    if not 0 <= clip_skip <= layers - 1:
        raise ValueError(f"clip_skip {clip_skip} is out of range for a text encoder with {layers} layers "
                         f"(0 to {layers - 1})")
    trained = any(p.requires_grad for p in text_encoder.parameters())
    with nullcontext() if trained else torch.no_grad():
        return text_encoder(input_ids.to(text_encoder.device), output_hidden_states=True)


def _final_layer_norm(text_encoder: torch.nn.Module) -> torch.nn.Module:
    """transformers 5 keeps it on CLIPTextModel itself; older versions under `.text_model`."""
    norm = getattr(text_encoder, "final_layer_norm", None)
    return norm if norm is not None else text_encoder.text_model.final_layer_norm


def encode_text_sd15(text_encoder: torch.nn.Module, tokenizer: Any, prompts: Sequence[str],
                     clip_skip: int = 0) -> EncoderOutput:
    return encode_tokens_sd15(text_encoder, tokenize(tokenizer, prompts), clip_skip)


def encode_prompt_sd15(text_encoder: torch.nn.Module | None, tokenizer: Any, prompts: Sequence[str],
                       clip_skip: int = 0, *, cached: EncoderOutput | None = None) -> torch.Tensor:
    """SD 1.5 prompt embeddings (B, 77, W); with a `cached` output the encoder is not run (it may be None)."""
    if cached is not None:
        return cached.hidden
    if text_encoder is None or tokenizer is None:
        raise ValueError("text_encoder: give the encoder and its tokenizer, or its cached output")
    return encode_text_sd15(text_encoder, tokenizer, prompts, clip_skip).hidden
