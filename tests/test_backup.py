"""Backups: complete ones are found, half-written ones never are, old ones roll off, RNG restores."""

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

    monkeypatch.setattr(bk.torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 20)
    assert bk.latest_backup(tmp_path, "fp").step == 10
    monkeypatch.undo()
    save(tmp_path, 30)  # the next save cleans the leftover
    assert not list(tmp_path.glob(".backup-*"))


def test_a_backup_missing_its_files_is_ignored(tmp_path):
    path = save(tmp_path, 10)
    (path / bk.OBJECTS_FILE).unlink()
    assert bk.latest_backup(tmp_path, "fp") is None


def test_rng_states_restore(tmp_path):
    states = bk.capture_rng()
    expected = (random.random(), torch.rand(3))
    bk.restore_rng(states)
    assert random.random() == expected[0] and torch.equal(torch.rand(3), expected[1])
