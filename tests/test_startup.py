"""Fast paths of repeated commands (issue 18): `--help` imports no heavy package, a second demo
rewrites none of its inputs, and the shared local server is found, or ignored when stale."""

import os
import subprocess
import sys

from likeness.deployments import local_server
from likeness.terminal import QUIET_ENVIRONMENT

HEAVY = ("torch", "prefect", "diffusers", "transformers", "pandas")


def test_help_imports_no_heavy_package():
    code = ("import sys\nfrom likeness.cli import app\ntry:\n    app(['--help'])\nexcept SystemExit:\n    pass\n"
            f"print('LOADED', [m for m in {HEAVY!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "likeness" in out and out.strip().splitlines()[-1] == "LOADED []"


MODEL_LIBRARIES = ("torch", "diffusers", "transformers", "peft", "accelerate", "cv2")


def test_the_flows_and_their_cache_keys_import_no_model_library():
    """A cached run executes the flows and the tasks' cache keys only: torch & co. are imported by the
    task bodies that load a model."""
    code = ("import sys\nfrom likeness.terminal import quiet_libraries\nquiet_libraries(False)\n"
            "import likeness.flows.pipeline, likeness.flows.lora, likeness.demo, likeness.cli\n"
            f"print('LOADED', [m for m in {MODEL_LIBRARIES!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "LOADED []"


def test_a_library_imported_after_quieting_is_quieted_when_it_loads():
    code = ("import logging\nfrom likeness.terminal import quiet_libraries\nquiet_libraries(False)\n"
            "from diffusers.utils import logging as dl\nfrom transformers.utils import logging as tl\n"
            "dl.get_logger('diffusers.models').warning('diffusers-speaks')\n"
            "tl.get_logger('transformers.models').warning('transformers-speaks')\n"
            "print('BARS', dl.is_progress_bar_enabled(), tl.is_progress_bar_enabled())\n")
    loud = {k: v for k, v in os.environ.items() if k not in QUIET_ENVIRONMENT and k != "LIKENESS_DEBUG"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=loud)
    assert "speaks" not in done.stdout + done.stderr
    assert done.stdout.strip().splitlines()[-1] == "BARS False False"


def test_a_second_demo_rewrites_none_of_its_inputs(tmp_path, tiny_model_dirs):
    from likeness.demo_data import write_demo_photos
    from likeness.models.tiny import save_tiny_models

    models = tiny_model_dirs.sdxl.parent
    photos = write_demo_photos(tmp_path / "photos", seed=1, counts={"person": 2, "regularization": 2})

    def mtimes():
        files = [p for p in models.rglob("*") if p.is_file()] + [p for ps in photos.values() for p in ps]
        return {p: p.stat().st_mtime_ns for p in files}

    before = mtimes()
    save_tiny_models(models, seed=0)
    write_demo_photos(tmp_path / "photos", seed=1, counts={"person": 2, "regularization": 2})
    assert mtimes() == before


def test_demo_photos_are_generated_again_only_when_one_changed(tmp_path, monkeypatch):
    from likeness import demo_data

    counts = {"person": 2, "regularization": 1}
    first = demo_data.write_demo_photos(tmp_path, seed=3, counts=counts)
    calls = []
    real = demo_data.variation
    monkeypatch.setattr(demo_data, "variation", lambda *a: calls.append(1) or real(*a))
    assert demo_data.write_demo_photos(tmp_path, seed=3, counts=counts) == first and calls == []  # all intact
    original = first["person"][1].read_bytes()
    first["person"][1].write_bytes(b"not a photo")
    assert demo_data.write_demo_photos(tmp_path, seed=3, counts=counts) == first and len(calls) == 3
    assert first["person"][1].read_bytes() == original  # the same photo written again
    demo_data.write_demo_photos(tmp_path, seed=4, counts=counts)  # another seed: other photos
    assert len(calls) == 6 and first["person"][1].read_bytes() != original


def test_the_recorded_server_is_used_only_while_it_answers(tmp_path, monkeypatch):
    monkeypatch.setattr(local_server, "healthy", lambda host, port: port == 4321)
    assert local_server.read_state(tmp_path) is None
    local_server.write_state("127.0.0.1", 4321, os.getpid(), tmp_path)
    assert local_server.read_state(tmp_path)["url"] == "http://127.0.0.1:4321/api"
    local_server.write_state("127.0.0.1", 4322, os.getpid(), tmp_path)  # a server that died: not used
    assert local_server.read_state(tmp_path) is None
    local_server.clear_state(os.getpid() + 1, tmp_path)  # another process's record stays
    assert (local_server.state_dir(tmp_path) / "server.json").is_file()
    local_server.clear_state(os.getpid(), tmp_path)
    assert not (local_server.state_dir(tmp_path) / "server.json").exists()


def test_the_keeper_counts_live_clients_and_forgets_dead_ones(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    local_server.register_client(tmp_path)
    local_server.register_client(tmp_path, pid=int(dead.stdout))
    assert local_server.live_clients(tmp_path) == 1
    assert [p.name for p in (local_server.state_dir(tmp_path) / "clients").iterdir()] == [str(os.getpid())]


def test_a_prefect_profile_with_an_api_url_or_off_keeps_the_shared_server_out(tmp_path, monkeypatch):
    (tmp_path / "profiles.toml").write_text('active = "mine"\n[profiles.mine]\nPREFECT_API_URL = "http://box:4200/api"\n')
    assert local_server.profile_api_url(tmp_path) == "http://box:4200/api"
    monkeypatch.setenv("LIKENESS_SERVER", "off")
    assert not local_server.enabled()
    monkeypatch.setenv("LIKENESS_SERVER", "auto")
    assert local_server.enabled()
