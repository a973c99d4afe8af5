"""Real scale (issue 13) on the tiny model: parts load in their weight dtype (no fp32 UNet copy),
cached parts stay off the device, outputs are readable by other users, and the memory/speed knobs
(factor_conv, compile, batched loss records) train as the defaults do."""

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from likeness.files import atomic_path, temporary_folder, write_atomic
from likeness.models.checkpoint import CheckpointInfo, save_single_file
from likeness.models.loading import load_sdxl_pipeline
from likeness.trainer import loop, offload
from likeness.trainer.optimizer import Adafactor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from random_sdxl import build_random_sdxl, random_batch, reference_settings, step_trainer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")
REFERENCE = {"unet": torch.bfloat16, "vae": torch.float32, "text_encoder": torch.bfloat16,
             "text_encoder_2": torch.bfloat16}
FP32 = {"train_dtype": "float32", "gradient_checkpointing": False, "unet": {"weight_dtype": "float32"},
        "text_encoder": {"weight_dtype": "float32"}}


@pytest.fixture(scope="module")
def single_file(tiny_model_dirs, tmp_path_factory):
    pipe = load_sdxl_pipeline(tiny_model_dirs.sdxl)
    return save_single_file(pipe, tmp_path_factory.mktemp("file") / "tiny.safetensors", CheckpointInfo("tiny", 0, 0),
                            "bfloat16")


class Float32Shapes(TorchDispatchMode):
    """Records the shape of every float32 tensor an aten op writes (not on the meta device; `empty` only
    reserves memory: torch's layer constructors call it before accelerate moves the parameter to meta)."""

    def __init__(self):
        super().__init__()
        self.shapes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if "empty" in func.__name__:
            return out
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.device.type != "meta":
                self.shapes.add(tuple(t.shape))
        return out


@pytest.mark.parametrize("source", ["folder", "single file"])
def test_load_models_creates_every_part_in_its_weight_dtype(source, tiny_model_dirs, single_file):
    model = ({"base_model": str(tiny_model_dirs.sdxl)} if source == "folder" else
             {"base_model": str(single_file), "config": str(tiny_model_dirs.sdxl)})
    settings = reference_settings("cpu", model=model)
    reference = (load_sdxl_pipeline(tiny_model_dirs.sdxl) if source == "folder" else
                 load_sdxl_pipeline(single_file, config=tiny_model_dirs.sdxl))  # float32, cast below
    shapes = Float32Shapes()
    with shapes:
        pipe, trained = loop.load_models(settings, torch.device("cpu"))
    assert trained == ["unet", "text_encoder"]
    for part, dtype in REFERENCE.items():
        loaded, expected = getattr(pipe, part).state_dict(), getattr(reference, part).state_dict()
        assert {t.dtype for t in loaded.values() if t.is_floating_point()} == {dtype}, part
        assert all(torch.equal(loaded[k], expected[k].to(dtype)) for k in expected), part  # one rounding only
    # No float32 UNet weight ever existed: no fp32 tensor of a shape only the UNet has.
    others = {tuple(t.shape) for part in PARTS[1:] for t in getattr(pipe, part).state_dict().values()}
    unet_only = {tuple(t.shape) for t in pipe.unet.state_dict().values() if t.ndim >= 2} - others
    if source == "single file":  # the file is bf16; a folder's fp32 files are read as they are, a tensor at a time
        assert not shapes.shapes & unet_only


def test_export_cli_loads_in_the_output_dtype(tiny_model_dirs, tmp_path, monkeypatch):
    from likeness.models import checkpoint

    seen, real = {}, checkpoint.save_single_file
    monkeypatch.setattr(checkpoint, "save_single_file",
                        lambda pipe, *a: seen.setdefault("dtypes", {p: getattr(pipe, p).dtype for p in PARTS}) and real(pipe, *a))
    checkpoint.main([str(tiny_model_dirs.sdxl), str(tmp_path / "out.safetensors"), "--dtype", "bfloat16"])
    assert set(seen["dtypes"].values()) == {torch.bfloat16}
    assert stat.S_IMODE((tmp_path / "out.safetensors").stat().st_mode) == 0o666 & ~_umask()


