"""AUTOMATIC1111 prompt weights for SDXL: `(ohwx man:1.2) in a [busy] street`, and prompts past 77 tokens.

Syntax, as A1111's `parse_prompt_attention` reads it:
    (text)        weight x 1.1           ((text)) x 1.21, nesting multiplies
    [text]        weight / 1.1
    (text:1.3)    weight x 1.3 (any float, negative too)
    \\( \\) \\[ \\] \\\\  literal brackets and backslash
    BREAK         ends the current 75-token chunk (a word of its own, upper case)
Unbalanced brackets never raise: a closing bracket with no opener is literal text, an opener that
is never closed weights the rest of the prompt (A1111 does both). Two deliberate differences from
A1111: a lone backslash stays literal (A1111 drops it) and BREAK inside brackets still breaks (A1111
turns it into the word "BREAK" with a negative weight). `compel` was considered and not used: it
parses its own syntax (`(word)1.2`, `word++`), has no A1111 mode, and weights differently
(down-weighting blends with the prompt minus the word, no mean rescale).

Encoding (A1111's "Original" emphasis, as its `sd_hijack_clip` does for each SDXL text encoder):
the prompt is tokenized fragment by fragment without special tokens and cut into windows of 75
tokens (a window that fills up is cut after its last comma when that comma is within the last 20
tokens: A1111's "comma padding backtrack"); each window becomes BOS + tokens + EOS + padding (the
tokenizer's own pad token, exactly as `conditioning.tokenize` pads) and runs through the encoder
as one (77,) sequence. Each window's hidden states are multiplied per token by its weight, then
the window is rescaled so its mean over all tokens and features equals the unweighted mean. The
windows are concatenated along the sequence axis, (1, 77 N, W); the pooled output is the first
window's, unweighted. Prompt and negative prompt are padded to the same number of windows with
encodings of empty windows, as A1111 pads its unconditional side. A prompt without weights and
under 76 tokens gives bit-identical embeddings to `conditioning.encode_prompt`.

    parse_prompt("a (red:1.5) [hat]")
    # [Fragment('a ', 1.0), Fragment('red', 1.5), Fragment(' ', 1.0), Fragment('hat', 0.909..)]
    embeds, pooled, neg, neg_pooled = encode_prompt_pair(pipe.text_encoder, pipe.text_encoder_2,
                                                         pipe.tokenizer, pipe.tokenizer_2, prompt, negative)
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from likeness.models.conditioning import MAX_TOKENS, EncoderOutput, encode_prompt, encode_tokens

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
CHUNK_TOKENS = MAX_TOKENS - 2  # 75: BOS and EOS take the other two places
COMMA_BACKTRACK = 20


class Fragment(NamedTuple):
    text: str
    weight: float


BREAK = Fragment("BREAK", -1.0)  # a chunk boundary, not text (only ever this object in parse results)

_TOKEN = re.compile(r"""
      \\[\\()\[\]]              # an escaped bracket or backslash
    | [(\[]                     # an opening bracket
    | :\s*([+-]?[.\d]+)\s*\)    # an explicit weight closing a round bracket
    | [)\]]                     # a closing bracket
    | [^\\()\[\]:]+             # plain text
    | [\\:]                     # a lone backslash or colon: literal
