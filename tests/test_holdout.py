import pandas as pd

from likeness.holdout import heldout_ids


def _manifest(n_reg: int, n_person: int = 4) -> pd.DataFrame:
    rows = [{"id": f"person/{i:03d}", "concept": "person", "role": "subject", "validation": False}
            for i in range(n_person)]
    rows += [{"id": f"reg/{i:04d}", "concept": "reg", "role": "regularization", "validation": False}
             for i in range(n_reg)]
    return pd.DataFrame(rows)


def test_holds_out_only_regularization_images_deterministically():
    df = _manifest(100)
    held = heldout_ids(df, 8)
    assert len(held) == 8 and all(i.startswith("reg/") for i in held)
    assert heldout_ids(df.sample(frac=1, random_state=1), 8) == held  # row order does not matter


def test_never_more_than_half_a_concept_and_zero_means_none():
    assert len(heldout_ids(_manifest(6), 8)) == 3
    assert heldout_ids(_manifest(100), 0) == set()
    assert heldout_ids(_manifest(0), 8) == set()
