"""A1111 prompt weights: the parser on tricky prompts, weighting and its mean rescale, 75-token windows."""

import pytest
import torch

from likeness.models.conditioning import encode_prompt, encode_tokens, tokenize
from likeness.models.prompt_weights import (
    BREAK,
    apply_weights,
    chunk_tokens,
    count_chunks,
    encode_prompt_pair,
    encode_weighted,
    encode_weighted_prompt,
    parse_prompt,
    plain_text,
    tokenize_weighted,
)
from likeness.models.sampling import generate
from likeness.models.tiny import build_tiny_sdxl

PLAIN = "photo of ohwx man in a black suit, natural lighting"
D = 1 / 1.1  # one square bracket


@pytest.fixture(scope="module")
def pipe():
    pipe = build_tiny_sdxl(seed=3)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def encoders(pipe):
    return pipe.text_encoder, pipe.text_encoder_2, pipe.tokenizer, pipe.tokenizer_2


def table(fragments):
    return [("BREAK" if f is BREAK else f.text, None if f is BREAK else round(f.weight, 6)) for f in fragments]


@pytest.mark.parametrize("prompt, expected", [
    ("a cat", [("a cat", 1.0)]),
    ("", [("", 1.0)]),
    ("(a cat)", [("a cat", 1.1)]),
    ("((a))", [("a", 1.21)]),
    ("[a]", [("a", D)]),
    ("[[a]]", [("a", D * D)]),
    ("(a:1.5) b", [("a", 1.5), (" b", 1.0)]),
    ("(a: 0.25 )", [("a", 0.25)]),
    ("((a:1.5))", [("a", 1.65)]),
    ("(a (b:2) c)", [("a ", 1.1), ("b", 2.2), (" c", 1.1)]),
    ("(a:-1)", [("a", -1.0)]),
    ("([a])", [("a", 1.0)]),
    ("(a:0.5)(b:0.5)", [("ab", 0.5)]),  # runs of one weight merge
    ("(a:1.0) b", [("a b", 1.0)]),
    # escapes
    (r"\(a\) \[b\]", [("(a) [b]", 1.0)]),
    (r"a\\b", [("a\\b", 1.0)]),
    (r"(a\)b)", [("a)b", 1.1)]),
    ("a\\", [("a\\", 1.0)]),  # a lone backslash stays (A1111 drops it)
    # unbalanced: closers without an opener are text, openers never closed weight the rest
    ("a) b]", [("a) b]", 1.0)]),
    ("(a", [("a", 1.1)]),
    ("x [a (b", [("x ", 1.0), ("a ", D), ("b", 1.0)]),
    ("(a]", [("a]", 1.1)]),
    # colons that are not weights
    ("a:b", [("a:b", 1.0)]),
    (":1.2)", [(":1.2)", 1.0)]),
    ("(a:1.2.3)", [("a:1.2.3", 1.1)]),
    ("(a:.)", [("a:.", 1.1)]),
    ("[a:1.2]", [("a:1.2", D)]),
    # BREAK
    ("a BREAK b", [("a", 1.0), ("BREAK", None), ("b", 1.0)]),
    ("(a BREAK b)", [("a", 1.1), ("BREAK", None), ("b", 1.1)]),
    ("aBREAK break", [("aBREAK break", 1.0)]),
])
def test_parse_table(prompt, expected):
    assert table(parse_prompt(prompt)) == [(t, None if w is None else round(w, 6)) for t, w in expected]


def test_plain_text_drops_the_syntax():
    assert plain_text(r"photo of (ohwx man:1.2), [blurry] \(sic\) BREAK ((red)) hat") == "photo of ohwx man, blurry (sic) red hat"


def test_brackets_do_not_become_tokens(pipe):
    tokenizer = pipe.tokenizer
    plain = tokenize_weighted(tokenizer, parse_prompt("photo of ohwx man"))
    weighted = tokenize_weighted(tokenizer, parse_prompt("photo of (ohwx man:1.5)"))
    assert torch.equal(plain.ids, weighted.ids)
    assert torch.equal(plain.ids, tokenize(tokenizer, ["photo of ohwx man"]))
    man = len(tokenizer("ohwx man", add_special_tokens=False).input_ids)
    photo = len(tokenizer("photo of ", add_special_tokens=False).input_ids)
    expected = torch.ones(1, 77)
    expected[0, 1 + photo:1 + photo + man] = 1.5
    assert torch.equal(weighted.weights, expected)


def test_plain_prompt_is_bit_identical_to_the_conditioning_path(pipe):
    negative = "blurry, low quality"
    embeds, pooled, neg, neg_pooled = encode_prompt_pair(*encoders(pipe), PLAIN, negative, 0, 1)
    want, want_pooled = encode_prompt(*encoders(pipe), [PLAIN], 0, 1)
    want_neg, want_neg_pooled = encode_prompt(*encoders(pipe), [negative], 0, 1)
    assert embeds.shape == (1, 77, 32 + 48)
    for got, ref in ((embeds, want), (pooled, want_pooled), (neg, want_neg), (neg_pooled, want_neg_pooled)):
        assert torch.equal(got, ref)


def test_weight_one_is_the_plain_prompt(pipe):
    weighted = encode_weighted_prompt(*encoders(pipe), "photo of (ohwx man:1.0)")
    plain = encode_weighted_prompt(*encoders(pipe), "photo of ohwx man")
    assert all(torch.equal(a, b) for a, b in zip(weighted, plain))