""", re.VERBOSE)
_BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*")


# --- parsing ---------------------------------------------------------------------------------


def parse_prompt(prompt: str) -> list[Fragment]:
    """A1111 prompt -> fragments of text with their weights; BREAK where the prompt says BREAK.

    Runs of the same weight are merged and empty texts dropped; an empty prompt gives [("", 1.0)].
    """
    pieces: list[list[Any]] = []  # [text, weight, is_break], mutable while brackets close
    round_open: list[int] = []
    square_open: list[int] = []
    for match in _TOKEN.finditer(prompt):
        token, weight = match.group(0), match.group(1)
        if len(token) == 2 and token[0] == "\\":
            _add_text(pieces, token[1])
        elif token == "(":
            round_open.append(len(pieces))
        elif token == "[":
            square_open.append(len(pieces))
        elif weight is not None and round_open:
            _close_weighted(pieces, round_open, token, weight)
        elif token == ")" and round_open:
            _scale(pieces, round_open.pop(), ROUND_MULTIPLIER)
        elif token == "]" and square_open:
            _scale(pieces, square_open.pop(), SQUARE_MULTIPLIER)
        else:
            _add_text(pieces, token)
    for start in round_open:  # never closed: A1111 weights the rest of the prompt
        _scale(pieces, start, ROUND_MULTIPLIER)
    for start in square_open:
        _scale(pieces, start, SQUARE_MULTIPLIER)
    return _merge(pieces)


def _close_weighted(pieces: list[list[Any]], round_open: list[int], token: str, weight: str) -> None:
    try:
        value = float(weight)
    except ValueError:  # "(a:1.2.3)": the colon part is text, the bracket still closes (A1111 would crash)
        _add_text(pieces, token[:-1])
        value = ROUND_MULTIPLIER
    _scale(pieces, round_open.pop(), value)


def _add_text(pieces: list[list[Any]], text: str) -> None:
    for i, part in enumerate(_BREAK_WORD.split(text)):
        if i > 0:
            pieces.append(["BREAK", 1.0, True])
        pieces.append([part, 1.0, False])


def _scale(pieces: list[list[Any]], start: int, factor: float) -> None:
    for piece in pieces[start:]:
        if not piece[2]:
            piece[1] *= factor


def _merge(pieces: list[list[Any]]) -> list[Fragment]:
    out: list[Fragment] = []
    for text, weight, is_break in pieces:
        if is_break:
            out.append(BREAK)
        elif text and out and out[-1] is not BREAK and out[-1].weight == weight:
            out[-1] = Fragment(out[-1].text + text, weight)
        elif text:
            out.append(Fragment(text, weight))
    return out or [Fragment("", 1.0)]


def is_weighted(fragments: Sequence[Fragment]) -> bool:
    return any(f is BREAK or f.weight != 1.0 for f in fragments)


def plain_text(prompt: str) -> str:
    """The prompt's words without weight syntax, e.g. for a CLIP text score: `a (red:1.5) hat` -> `a red hat`."""
    return " ".join("".join(" " if f is BREAK else f.text for f in parse_prompt(prompt)).split())


# --- tokens in 75-token windows --------------------------------------------------------------


class TokenChunks(NamedTuple):
    ids: torch.Tensor  # (N, 77) BOS, up to 75 tokens, EOS, padding
    weights: torch.Tensor  # (N, 77) 1.0 on BOS, EOS and padding


def chunk_tokens(tokenizer: Any, fragments: Sequence[Fragment],
                 comma_backtrack: int = COMMA_BACKTRACK) -> list[list[tuple[int, float]]]:
    """(token id, weight) lists of at most 75 tokens: a new one at BREAK and whenever one is full."""
    comma_ids = tokenizer(",", add_special_tokens=False, verbose=False).input_ids
    comma = comma_ids[0] if len(comma_ids) == 1 else None
    chunks: list[list[tuple[int, float]]] = []
    current: list[tuple[int, float]] = []
    last_comma = -1
    for fragment in fragments:
        if fragment is BREAK:
            chunks.append(current)
            current, last_comma = [], -1
            continue
        for token in tokenizer(fragment.text, add_special_tokens=False, verbose=False).input_ids:
            if len(current) == CHUNK_TOKENS:
                late_comma = last_comma >= 0 and CHUNK_TOKENS - last_comma <= comma_backtrack
                cut = last_comma + 1 if late_comma else CHUNK_TOKENS
                chunks.append(current[:cut])
                current, last_comma = current[cut:], -1
            if token == comma:
                last_comma = len(current)
            current.append((token, fragment.weight))
    if current or not chunks:
        chunks.append(current)
    return chunks


