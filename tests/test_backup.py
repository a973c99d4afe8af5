"""Backups: complete ones are found, half-written ones never are, old ones roll off, RNG restores;
no pickle is ever loaded: a crafted one is refused and runs nothing."""

import os
import random

import pytest
import torch

from likeness.trainer import backup as bk


def save(root, step, fingerprint="fp", keep=3, value=1.0):
    return bk.save_backup(
        root, step=step, fingerprint=fingerprint, weights={"unet": {"w": torch.full((2, 2), value)}},
        objects={"optimizer": {"state": {0: {"exp_avg_sq": torch.ones(2)}}, "param_groups": [{"lr": 1e-5}]}},
        progress={"epoch": step // 10, "batch": step % 10}, keep=keep,
    )


def test_round_trip(tmp_path):
    save(tmp_path, 20, value=3.0)
    latest = bk.latest_backup(tmp_path, "fp")
    assert latest.step == 20 and latest.progress == {"epoch": 2, "batch": 0}
    assert latest.parts() == ["unet"]
    assert torch.equal(latest.weights("unet")["w"], torch.full((2, 2), 3.0))
    assert latest.objects()["optimizer"]["param_groups"][0]["lr"] == 1e-5


def test_newest_with_the_same_fingerprint_wins(tmp_path):
    save(tmp_path, 10)
    save(tmp_path, 30)
    save(tmp_path, 40, fingerprint="other-settings")
    assert bk.latest_backup(tmp_path, "fp").step == 30
    assert bk.latest_backup(tmp_path, "never-seen") is None


def test_rolling_count(tmp_path):
    for step in (10, 20, 30, 40):
        save(tmp_path, step, keep=2)
    assert [b.step for b in bk.list_backups(tmp_path)] == [30, 40]


def test_a_half_written_backup_is_never_picked_up(tmp_path, monkeypatch):
    save(tmp_path, 10)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(bk, "write_state", killed)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 20)
    assert bk.latest_backup(tmp_path, "fp").step == 10
    monkeypatch.undo()
    save(tmp_path, 30)  # the next save cleans the leftover
    assert not list(tmp_path.glob(".backup-*"))


def test_a_backup_missing_its_files_is_ignored(tmp_path):
    path = save(tmp_path, 10)
    (path / f"{bk.OBJECTS}.json").unlink()
    assert bk.latest_backup(tmp_path, "fp") is None


def test_rng_states_restore(tmp_path):
    states = bk.capture_rng()
    expected = (random.random(), torch.rand(3))
    bk.restore_rng(states)
    assert random.random() == expected[0] and torch.equal(torch.rand(3), expected[1])


def test_the_state_round_trips_without_pickle(tmp_path):
    """Tuples, int keys, bf16, 0-d tensors, numpy arrays, NaN: back exactly as they went in."""
    rng = bk.capture_rng()
    optimizer = {"state": {0: {"step": 3, "exp_avg": torch.randn(2, 3).bfloat16(), "scale": torch.tensor(0.5)}},
                 "param_groups": [{"lr": 1e-5, "betas": (0.9, 0.999), "part": "unet", "params": [0]}]}
    path = bk.save_backup(tmp_path, step=1, fingerprint="fp", weights={}, progress={},
                          objects={"optimizer": optimizer, "losses": [{"loss": float("nan")}], "ema": None})
    assert not list(path.glob("*.pt"))
    objects = bk.latest_backup(tmp_path, "fp").objects()
    state = objects["optimizer"]["state"][0]
    assert state["exp_avg"].dtype == torch.bfloat16 and torch.equal(state["exp_avg"], optimizer["state"][0]["exp_avg"])
    assert state["scale"].shape == () and objects["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert objects["ema"] is None and objects["losses"][0]["loss"] != objects["losses"][0]["loss"]  # NaN
    assert objects["rng"]["python"] == rng["python"] and (objects["rng"]["numpy"][1] == rng["numpy"][1]).all()
    bk.restore_rng(objects["rng"])
    with pytest.raises(TypeError, match="a object cannot be stored in a backup"):
        bk.save_backup(tmp_path, step=2, fingerprint="fp", weights={}, progress={}, objects={"x": object()})


class Payload:
    """A pickle that runs code when loaded: it writes a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_pickle_in_a_backup_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "code-ran"
    path = save(tmp_path / "backups", 10)
    for name in ("objects.json", "objects.safetensors"):
        (path / name).unlink()
    torch.save({"optimizer": Payload(marker)}, path / bk.LEGACY_OBJECTS_FILE)  # an "older backup"
    backup = bk.latest_backup(tmp_path / "backups", "fp")
    assert backup is not None and backup.step == 10
    with pytest.raises(bk.BackupError, match=r"objects\.pt: refused to load this backup: .*never unpickled"):
        backup.objects()
    assert not marker.exists()


def test_a_pickle_in_place_of_the_state_file_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "code-ran"
    path = save(tmp_path / "backups", 10)
    torch.save({"optimizer": Payload(marker)}, path / "objects.safetensors")
    with pytest.raises(ValueError, match="objects.safetensors: not a readable training state"):
        bk.latest_backup(tmp_path / "backups", "fp").objects()
    assert not marker.exists()


def test_an_older_backup_of_tensors_numpy_and_plain_data_still_loads(tmp_path):
    path = save(tmp_path, 10)
    objects = path / "objects.json", path / "objects.safetensors"
    legacy = bk.read_state(path / bk.OBJECTS)
    for file in objects:
        file.unlink()
    torch.save(legacy, path / bk.LEGACY_OBJECTS_FILE)
    loaded = bk.latest_backup(tmp_path, "fp").objects()
    assert loaded["optimizer"]["param_groups"][0]["lr"] == 1e-5 and loaded["rng"]["python"] == legacy["rng"]["python"]
