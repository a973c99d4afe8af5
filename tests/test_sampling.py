"""Sampler names -> schedulers (each vocabulary with its own meaning) and seeded generation."""

import re
from typing import get_args

import numpy as np
import pytest
import torch
from PIL import Image
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

from likeness.models import sampling
from likeness.models.sampling import SAMPLERS, generate, make_scheduler, sample_filename, save_sample
from likeness.models.tiny import build_tiny_sdxl
from likeness.settings import SamplerName

PROMPT, NEGATIVE = "photo of ohwx man", "blurry, low quality"


@pytest.fixture(scope="module")
def pipe():
    pipe = build_tiny_sdxl(seed=11)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


def test_every_settings_sampler_name_has_a_scheduler():
    assert set(get_args(SamplerName)) == set(SAMPLERS)


@pytest.mark.parametrize("name", list(get_args(SamplerName)))
def test_each_name_builds_its_scheduler_or_says_what_is_missing(pipe, name):
    spec = SAMPLERS[name]
    if spec.needs_torchsde and not sampling.torchsde_available():
        with pytest.raises(ImportError, match="pip install torchsde"):
            make_scheduler(name, pipe.scheduler.config)
        return
    scheduler = make_scheduler(name, pipe.scheduler.config, seed=1)
    assert type(scheduler).__name__ == spec.scheduler
    for option, value in spec.options.items():
        assert scheduler.config[option] == value, (name, option)
    # the base model's schedule carries over
    assert scheduler.config.beta_schedule == "scaled_linear" and scheduler.config.beta_end == 0.012


@pytest.mark.parametrize("name, cls, algorithm, karras", [
    ("DPMPP_SDE_KARRAS", DPMSolverMultistepScheduler, "sde-dpmsolver++", True),  # OneTrainer's meaning
    ("DPM++ 2M SDE Karras", DPMSolverMultistepScheduler, "sde-dpmsolver++", True),
    ("DPMPP_2M_KARRAS", DPMSolverMultistepScheduler, "dpmsolver++", True),
    ("DPM++ 2M", DPMSolverMultistepScheduler, "dpmsolver++", False),
    ("EULER_A", EulerAncestralDiscreteScheduler, None, None),
    ("Euler a", EulerAncestralDiscreteScheduler, None, None),
    ("EULER_KARRAS", EulerDiscreteScheduler, None, True),
    ("UniPC", UniPCMultistepScheduler, None, False),
    ("DDIM", DDIMScheduler, None, None),
])
def test_names_keep_their_meaning(pipe, name, cls, algorithm, karras):
    scheduler = make_scheduler(name, pipe.scheduler.config)
    assert type(scheduler) is cls
    if algorithm is not None:
        assert scheduler.config.algorithm_type == algorithm
    if karras is not None:
        assert scheduler.config.use_karras_sigmas is karras
    if cls is DDIMScheduler:  # SDXL latents must not be clipped to [-1, 1]
        assert scheduler.config.clip_sample is False and scheduler.config.set_alpha_to_one is False


@pytest.mark.parametrize("name, instead", [("DPM++ SDE Karras", "DPM++ 2M SDE Karras"), ("DPM++ SDE", "DPM++ 2M SDE")])
def test_a1111_sde_without_torchsde_is_a_clear_error(pipe, monkeypatch, name, instead):
    monkeypatch.setattr(sampling, "torchsde_available", lambda: False)
    with pytest.raises(ImportError, match=f"torchsde.*{re.escape(instead)}"):
        make_scheduler(name, pipe.scheduler.config)
    with pytest.raises(ImportError, match="torchsde"):  # before any image is made
        generate(pipe, [PROMPT], None, [1], steps=2, sampler=name, resolution=64)


def test_a1111_sde_karras_is_dpmsolver_sde_when_torchsde_is_there(pipe):
    scheduler = make_scheduler("DPM++ SDE Karras", pipe.scheduler.config, seed=5)
    assert type(scheduler).__name__ == "DPMSolverSDEScheduler"
    assert scheduler.config.use_karras_sigmas is True and scheduler.config.noise_sampler_seed == 5
    first = generate(pipe, [PROMPT], None, [5], steps=2, sampler="DPM++ SDE Karras", resolution=64)
    again = generate(pipe, [PROMPT], None, [5], steps=2, sampler="DPM++ SDE Karras", resolution=64)
    np.testing.assert_array_equal(pixels(first[0]), pixels(again[0]))


