"""SDXL conditioning: our text embeddings and time ids equal diffusers' pipeline's own."""

import pytest
import torch

from likeness.models.conditioning import (
    EncoderOutput,
    encode_prompt,
    encode_text,
    time_ids,
    tokenize,
)
from likeness.models.tiny import build_tiny_sdxl

PROMPTS = ["photo of ohwx man", "a woman standing in a room, natural light"]


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_sdxl(seed=5)


def ours(pipe, prompts=PROMPTS, **kwargs):
    return encode_prompt(pipe.text_encoder, pipe.text_encoder_2, pipe.tokenizer, pipe.tokenizer_2, prompts, **kwargs)


def test_tokenize_pads_and_truncates_to_77(pipe):
    for tokenizer in (pipe.tokenizer, pipe.tokenizer_2):
        ids = tokenize(tokenizer, PROMPTS + ["man " * 200])
        assert ids.shape == (3, 77) and ids.dtype == torch.long
        assert (ids[:, 0] == tokenizer.bos_token_id).all()
        assert ids[2, -1] == tokenizer.eos_token_id  # the long prompt is cut, EOS kept
    assert tokenize(pipe.tokenizer, PROMPTS)[0, -1] == pipe.tokenizer.pad_token_id


@pytest.mark.parametrize("clip_skip", [None, 0, 1])
def test_encode_prompt_equals_the_diffusers_pipeline(pipe, clip_skip):
    expected, _, expected_pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False,
                                                         clip_skip=clip_skip)
    skip = clip_skip or 0  # diffusers' None and 0 both take the penultimate layer
    embeds, pooled = ours(pipe, clip_skip_1=skip, clip_skip_2=skip)
    assert embeds.shape == (2, 77, 32 + 48) and pooled.shape == (2, 32)
    torch.testing.assert_close(embeds, expected, rtol=0, atol=0)
    torch.testing.assert_close(pooled, expected_pooled, rtol=0, atol=0)


def test_hidden_states_are_the_penultimate_layer_without_final_norm(pipe):
    ids = tokenize(pipe.tokenizer_2, PROMPTS)
    out = pipe.text_encoder_2(ids, output_hidden_states=True)
    got = encode_text(pipe.text_encoder_2, pipe.tokenizer_2, PROMPTS)
    assert torch.equal(got.hidden, out.hidden_states[-2])
    assert not torch.allclose(got.hidden, out.last_hidden_state)
    assert torch.equal(got.pooled, out.text_embeds)


def test_clip_skip_per_encoder(pipe):
    base, _ = ours(pipe)
    skipped, _ = ours(pipe, clip_skip_1=1)
    assert not torch.equal(skipped[..., :32], base[..., :32])  # TE1 part moves
    assert torch.equal(skipped[..., 32:], base[..., 32:])  # TE2 part stays


def test_cached_outputs_replace_running_the_encoder(pipe):
    expected = ours(pipe)
    cache_1 = encode_text(pipe.text_encoder, pipe.tokenizer, PROMPTS)
    cache_2 = encode_text(pipe.text_encoder_2, pipe.tokenizer_2, PROMPTS)
    from_cache_2 = encode_prompt(pipe.text_encoder, None, pipe.tokenizer, None, PROMPTS, cached_2=cache_2)
    from_cache_both = encode_prompt(None, None, None, None, PROMPTS, cached_1=cache_1, cached_2=cache_2)
    for got in (from_cache_2, from_cache_both):
        assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_a_trained_encoder_runs_with_grad_and_a_frozen_one_without(pipe):
    pipe.text_encoder.requires_grad_(True)
    pipe.text_encoder_2.requires_grad_(False)
    try:
        second = encode_text(pipe.text_encoder_2, pipe.tokenizer_2, PROMPTS)
        embeds, pooled = ours(pipe, cached_2=second)
        assert embeds.requires_grad and not second.hidden.requires_grad and not pooled.requires_grad
        embeds.square().mean().backward()
        grad = pipe.text_encoder.get_input_embeddings().weight.grad
        assert grad is not None and grad.abs().sum() > 0
    finally:
        pipe.text_encoder.requires_grad_(False)
        pipe.text_encoder.zero_grad(set_to_none=True)


def test_bad_inputs_name_the_problem(pipe):
    with pytest.raises(ValueError, match="clip_skip 2 is out of range .* 2 layers"):
        ours(pipe, clip_skip_2=2)
    with pytest.raises(ValueError, match="text_encoder_2: give the encoder"):
        encode_prompt(pipe.text_encoder, None, pipe.tokenizer, None, PROMPTS)
    no_pooled = EncoderOutput(hidden=torch.zeros(2, 77, 48))
    with pytest.raises(ValueError, match="no pooled output"):
        ours(pipe, cached_2=no_pooled)


@pytest.mark.parametrize("original, crop, target", [
    ((64, 64), (0, 0), (64, 64)),
    ((3000, 4000), (12, 0), (1024, 1024)),
    ((48, 80), (8, 16), (64, 96)),
])
def test_time_ids_equal_the_pipelines(pipe, original, crop, target):
    projection = pipe.text_encoder_2.config.projection_dim
    expected = pipe._get_add_time_ids(original, crop, target, dtype=torch.float32,
                                      text_encoder_projection_dim=projection)
    assert torch.equal(time_ids(original, crop, target), expected)
    assert time_ids(original, crop, target, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_time_ids_per_sample_and_broadcast():
    ids = time_ids([(3000, 4000), (512, 768)], (0, 0), torch.tensor([[1024, 1024], [1024, 1024]]))
    assert ids.tolist() == [[3000, 4000, 0, 0, 1024, 1024], [512, 768, 0, 0, 1024, 1024]]
    with pytest.raises(ValueError, match="batch sizes differ"):
        time_ids([(1, 2), (3, 4)], [(0, 0)] * 3, (8, 8))
    with pytest.raises(ValueError, match="crop_top_left must be an"):
        time_ids((8, 8), (0, 0, 0), (8, 8))
