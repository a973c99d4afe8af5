"""LoRA end to end (issue 16): the pipeline (prepare -> train with method lora -> evaluate -> select ->
extract-lora) on the tiny model, the chosen LoRA loaded back through diffusers' own loader, and the
extraction of that LoRA from the merged model."""

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file

from likeness.flows.pipeline import pipeline
from likeness.models.checkpoint import CheckpointInfo, save_single_file
from likeness.models.lora import is_lora_file, read_lora_metadata, te1_lora_names, unet_lora_names
from likeness.models.lora_extract import extract_lora

pytestmark = pytest.mark.usefixtures("prefect_flows", "one_torch_thread")
RANK, ALPHA = 2, 4.0


def lora_deltas(path: Path) -> dict[str, torch.Tensor]:
    """LoRA name -> the weight change the file stands for, (alpha / rank) * up @ down, in float64."""
    tensors = load_file(path)
    deltas = {}
    for key in tensors:
        if key.endswith(".alpha"):
            name = key.removesuffix(".alpha")
            down, up = tensors[f"{name}.lora_down.weight"].double(), tensors[f"{name}.lora_up.weight"].double()
            scale = float(tensors[key]) / down.shape[0]
            deltas[name] = scale * (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
    return deltas


def module_weights(pipe) -> dict[str, tuple[str, torch.Tensor]]:
    """LoRA name -> (parameter name, weight) of every UNet and text encoder 1 linear/conv layer."""
    out = {}
    for part, names_of in (("unet", lambda m, mods: unet_lora_names(mods, m.config)), ("text_encoder", lambda m, mods: te1_lora_names(mods))):
        module = getattr(pipe, part)
        layers = {n: c for n, c in module.named_modules() if isinstance(c, (torch.nn.Linear, torch.nn.Conv2d))}
        for name, lora in names_of(module, layers).items():
            if lora:
                out[lora] = (f"{part}.{name}.weight", layers[name].weight.detach())
    return out


@pytest.mark.slow
def test_lora_pipeline_end_to_end_loads_back_in_diffusers(train_settings, tiny_model_dirs, tmp_path):
    settings = train_settings(
        prepare=False, training={"epochs": 1, "method": "lora", "lora": {"rank": RANK, "alpha": ALPHA}},
        sampling={"unit": "NEVER", "at_start": False}, lora={"extract": True},
        evaluation={"prompts": ["photo of ohwx man"], "seeds_per_prompt": 1, "steps": 2, "class_prior_images": 0,
                    "metrics": ["dino", "clip_i"], "dino_model": str(tiny_model_dirs.dino),
                    "clip_model": str(tiny_model_dirs.clip)})
    result = pipeline(settings)

    # 1. The chosen checkpoint is a LoRA; the extract-lora stage names it and extracts nothing.
    assert result.lora == result.chosen and is_lora_file(result.chosen)
    assert read_lora_metadata(result.chosen)["ss_network_dim"] == str(RANK)
    deltas = lora_deltas(result.chosen)
    assert deltas and any(d.abs().max() > 0 for d in deltas.values())  # trained: B moved from its zero init

    # 2. diffusers' loader: every module of the file gets an adapter (no key unused), and the fused
    # weights are base + the trained delta; every other weight stays the base's, bitwise.
    base = StableDiffusionXLPipeline.from_pretrained(tiny_model_dirs.sdxl)
    before = {k: v.clone() for part in ("unet", "text_encoder", "text_encoder_2")
              for k, v in getattr(base, part).state_dict(prefix=f"{part}.").items()}
    base.load_lora_weights(str(result.chosen), adapter_name="likeness")
    adapted = sum(isinstance(m, LoraLayer) for part in ("unet", "text_encoder", "text_encoder_2")
                  for m in getattr(base, part).modules())
    assert adapted == len(deltas)
    base.fuse_lora(lora_scale=1.0, adapter_names=["likeness"])
    base.unload_lora_weights()
    layers = module_weights(base)
    assert set(deltas) <= set(layers)
    for name, delta in deltas.items():
        key, merged = layers[name]
        expected = before[key].double() + delta
        assert torch.allclose(merged.double(), expected, rtol=0, atol=1e-6), name
    changed = {layers[name][0] for name in deltas}
    after = {k: v for part in ("unet", "text_encoder", "text_encoder_2")
             for k, v in getattr(base, part).state_dict(prefix=f"{part}.").items()}
    assert after.keys() == before.keys()
    assert [k for k in before if k not in changed and not torch.equal(after[k], before[k])] == []

    # 3. Extraction from the merged model at the LoRA's rank gives the trained delta back.
    merged_file = save_single_file(base, tmp_path / "merged.safetensors",
                                   CheckpointInfo(str(tiny_model_dirs.sdxl), 1, 0), dtype="float32")
    report = extract_lora(merged_file, tiny_model_dirs.sdxl, tmp_path / "extracted.safetensors", rank=RANK,
                          dtype="float32")
    extracted = lora_deltas(tmp_path / "extracted.safetensors")
    assert extracted.keys() == {name for name, d in deltas.items() if d.abs().max() > 0}
    for name, delta in extracted.items():
        assert torch.allclose(delta, deltas[name], rtol=0, atol=1e-5), name
    assert all(part.relative_error < 1e-2 for part in report.parts.values() if part.layers > part.unchanged)