@pytest.mark.parametrize("encoder, tokenizer", [("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")])
def test_weights_scale_exactly_their_tokens_then_keep_the_mean(pipe, encoder, tokenizer):
    encoder, tokenizer = getattr(pipe, encoder), getattr(pipe, tokenizer)
    tokens = tokenize_weighted(tokenizer, parse_prompt("photo of (ohwx man:1.5) in a [suit]"))
    raw = encode_tokens(encoder, tokens.ids).hidden  # (1, 77, W) unweighted
    out = encode_weighted(encoder, tokenizer, "photo of (ohwx man:1.5) in a [suit]")
    assert out.hidden.shape == raw.shape
    assert torch.allclose(out.hidden.mean(), raw.mean(), atol=1e-6, rtol=1e-5)  # the rescale keeps the mean
    # before the rescale: weighted tokens x weight, every other token untouched; the rescale is one factor
    factor = out.hidden.mean() / (raw * tokens.weights[..., None]).mean()
    ratio = out.hidden / (raw * factor)  # (1, 77, W): the per-token weight
    assert torch.allclose(ratio, tokens.weights[..., None].expand_as(ratio), atol=1e-4)
    assert sorted(torch.unique(tokens.weights).tolist()) == pytest.approx([D, 1.0, 1.5])
    assert not torch.allclose(out.hidden, raw)
    if out.pooled is not None:  # text encoder 2: the pooled output is not weighted
        assert torch.equal(out.pooled, encode_tokens(encoder, tokens.ids).pooled)


def test_apply_weights_per_window_and_unweighted_is_untouched():
    hidden = torch.randn(2, 77, 8, generator=torch.Generator().manual_seed(0)) + 0.5
    weights = torch.ones(2, 77)
    assert apply_weights(hidden, weights) is hidden
    weights[1, 5] = 2.0
    out = apply_weights(hidden, weights)
    assert torch.equal(out[0], hidden[0])  # window 0 has no weights: unchanged
    assert torch.allclose(out[1].mean(), hidden[1].mean(), atol=1e-6)
    scale = hidden[1].mean() / (hidden[1] * weights[1, :, None]).mean()
    assert torch.allclose(out[1, 5], hidden[1, 5] * 2 * scale) and torch.allclose(out[1, 6], hidden[1, 6] * scale)


def test_200_token_prompt_is_encoded_in_75_token_windows(pipe):
    words = ("man woman person face hair eyes nose mouth hands body " * 20).split()
    prompt = " ".join(words)
    ids = pipe.tokenizer(prompt, add_special_tokens=False).input_ids
    assert len(ids) == 200
    assert count_chunks(pipe.tokenizer, prompt) == 3
    embeds, pooled = encode_weighted_prompt(*encoders(pipe), prompt)
    assert embeds.shape == (1, 3 * 77, 80) and pooled.shape == (1, 32)
    tokens = tokenize_weighted(pipe.tokenizer, parse_prompt(prompt))
    assert tokens.ids[:, 0].tolist() == [pipe.tokenizer.bos_token_id] * 3
    assert tokens.ids[0, 1:76].tolist() == ids[:75] and tokens.ids[2, 1:51].tolist() == ids[150:]
    # each window is encoded on its own: window 2 equals the prompt of its 50 tokens alone
    last = pipe.tokenizer.decode(ids[150:])
    alone, _ = encode_prompt(*encoders(pipe), [last])
    assert torch.allclose(embeds[:, 154:], alone, atol=1e-5)
    first, first_pooled = encode_prompt(*encoders(pipe), [prompt])  # truncated to the first window
    assert torch.allclose(embeds[:, :77], first, atol=1e-5) and torch.allclose(pooled, first_pooled, atol=1e-5)


def test_full_window_is_cut_after_a_late_comma(pipe):
    tokenizer = pipe.tokenizer
    cat = tokenizer("man", add_special_tokens=False).input_ids
    comma = tokenizer(",", add_special_tokens=False).input_ids
    assert len(cat) == 1 and len(comma) == 1
    prompt = "man " * 70 + ", " + "woman " * 10
    chunks = chunk_tokens(tokenizer, parse_prompt(prompt))
    assert [len(c) for c in chunks] == [71, 10] and chunks[0][-1][0] == comma[0]
    early = "man " * 40 + ", " + "man " * 45  # comma too far back: a plain cut at 75
    assert [len(c) for c in chunk_tokens(tokenizer, parse_prompt(early))] == [75, 11]


def test_break_starts_a_new_window(pipe):
    chunks = chunk_tokens(pipe.tokenizer, parse_prompt("photo of ohwx man BREAK in a (black suit:1.2)"))
    assert len(chunks) == 2
    assert [w for _, w in chunks[0]] == [1.0] * len(pipe.tokenizer("photo of ohwx man", add_special_tokens=False).input_ids)
    assert 1.2 in [w for _, w in chunks[1]]


def test_short_negative_is_padded_with_empty_windows(pipe):
    prompt = "man " * 100
    embeds, _, negative, negative_pooled = encode_prompt_pair(*encoders(pipe), prompt, "blurry")
    assert embeds.shape == negative.shape == (1, 154, 80)
    blurry, blurry_pooled = encode_prompt(*encoders(pipe), ["blurry"])
    empty, _ = encode_prompt(*encoders(pipe), [""])
    assert torch.allclose(negative[:, :77], blurry, atol=1e-5) and torch.allclose(negative[:, 77:], empty, atol=1e-5)
    assert torch.allclose(negative_pooled, blurry_pooled, atol=1e-5)


def test_generate_takes_weighted_and_long_prompts(pipe):
    long_prompt = "photo of (ohwx man:1.3) in a [black suit], " + "natural lighting, " * 40
    plain, weighted, long = (generate(pipe, [p], ["blurry"], [7], steps=2, cfg=7.0, sampler="EULER", resolution=64)[0]
                             for p in ("photo of ohwx man", "photo of (ohwx man:1.8)", long_prompt))
    assert plain.size == weighted.size == long.size == (64, 64)
    assert plain.tobytes() != weighted.tobytes()
