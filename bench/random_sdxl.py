"""Full-size SDXL with random weights, built cheaply and without a download, for the benchmarks.

Every part is created on the `meta` device from the real configs (written out below), then given
storage on the target device and filled tensor by tensor from its own seeded generator, directly in
the part's dtype: no fp32 copy and no slow default init (a plain init of the UNet in fp32 needs
over 14 GB and minutes). The same seed gives the same weights. `tiny=True` gives the test suite's
tiny shapes through the same code.

    pipe = build_random_sdxl(torch.device("cpu"), {"unet": torch.bfloat16, "vae": torch.float32})
    pipe = build_random_sdxl(torch.device("cuda"), tiny=True)
    batch = random_batch(pipe, resolution=512, device=device)     # one training batch, as TrainData gives it
    settings = reference_settings(device="cpu", training={"offload_frozen": False})
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json, written out (no download)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn", transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, norm_num_groups=32,
    act_fn="silu", flip_sin_to_cos=True, freq_shift=0,
)
SDXL_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    sample_size=1024, scaling_factor=0.13025,
)
# CLIP ViT-L/14 text tower (text encoder 1) and OpenCLIP bigG text tower with projection (text encoder 2)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
CLIP_BIG_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                  num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")
REFERENCE_DTYPES = {"unet": torch.bfloat16, "text_encoder": torch.bfloat16, "text_encoder_2": torch.bfloat16,
                    "vae": torch.float32}  # the reference run's weight dtypes


def _full_size_parts(tokenizer: Any, tokenizer_2: Any) -> dict[str, Callable[[], torch.nn.Module]]:
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return {
        "unet": lambda: UNet2DConditionModel(**SDXL_UNET),
        "vae": lambda: AutoencoderKL(**SDXL_VAE),
        "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**CLIP_L, pad_token_id=tokenizer.pad_token_id, **ids)),
        "text_encoder_2": lambda: CLIPTextModelWithProjection(
            CLIPTextConfig(**CLIP_BIG_G, pad_token_id=tokenizer_2.pad_token_id, **ids)),
    }


def _tiny_parts(tokenizer: Any, tokenizer_2: Any) -> dict[str, Callable[[], torch.nn.Module]]:
    from likeness.models.tiny import build_unet, build_vae, text_encoder_configs

    te1, te2 = text_encoder_configs(tokenizer, tokenizer_2)
    return {"unet": build_unet, "vae": build_vae, "text_encoder": lambda: CLIPTextModel(te1),
            "text_encoder_2": lambda: CLIPTextModelWithProjection(te2)}


@torch.no_grad()
def fill_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Deterministic random weights, tensor by tensor (each from its own generator, in its own dtype):
    1-D scales 1 (norms), biases 0, other weights N(0, 1/fan_in) so activations stay of order one.
    Integer buffers (CLIP's position ids) are set to 0, 1, 2, ... as their constructors do."""
    tensors = dict(module.named_parameters())
    tensors.update(module.named_buffers())
    for index, name in enumerate(sorted(tensors)):
        tensor, leaf = tensors[name], name.rsplit(".", 1)[-1]
        if not tensor.is_floating_point():
            tensor.copy_(torch.arange(tensor.shape[-1], device=tensor.device).expand_as(tensor))
        elif leaf == "bias" or tensor.ndim == 0:
            tensor.zero_()
        elif tensor.ndim == 1:
            tensor.fill_(1.0)
        else:
            generator = torch.Generator(device=tensor.device).manual_seed(seed * 100_003 + index)
            tensor.normal_(0.0, 1.0 / math.sqrt(tensor[0].numel()), generator=generator)
    return module


def build_random_sdxl(device: torch.device | str = "cpu", dtypes: Mapping[str, torch.dtype] | None = None,
                      *, tiny: bool = False, seed: int = 0) -> StableDiffusionXLPipeline:
    """An SDXL pipeline (full size, or the tests' tiny shapes) with random weights on `device`,
    each part in `dtypes[part]` (default: the reference run's, bf16 with an fp32 VAE)."""
    from likeness.models.tiny import build_clip_tokenizer, build_scheduler

    dtypes = {**REFERENCE_DTYPES, **(dtypes or {})}
    tokenizer, tokenizer_2 = build_clip_tokenizer(), build_clip_tokenizer(pad_token="!")
    constructors = (_tiny_parts if tiny else _full_size_parts)(tokenizer, tokenizer_2)
    modules = {}
    for offset, part in enumerate(PARTS):
        with torch.device("meta"):
            module = constructors[part]()
        module = torch.nn.Module.to(module, dtype=dtypes[part]).to_empty(device=device)
        modules[part] = fill_(module, seed * 10 + offset).eval().requires_grad_(False)
    return StableDiffusionXLPipeline(**modules, tokenizer=tokenizer, tokenizer_2=tokenizer_2,
                                     scheduler=build_scheduler(), force_zeros_for_empty_prompt=True,
                                     add_watermarker=False)


def random_batch(pipe: StableDiffusionXLPipeline, resolution: int, device: torch.device | str = "cpu",
                 batch_size: int = 1, seed: int = 0) -> Any:
    """A training batch like TrainData's for the reference run: latents, a head mask, text encoder 2's
    cached outputs (it is frozen), time ids; text encoder 1 runs live on the caption."""
    from likeness.models.conditioning import EncoderOutput
    from likeness.trainer.train_data import Batch

    g = torch.Generator().manual_seed(seed)
    side = resolution // 8
    te2 = pipe.text_encoder_2.config
    mask = torch.zeros(batch_size, 1, side, side)
    mask[..., side // 4: 3 * side // 4, side // 4: 3 * side // 4] = 1.0  # (B, 1, H/8, W/8): a head in the middle
    cached = EncoderOutput(torch.randn(batch_size, 77, te2.hidden_size, generator=g).to(device),
                           torch.randn(batch_size, te2.projection_dim, generator=g).to(device))
    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch_size, dtype=torch.float32)
    return Batch(ids=[f"random-{i}" for i in range(batch_size)], captions=["photo of ohwx man"] * batch_size,
                 latents=torch.randn(batch_size, 4, side, side, generator=g), masks=mask,
                 cached={"text_encoder_2": cached}, time_ids=time_ids, loss_weight=torch.ones(batch_size))


def reference_settings(device: str = "cpu", **sections: Any) -> Any:
    """The reference run's Settings (Adafactor, fused back pass, bf16, checkpointing, TE2 frozen)
    for a run on `device`, with `sections` merged over them ({"training": {"compile": True}, ...})."""
    from likeness.settings import Settings

    values = Settings().model_dump(mode="json")
    values["run"]["device"] = device
    for name, section in sections.items():
        for key, value in section.items():
            if isinstance(value, dict):
                values[name][key].update(value)
            else:
                values[name][key] = value
    return Settings.model_validate(values)


def step_trainer(pipe: StableDiffusionXLPipeline, settings: Any, device: torch.device, total_steps: int = 1000) -> Any:
    """The loop's own Trainer for the step alone, the parts placed as `load_models` places them."""
    from likeness.trainer.distributed import Processes
    from likeness.trainer.loop import Trainer, place_models

    trained = place_models(pipe, settings, device)
    return Trainer.step_only(settings, Processes(1, 0, device), pipe, trained, total_steps, log=lambda m: None)
