"""Dataset fingerprints: renames and touches are no change, one changed/added/removed photo is;
only files whose size or mtime moved are read; the watcher's state survives a restart."""

import os
import shutil
from pathlib import Path

import pytest

from likeness.settings import Concept
from likeness.tasks import watch as fp
from likeness.tasks.watch import (
    FingerprintError, WatchState, check_dataset, fingerprint_concepts, record_announced, record_trained,
    watch_state_path,
)


@pytest.fixture
def concepts(tmp_path, photo):
    person, reg = tmp_path / "person", tmp_path / "reg"
    for i in range(3):
        photo(person / f"p{i}.jpg", i, size=(64, 64))
    for i in range(2):
        photo(reg / f"r{i}.png", i + 3, size=(48, 48))
    (person / ".DS_Store").write_bytes(b"hidden files are not the dataset")
    return [Concept(name="person", path=person),
            Concept(name="reg", path=reg, role="regularization", balancing="auto")]


def test_same_bytes_same_digest_and_stat_spares_hashing(concepts):
    first = fingerprint_concepts(concepts)
    assert first.hashed == 5 and len(first.files) == 5  # the hidden file is left out
    again = fingerprint_concepts(concepts, previous=first)
    assert again.digest == first.digest and again.hashed == 0


def test_rename_and_touch_are_no_change(concepts):
    first = fingerprint_concepts(concepts)
    person = concepts[0].path
    (person / "p0.jpg").rename(person / "renamed.jpg")
    later = (person / "p1.jpg").stat().st_mtime_ns + 5_000_000_000
    os.utime(person / "p1.jpg", ns=(later, later))
    after = fingerprint_concepts(concepts, previous=first)
    assert after.hashed == 2  # the renamed file and the touched one were candidates, confirmed by content
    assert after.digest == first.digest and not after.changes_since(first).any


@pytest.mark.parametrize("change", ["modify", "add", "remove", "move_to_other_concept"])
def test_one_photo_changes_the_digest(concepts, photo, change):
    first = fingerprint_concepts(concepts)
    person, reg = concepts[0].path, concepts[1].path
    if change == "modify":
        photo(person / "p2.jpg", 5, size=(64, 64))
    elif change == "add":
        photo(person / "p9.jpg", 4, size=(64, 64))
    elif change == "remove":
        (reg / "r1.png").unlink()
    else:
        shutil.move(person / "p0.jpg", reg / "p0.jpg")  # same bytes, other concept: trains differently
    after = fingerprint_concepts(concepts, previous=first)
    assert after.digest != first.digest
    assert after.changes_since(first).any
    assert after.hashed <= 1


def test_validation_and_disabled_concepts_are_not_fingerprinted(concepts, tmp_path, photo):
    held_out = Concept(name="val", path=tmp_path / "val", validation=True)
    photo(tmp_path / "val" / "v.png", 1, size=(32, 32))
    before = fingerprint_concepts([*concepts, held_out])
    photo(tmp_path / "val" / "v2.png", 2, size=(32, 32))
    assert fingerprint_concepts([*concepts, held_out]).digest == before.digest == fingerprint_concepts(concepts).digest


def test_missing_folder_names_the_concept(tmp_path):
    with pytest.raises(FingerprintError, match=r"concept 'ghost'.*concepts\[...\]\.path"):
        fingerprint_concepts([Concept(name="ghost", path=tmp_path / "nowhere")])


def test_watch_state_announces_a_change_once_until_trained(concepts, tmp_path, photo):
    ws = tmp_path / "ws"
    first = check_dataset(concepts, ws)
    assert first.changed and first.announce  # never trained: announce once
    record_announced(ws, first.current.digest)
    assert not check_dataset(concepts, ws).announce  # already announced, run pending
    record_trained(ws, first.current)
    quiet = check_dataset(concepts, ws)
    assert not quiet.changed and not quiet.announce and quiet.current.hashed == 0  # restart-safe: read from disk

    photo(concepts[0].path / "p1.jpg", 4, size=(64, 64))
    changed = check_dataset(concepts, ws)
    assert changed.changed and changed.announce and changed.current.hashed == 1
    assert (changed.changes.added, changed.changes.removed) == (1, 1)
    state = WatchState.load(watch_state_path(ws))
    assert state.trained.digest == first.current.digest and state.seen.digest == changed.current.digest


def test_damaged_state_file_says_what_to_do(tmp_path):
    path = watch_state_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.raises(FingerprintError, match="delete the file"):
        WatchState.load(path)


def test_state_is_written_atomically(concepts, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(fp, "write_atomic", lambda path, data: calls.append(Path(path)) or Path(path))
    check_dataset(concepts, tmp_path / "ws")
    assert calls == [watch_state_path(tmp_path / "ws")]