def test_frozen_parts_stay_on_the_host_and_visit_the_device_to_sample(monkeypatch):
    pipe = build_random_sdxl("cpu", tiny=True)
    settings = reference_settings("cpu")
    assert offload.offloaded_parts(settings) == ["vae", "text_encoder_2"]
    assert offload.offloaded_parts(reference_settings("cpu", training={"offload_frozen": False})) == []
    assert offload.offloaded_parts(reference_settings("cpu", training={"text_encoder": {"train": False}})) == [
        "vae", "text_encoder", "text_encoder_2"]
    device = torch.device("meta")  # a device that is not the host (weights are dropped there, fine for placement)
    loop.place_models(pipe, settings, device)
    assert {p: getattr(pipe, p).device.type for p in PARTS} == {
        "unet": "meta", "text_encoder": "meta", "vae": "cpu", "text_encoder_2": "cpu"}

    moves = []
    monkeypatch.setattr(offload, "move", lambda module, to: moves.append((type(module).__name__, to.type)))
    with pytest.raises(RuntimeError), offload.on_device(pipe, ["vae", "text_encoder_2"], torch.device("cuda")):
        assert len(moves) == 2
        raise RuntimeError("sampling failed")
    assert moves == [("AutoencoderKL", "cuda"), ("CLIPTextModelWithProjection", "cuda"),
                     ("AutoencoderKL", "cpu"), ("CLIPTextModelWithProjection", "cpu")]  # back also after an error


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_outputs_get_the_umask_mode_and_stay_atomic(tmp_path, mask):
    from PIL import Image

    from likeness.models.sampling import save_sample

    old = os.umask(mask)
    try:
        text = write_atomic(tmp_path / "report.md", "ok")
        image = save_sample(Image.new("RGB", (8, 8)), tmp_path / "samples" / "s.jpg")
        with atomic_path(tmp_path / "ckpt.safetensors") as tmp:
            tmp.write_bytes(b"x")
        folder = temporary_folder(tmp_path / "diffusers-checkpoint")
    finally:
        os.umask(old)
    for path in (text, image, tmp_path / "ckpt.safetensors"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, path
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~mask
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [folder.name]  # no leftovers


def test_factor_conv_matrix_keeps_one_row_and_one_column_per_conv_kernel():
    conv, linear = torch.nn.Parameter(torch.randn(8, 4, 3, 3)), torch.nn.Parameter(torch.randn(6, 5))
    states = {}
    for mode in ("kernel", "matrix"):
        params = [torch.nn.Parameter(conv.detach().clone()), torch.nn.Parameter(linear.detach().clone())]
        optimizer = Adafactor(params, lr=1e-2, factor_conv=mode, stochastic_rounding=False)
        for p in params:
            p.grad = torch.ones_like(p) + p.detach()
        optimizer.step()
        states[mode] = (optimizer.state[params[0]], optimizer.state[params[1]], params)
    kernel, matrix = states["kernel"][0], states["matrix"][0]
    assert kernel["exp_avg_sq_row"].shape == (8, 4, 3) and kernel["exp_avg_sq_col"].shape == (8, 4, 3)
    assert matrix["exp_avg_sq_row"].shape == (8,) and matrix["exp_avg_sq_col"].shape == (36,)
    assert torch.equal(states["kernel"][2][1], states["matrix"][2][1])  # 2-D weights: the same maths
    assert not torch.equal(states["kernel"][2][0], states["matrix"][2][0])
    with pytest.raises(ValueError, match="factor_conv"):
        Adafactor([conv], factor_conv="rows")


def _losses(settings, steps=3):
    pipe = build_random_sdxl("cpu", {"unet": torch.float32, "text_encoder": torch.float32}, tiny=True)
    t = step_trainer(pipe, settings, torch.device("cpu"))
    batch = random_batch(pipe, 64)
    losses = []
    for step in range(steps):
        losses.append(t.forward_backward(batch, step))
        t.optimizer_step(losses[-1])
    return torch.tensor(losses), t


@pytest.mark.parametrize("knob", [
    {"optimizer": {"adafactor": {"factor_conv": "matrix"}}},
    # inductor (the default backend) compiles for minutes on 2 cores: dynamo's tracing alone here,
    # with AOT autograd (the compiled backward and the fused back pass's hooks) as a slow test
    {"training": {"compile": True, "compile_backend": "eager"}},
    pytest.param({"training": {"compile": True, "compile_backend": "aot_eager"}}, marks=pytest.mark.slow),
])
def test_memory_and_speed_knobs_train_as_the_default_does(knob):
    base, _ = _losses(reference_settings("cpu", training=FP32, optimizer={"stochastic_rounding": False}))
    sections = {"training": dict(FP32), "optimizer": {"stochastic_rounding": False}}
    for name, values in knob.items():
        sections[name] = {**sections[name], **values}
    changed, t = _losses(reference_settings("cpu", **sections))
    assert torch.allclose(changed[0], base[0], rtol=1e-5)  # the first loss comes before any update
    assert torch.allclose(changed, base, rtol=2e-2), (changed, base)
    assert all(not k.startswith("_orig_mod") for k in t.pipe.unet.state_dict())  # checkpoints keep their keys


def test_losses_read_every_n_steps_still_fill_every_row(train_settings):
    from tests.test_loop import QUIET, Recorder

    settings = train_settings(training={"epochs": 1, "read_loss_every": 4}, **QUIET)
    recorder = Recorder()
    result = loop.train(settings, log=lambda m: None, sinks=[recorder])
    rows = (result.loss_table.read_text().splitlines())[1:]
    assert len(rows) == result.steps > 4
    assert [step for step, _ in recorder.scalars_seen] == list(range(1, result.steps + 1))
    assert loop.training_fingerprint(settings, loop.Workspace.from_settings(settings)) == loop.training_fingerprint(
        train_settings(prepare=False, training={"epochs": 1}, **QUIET), loop.Workspace.from_settings(settings))


def test_real_size_bench_functions_on_the_tiny_model(tmp_path):
    import real_size

    written = real_size.write_models(tmp_path, tiny=True)
    assert (tmp_path / "sdxl" / "model_index.json").is_file() and (tmp_path / "sdxl.safetensors").is_file()
    for source in ("folder", "file"):
        row = real_size.load(tmp_path, source)
        assert row["dtypes"] == {"unet": "bfloat16", "vae": "float32", "text_encoder_2": "bfloat16"}
        assert row["floor"] == sum(written["bytes"].values()) and row["VmHWM"] >= row["VmHWM_loaded"] > 0
    rows = {r["variant"]: r for r in real_size.steps(tiny=True, resolution=64)}
    reference = rows["reference (fused, offload, kernel)"]
    assert reference["gradients"] == 0 < rows["fused back pass off"]["gradients"]
    assert reference["offloaded"] > 0 == rows["offload_frozen off"]["offloaded"]
    assert rows["factor_conv matrix"]["state"] < reference["state"]
    assert all(r["peak"] >= r["before"] > 0 for r in rows.values())


@pytest.mark.slow
def test_real_size_bench_runs_tiny_from_the_command_line(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "real_size.py"), "--tiny", "--phases", "steps",
                          "--resolution", "64", "--work", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "tiny SDXL, random weights" in out.stdout and "factor_conv matrix" in out.stdout