def test_unknown_sampler_names_the_choices(pipe):
    with pytest.raises(ValueError, match="unknown name 'DPM_FAST'.*'DDIM'"):
        make_scheduler("DPM_FAST", pipe.scheduler.config)


@pytest.mark.parametrize("name", ["DPMPP_SDE_KARRAS", "EULER_A", "DDIM", "DPM++ 2M Karras"])
def test_two_step_generation_is_seeded(pipe, name):
    run = lambda seed: generate(pipe, [PROMPT], [NEGATIVE], [seed], steps=2, cfg=7.0, sampler=name, resolution=64)[0]
    first, again, other = run(1), run(1), run(2)
    assert first.size == (64, 64) and first.mode == "RGB"
    np.testing.assert_array_equal(pixels(first), pixels(again))
    assert not np.array_equal(pixels(first), pixels(other))


def assert_same_pixels(a, b) -> None:
    """Equal up to one 8-bit level: another code path (diffusers' own loop, another batch) rounds differently."""
    assert int(np.abs(pixels(a).astype(int) - pixels(b).astype(int)).max()) <= 1


def test_generation_equals_the_diffusers_pipeline_given_the_same_scheduler(pipe):
    ours = generate(pipe, [PROMPT], [NEGATIVE], [3], steps=2, cfg=5.0, sampler="EULER", resolution=64)[0]
    original = pipe.scheduler
    pipe.scheduler = make_scheduler("EULER", original.config)
    try:
        theirs = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=2, guidance_scale=5.0, height=64,
                      width=64, generator=torch.Generator().manual_seed(3)).images[0]
    finally:
        pipe.scheduler = original
    assert_same_pixels(ours, theirs)


def test_an_image_does_not_depend_on_its_batch(pipe):
    both = generate(pipe, ["a man in a black suit", PROMPT], None, [8, 9], steps=2, sampler="EULER_A", resolution=64)
    alone = generate(pipe, [PROMPT], None, [9], steps=2, sampler="EULER_A", resolution=64)
    assert_same_pixels(both[1], alone[0])  # other batch shapes pick other kernels: last-digit differences


def test_training_state_and_scheduler_come_back(pipe):
    scheduler = pipe.scheduler
    pipe.unet.train()
    try:
        image = generate(pipe, [PROMPT], None, [1], steps=2, sampler="DDIM", resolution=(64, 128))[0]
        assert image.size == (128, 64)  # (width, height)
        assert pipe.unet.training and not pipe.vae.training and pipe.scheduler is scheduler
    finally:
        pipe.unet.eval()


def test_bad_generation_requests_name_the_problem(pipe):
    with pytest.raises(ValueError, match="2 prompts, 1 negative prompts and 2 seeds"):
        generate(pipe, [PROMPT, PROMPT], [NEGATIVE], [1, 2], resolution=64)
    with pytest.raises(ValueError, match="resolution: 60"):
        generate(pipe, [PROMPT], None, [1], resolution=60)


def test_sample_filenames_sort_by_step_and_carry_the_epoch():
    assert sample_filename(1200, 16, 0, "jpg") == "step0001200-epoch0016-00.jpg"
    assert sample_filename(0, 0, 3, ".PNG") == "step0000000-epoch0000-03.png"
    assert sorted([sample_filename(100, 2, 0), sample_filename(20, 1, 0)])[0].startswith("step0000020")
    with pytest.raises(ValueError, match="image_format"):
        sample_filename(1, 1, 0, "gif")


def test_save_sample_writes_atomically(tmp_path):
    image = Image.new("RGB", (64, 64), "red")
    path = save_sample(image, tmp_path / "samples" / sample_filename(5, 1, 0, "jpg"))
    assert Image.open(path).format == "JPEG" and [p.name for p in path.parent.iterdir()] == [path.name]
    assert Image.open(save_sample(image, tmp_path / "x.png")).format == "PNG"
    with pytest.raises(ValueError, match="unknown image suffix"):
        save_sample(image, tmp_path / "x.gif")
