"""Shared test setup: no network, ever; tiny models are built from configs."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("LIKENESS_SERVER", "off")  # CLI commands in tests start no shared local server (issue 18)


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
    from likeness.models.tiny import save_tiny_models

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
    from likeness.settings import Settings

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


# --- training (issue 4) ----------------------------------------------------------------------


def prepare_workspace(settings):
    """Run the prepare stages as plain functions (no Prefect): manifest + latent cache for training."""
    from likeness.tasks.balance import balance_stage
    from likeness.tasks.captions import captions_stage
    from likeness.tasks.scan import scan_stage
    from likeness.tasks.latents import latents_stage
    from likeness.manifest import manifest_stage
    from likeness.tasks.masks import masks_stage
    from likeness.tasks.resize import resize_stage
    from likeness.workspace import Workspace

    ws = Workspace.from_settings(settings)
    index = ws.hashes()
    scan, report = scan_stage(settings.concepts, settings.resize.min_side, ws, index)
    report.raise_for_errors()
    resize = resize_stage(scan, settings.resize, ws, index)
    masks = masks_stage(resize, settings.masks, settings.concepts, ws, index, device="cpu")
    captions = captions_stage(resize, settings.concepts, settings.captioner, settings.run.seed, ws, index)
    balance, _ = balance_stage(resize, settings.concepts, settings.training, ws, index,
                               class_prior_images=settings.evaluation.class_prior_images)
    manifest = manifest_stage(resize, masks, captions, balance, settings.concepts, ws, index)
    latents_stage(manifest, settings, ws, index, device="cpu")
    return ws


@pytest.fixture
def train_settings(prepare_settings):
    """A factory of Settings for a short fp32 CPU training run on the prepare fixture's photos
    (workspace prepared on first call); keyword arguments are merged into the settings data."""

    def make(prepare: bool = True, **sections):
        training = {"epochs": 2, "train_dtype": "float32", "output_dtype": "float32", "gradient_checkpointing": False,
                    "unet": {"weight_dtype": "float32"}, "text_encoder": {"weight_dtype": "float32"},
                    "text_encoder_2": {"weight_dtype": "float32"}}
        defaults = {
            "training": training, "optimizer": {"stochastic_rounding": False},
            "schedule": {"warmup_steps": 0},
            "sampling": {"every": 1, "unit": "EPOCH", "steps": 2, "prompts": [{"prompt": "photo of ohwx man"}]},
            "saving": {"every": 1, "unit": "EPOCH", "prefix": "test"},
            "backups": {"every": 1, "unit": "EPOCH"},
            "evaluation": {"class_prior_images": 0},
        }
        from likeness.settings import Settings

        for name, value in sections.items():
            defaults[name] = _merge(defaults.get(name, {}), value)
        data = prepare_settings().model_dump(mode="json")
        settings = Settings.model_validate({name: _merge(data[name], value) for name, value in defaults.items()}
                                           | {name: data[name] for name in data if name not in defaults})
        if prepare:
            prepare_workspace(settings)
        return settings

    return make


def _merge(base, extra):
    if not (isinstance(base, dict) and isinstance(extra, dict)):
        return extra
    return {**base, **{k: _merge(base.get(k), v) for k, v in extra.items()}}


# --- a real Prefect server and `likeness serve` (issue 6) ------------------------------------
# One per session, only for the tests that ask for it (all marked slow): a `prefect server start`
# on a free 127.0.0.1 port and `likeness serve` of every deployment, run from a folder holding the
# demo profile's tiny models and photos. Both are stopped with their children at the end.

SERVE_OVERRIDES = ["training.epochs=1", "sampling.at_start=false", "evaluation.seeds_per_prompt=1", "evaluation.steps=2",
                   'evaluation.prompts=["photo of ohwx man"]',
                   "evaluation.during_training.every=1"]  # the demo's one in-training evaluation, at epoch 1 of 1


def _patient_client(base_url: str):
    """An httpx client that waits out 503s: a SQLite-backed server on a busy machine answers
    "Service Unavailable" while its database is locked, and a moment later it works."""
    import time

    import httpx

    class Patient(httpx.Client):
        def request(self, *args, **kwargs):
            for attempt in range(8):
                response = super().request(*args, **kwargs)
                if response.status_code != 503:
                    break
                time.sleep(0.5 * 2 ** min(attempt, 3))
            return response

    return Patient(base_url=base_url, timeout=60)


class Served:
    """The running server, seen through its REST API as the UI sees it."""

    def __init__(self, root: Path, host: str, port: int):
        self.root, self.host, self.port = root, host, port
        self.url = f"http://{host}:{port}"
        self.api = _patient_client(f"{self.url}/api")

    def env(self) -> dict[str, str]:
        """The environment of a client process of this server (its own PREFECT_HOME, not the user's)."""
        from likeness.deployments.server import server_env

        return server_env(self.host, self.port, self.root / "prefect-home")

    def deployment(self, full_name: str) -> dict:
        response = self.api.get(f"/deployments/name/{full_name}")
        response.raise_for_status()
        return response.json()

    def create_run(self, full_name: str, parameters: dict | None = None):
        """What the UI's Run button does: POST create_flow_run (the httpx response, not checked)."""
        return self.api.post(f"/deployments/{self.deployment(full_name)['id']}/create_flow_run",
                             json={"parameters": parameters or {}})

    def wait(self, run_id: str, timeout: float = 240) -> dict:
        import time

        deadline = time.monotonic() + timeout
        while True:
            run = self.api.get(f"/flow_runs/{run_id}").json()
            if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                return run
            assert time.monotonic() < deadline, f"flow run {run_id} still {run['state']['type']} after {timeout} s"
            time.sleep(0.5)

    def runs(self, **flow_runs) -> list[dict]:
        return self.api.post("/flow_runs/filter", json={"flow_runs": flow_runs, "sort": "EXPECTED_START_TIME_ASC"}).json()

    def run_tree(self, run_id: str) -> list[dict]:
        """A flow run and all its subflow runs, depth first."""
        tree, todo = [], [run_id]
        while todo:
            current = todo.pop()
            tree.append(self.api.get(f"/flow_runs/{current}").json())
            todo += [r["id"] for r in self.runs(parent_flow_run_id={"any_": [current]})]
        return tree

    def task_runs(self, flow_run_ids: list[str]) -> list[dict]:
        return self.api.post("/task_runs/filter", json={"task_runs": {"flow_run_id": {"any_": flow_run_ids}}}).json()

    def logs(self, flow_run_ids: list[str]) -> list[dict]:
        return self.api.post("/logs/filter", json={"logs": {"flow_run_id": {"any_": flow_run_ids}}, "sort": "TIMESTAMP_ASC"}).json()

    def events(self, prefix: str, since: str) -> list[dict]:
        body = {"filter": {"event": {"prefix": [prefix]}, "occurred": {"since": since}}, "limit": 50}
        return self.api.post("/events/filter", json=body).json()["events"]


@pytest.fixture(scope="session")
def served(tmp_path_factory):
    import shutil
    import subprocess
    import sys
    import time

    from likeness.deployments.server import die_with_parent, free_port, server_env, stop, wait_healthy

    # a fresh folder, as after a clone: `likeness serve --profile demo-cpu` writes the demo models and
    # photos itself (docs/operations.md, Way 1)
    root = tmp_path_factory.mktemp("served")
    host, port = "127.0.0.1", free_port()
    env = {**server_env(host, port, root / "prefect-home"), "PREFECT_RUNNER_POLL_FREQUENCY": "1",
           "PREFECT_LOCAL_STORAGE_PATH": str(root / "prefect-storage"), "HF_HUB_OFFLINE": "1"}
    script = shutil.which("likeness", path=str(Path(sys.executable).parent))

    def start(name: str, *args: str) -> subprocess.Popen:
        with open(root / f"{name}.log", "ab") as log:
            return subprocess.Popen([script, name, *args], cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, preexec_fn=die_with_parent)

    server = start("server", "--port", str(port))  # `likeness server`, as a user starts it
    serving = None
    try:
        wait_healthy(host, port, server)
        serving = start("serve", "--profile", "demo-cpu", *(a for o in SERVE_OVERRIDES for a in ("--set", o)))
        served = Served(root, host, port)
        deadline = time.monotonic() + 180  # it writes the demo files first
        while served.api.get("/deployments/name/likeness-watch/watch").status_code != 200:
            assert serving.poll() is None, (root / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "likeness serve registered no deployments in 180 s"
            time.sleep(0.5)
        time.sleep(2)  # the runner starts polling just after it registers the deployments
        yield served
    finally:
        if serving is not None:
            stop(serving)
        stop(server)


@pytest.fixture(scope="session")
def pipeline_run(served):
    """One pipeline run started through the API (the UI's Run button) with the demo profile, finished,
    with its logs arrived (they reach the server a few seconds after the run)."""
    import time

    response = served.create_run("likeness-pipeline/pipeline")
    assert response.status_code == 201, response.text
    run = served.wait(response.json()["id"], timeout=600)
    ids, seen, deadline = [r["id"] for r in served.run_tree(run["id"])], -1, time.monotonic() + 30
    while time.monotonic() < deadline:
        count = len(served.logs(ids))
        if count == seen:
            break
        seen = count
        time.sleep(2)
    return run


@pytest.fixture
def prepared_workspace():
    """`prepare_workspace` for tests: prepared_workspace(settings) -> Workspace."""
    return prepare_workspace


# --- evaluation (issue 5) --------------------------------------------------------------------


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test: tiny models gain nothing from threads, and threads spinning
    on a shared 2-core machine made generation ~10x slower (use with pytest.mark.usefixtures)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- SD 1.5 (issue 7) ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_sd15_dir(tmp_path_factory):
    """The tiny SD 1.5-shaped StableDiffusionPipeline folder, written once per session."""
    from likeness.models.tiny import save_tiny_sd15

    return save_tiny_sd15(tmp_path_factory.mktemp("tiny-sd15"))