def tokenize_weighted(tokenizer: Any, fragments: Sequence[Fragment], min_chunks: int = 1) -> TokenChunks:
    """Token ids and weights, one (77,) row per window; empty windows pad up to `min_chunks`."""
    chunks = chunk_tokens(tokenizer, fragments)
    chunks += [[] for _ in range(min_chunks - len(chunks))]
    ids, weights = [], []
    for chunk in chunks:
        pad = CHUNK_TOKENS - len(chunk)
        ids.append([tokenizer.bos_token_id, *(t for t, _ in chunk), tokenizer.eos_token_id]
                   + [tokenizer.pad_token_id] * pad)
        weights.append([1.0, *(w for _, w in chunk), 1.0] + [1.0] * pad)
    return TokenChunks(torch.tensor(ids, dtype=torch.long), torch.tensor(weights, dtype=torch.float32))


def count_chunks(tokenizer: Any, prompt: str) -> int:
    return len(chunk_tokens(tokenizer, parse_prompt(prompt)))


# --- embeddings ------------------------------------------------------------------------------


def apply_weights(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Multiply each token's hidden state by its weight, then rescale each window to its old mean.

    hidden (N, 77, W), weights (N, 77). Unweighted input comes back unchanged (the same tensor).
    """
    if bool(torch.all(weights == 1)):
        return hidden
    values = hidden.float()
    before = values.mean(dim=(1, 2), keepdim=True)  # (N, 1, 1)
    weighted = values * weights.to(values.device)[..., None]  # (N, 77, W)
    after = weighted.mean(dim=(1, 2), keepdim=True)
    scale = torch.where(after == 0, torch.ones_like(after), before / after)
    return (weighted * scale).to(hidden.dtype)


def encode_weighted(text_encoder: torch.nn.Module, tokenizer: Any, prompt: str, clip_skip: int = 0,
                    min_chunks: int = 1) -> EncoderOutput:
    """One encoder's weighted output: hidden (1, 77 N, W), pooled (1, P) of the first window or None."""
    tokens = tokenize_weighted(tokenizer, parse_prompt(prompt), min_chunks)
    out = encode_tokens(text_encoder, tokens.ids, clip_skip)  # hidden (N, 77, W)
    hidden = apply_weights(out.hidden, tokens.weights)
    pooled = out.pooled[:1] if out.pooled is not None else None
    return EncoderOutput(hidden=hidden.reshape(1, -1, hidden.shape[-1]), pooled=pooled)


def encode_weighted_prompt(text_encoder: torch.nn.Module, text_encoder_2: torch.nn.Module, tokenizer: Any,
                           tokenizer_2: Any, prompt: str, clip_skip_1: int = 0, clip_skip_2: int = 0,
                           min_chunks: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL embeddings (1, 77 N, W1 + W2) and pooled (1, P) of one A1111-weighted prompt."""
    chunks = max(min_chunks, count_chunks(tokenizer, prompt), count_chunks(tokenizer_2, prompt))
    first = encode_weighted(text_encoder, tokenizer, prompt, clip_skip_1, chunks)
    second = encode_weighted(text_encoder_2, tokenizer_2, prompt, clip_skip_2, chunks)
    return encode_prompt(None, None, None, None, [prompt], cached_1=first, cached_2=second)


def encode_prompt_pair(text_encoder: torch.nn.Module, text_encoder_2: torch.nn.Module, tokenizer: Any,
                       tokenizer_2: Any, prompt: str, negative_prompt: str, clip_skip_1: int = 0,
                       clip_skip_2: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompt and negative prompt embeddings of equal length, as classifier-free guidance needs them.

    Returns embeds (1, 77 N, W), pooled (1, P), negative embeds (1, 77 N, W), negative pooled (1, P).
    """
    chunks = max(count_chunks(t, p) for t in (tokenizer, tokenizer_2) for p in (prompt, negative_prompt))
    embeds, pooled = encode_weighted_prompt(text_encoder, text_encoder_2, tokenizer, tokenizer_2, prompt,
                                            clip_skip_1, clip_skip_2, chunks)
    negative, negative_pooled = encode_weighted_prompt(text_encoder, text_encoder_2, tokenizer, tokenizer_2,
                                                       negative_prompt, clip_skip_1, clip_skip_2, chunks)
    return embeds, pooled, negative, negative_pooled
