"""Shared test setup: no network, ever; tiny models are built from configs."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# --- prepare stages and Prefect flows (issue 3) ----------------------------------------------
# Only tests that ask for these fixtures pay for them: pure tests stay fast.

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # offline: no telemetry, no "database is locked"


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary Prefect server and database for the session (started on first use, ~10 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def prefect_flows(prefect_harness, tmp_path):
    """Run flows in this test: cache records in a fresh folder (the harness does not isolate them),
    and no heartbeat thread (it adds ~1 s to every sync flow run)."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: tmp_path / "prefect-storage",
                             PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
    """The tiny SDXL pipeline and CLIPSeg folders (TinyModels), written once per session."""
    from likeness.trainer.tiny_models import save_tiny_models

    return save_tiny_models(tmp_path_factory.mktemp("tiny-models"))


def write_photo(path: Path, index: int = 0, size: tuple[int, int] | None = None, **save_args) -> Path:
    """A real photo from scikit-image (astronaut, chelsea, coffee, ... by index), optionally resized."""
    from PIL import Image
    from skimage import data

    photos = (data.astronaut, data.chelsea, data.coffee, data.rocket, data.camera, data.immunohistochemistry)
    image = Image.fromarray(photos[index % len(photos)]())
    if size:
        image = image.resize(size)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **save_args)
    return path


@pytest.fixture
def photo():
    """`write_photo` for tests: photo(path, index, size, **save_args) -> path."""
    return write_photo


@pytest.fixture
def prepare_settings(tmp_path, tiny_model_dirs):
    """A factory of Settings for a prepare run in tmp_path: 3 person photos, 4 regularization photos,
    64 px, tiny models, CPU, no retries; keyword arguments are merged into the settings data."""
    from likeness.trainer.settings import Settings

    person, reg = tmp_path / "photos" / "person", tmp_path / "photos" / "reg"
    for i in range(3):
        write_photo(person / f"p{i}.jpg", i, quality=95)
    for i in range(4):
        write_photo(reg / f"r{i}.png", i + 3, size=(80, 60))

    def make(**sections) -> Settings:
        data = {
            "run": {"workspace": str(tmp_path / "ws"), "device": "cpu", "retries": 0, "retry_delay_seconds": 0, "workers": 2},
            "model": {"base_model": str(tiny_model_dirs.sdxl)},
            "concepts": [
                {"name": "person", "path": str(person), "caption": {"source": "text", "text": "ohwx man"}},
                {"name": "reg", "path": str(reg), "role": "regularization", "balancing": "auto",
                 "caption": {"source": "text", "text": "man"}},
            ],
            "resize": {"resolution": 64, "min_side": 32},
            "masks": {"model": str(tiny_model_dirs.clipseg), "batch_size": 2},
            "training": {"text_encoder_2": {"weight_dtype": "float32"}},
        }
        for name, value in sections.items():
            data[name] = {**data[name], **value} if isinstance(value, dict) else value
        return Settings.model_validate(data)

    make.person, make.reg = person, reg
    return make
