"""Manifest: the pandera schema accepts a good table and names the column of every corruption."""

import hashlib

import pandas as pd
import pytest
from PIL import Image

from likeness.manifest import COLUMNS, ManifestError, read_manifest, validate_manifest, write_manifest


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def manifest(tmp_path) -> pd.DataFrame:
    rows = []
    for i, (concept, masked, caption) in enumerate([("person", True, "ohwx man"), ("person", True, "ohwx man\nohwx man, smiling"),
                                                     ("reg", False, "None")]):  # "None" is a caption, not a missing value
        image, mask, text = tmp_path / f"{i}.png", tmp_path / f"{i}-masklabel.png", tmp_path / f"{i}.txt"
        Image.new("RGB", (64, 64), "white").save(image)
        Image.new("L", (64, 64), 255).save(mask)
        text.write_text(caption + "\n")
        rows.append({
            "id": f"{concept}/{i}", "concept": concept, "role": "subject" if concept == "person" else "regularization",
            "source_path": f"/photos/{i}.jpg", "source_hash": "a" * 64, "prepared_path": str(image),
            "prepared_hash": _sha(image), "mask_path": str(mask) if masked else None,
            "mask_hash": _sha(mask) if masked else None, "caption": caption, "caption_path": str(text),
            "width": 64, "height": 64, "original_width": 640, "original_height": 480, "scaled_width": 64,
            "scaled_height": 48, "offset_left": 0, "offset_top": 8, "balancing": 1.0 if concept == "person" else 0.0072,
            "balancing_strategy": "REPEATS", "loss_weight": 1.0, "validation": False,
        })
    return pd.DataFrame(rows, columns=COLUMNS)


def test_round_trip_keeps_every_value(manifest, tmp_path):
    path = tmp_path / "manifest.csv"
    write_manifest(manifest, path)
    back = read_manifest(path)
    assert list(back.columns) == COLUMNS
    assert back["mask_path"].tolist() == [manifest["mask_path"][0], manifest["mask_path"][1], None]
    assert back["caption"].tolist() == ["ohwx man", "ohwx man\nohwx man, smiling", "None"]
    assert back["balancing"].tolist() == [1.0, 1.0, 0.0072]
    assert back["validation"].dtype == bool and back["width"].dtype.kind == "i"


def _corrupt(df: pd.DataFrame, tmp_path, name: str):
    df = df.copy()
    if name == "balancing":
        df.loc[2, "balancing"] = 0.0
    elif name == "id":
        df.loc[1, "id"] = df.loc[0, "id"]
    elif name == "prepared_path":
        df.loc[0, "prepared_path"] = str(tmp_path / "gone.png")
    elif name == "caption":
        df.loc[1, "caption"] = "ohwx man\n "
    elif name == "mask_path":
        Image.new("L", (32, 32)).save(df.loc[0, "mask_path"])
    elif name == "role":
        df.loc[0, "role"] = "person"
    elif name == "source_hash":
        df.loc[0, "source_hash"] = "not-a-hash"
    elif name == "loss_weight":
        df = df.drop(columns=["loss_weight"])
    return df


@pytest.mark.parametrize("column", ["balancing", "id", "prepared_path", "caption", "mask_path", "role", "source_hash", "loss_weight"])
def test_a_corrupted_manifest_is_rejected_naming_the_column(manifest, tmp_path, column):
    validate_manifest(manifest)  # the uncorrupted one passes
    with pytest.raises(ManifestError) as raised:
        validate_manifest(_corrupt(manifest, tmp_path, column), tmp_path / "manifest.csv")
    assert column in str(raised.value) and "manifest.csv is invalid" in str(raised.value)


def test_a_corrupted_file_on_disk_is_rejected_on_read(manifest, tmp_path):
    path = tmp_path / "manifest.csv"
    write_manifest(manifest, path)
    path.write_text(path.read_text().replace(",0.0072,", ",-1,"))
    with pytest.raises(ManifestError, match="column 'balancing'"):
        read_manifest(path)
    with pytest.raises(ManifestError, match="likeness stage manifest"):
        read_manifest(tmp_path / "missing.csv")


def test_unknown_columns_are_rejected(manifest):
    with pytest.raises(ManifestError, match="extra"):
        validate_manifest(manifest.assign(extra=1))
