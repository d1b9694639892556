"""Datalist loading, writing and the patient-level split helper."""

import json

import pytest

from monai_ssl.data.datalist import (
    DatalistError,
    group_cases,
    load_datalist,
    num_classes,
    split_cases,
    training_cases,
    write_datalist,
)


def acdc_like_cases(n_patients=6):
    """Two frames (ED, ES) per patient, all labelled, plus one unlabelled-only case."""
    cases = []
    for p in range(n_patients):
        for frame in ("01", "12"):
            cid = f"patient{p:03d}_frame{frame}"
            cases.append({"case_id": cid, "patient_id": f"patient{p:03d}", "image": f"{cid}.nii.gz", "label": "x"})
    cases.append({"case_id": "extra", "image": "extra.nii.gz", "label": "y", "unlabeled_only": True})
    return cases


@pytest.mark.parametrize("seed", range(5))
def test_split_keeps_patients_together(seed):
    groups = split_cases(acdc_like_cases(), labeled=2, validation=1, test=1, seed=seed)
    assert {g: len(c) for g, c in groups.items()} == {"labeled": 4, "validation": 2, "test": 2, "unlabeled": 5}
    where = {}
    for g, cases in groups.items():
        for c in cases:
            assert c["group"] == g
            where.setdefault(c.get("patient_id", c["case_id"]), set()).add(g)
    assert all(len(gs) == 1 for gs in where.values()), where
    assert [c["case_id"] for c in groups["unlabeled"] if c.get("unlabeled_only")] == ["extra"]


def test_split_is_deterministic_by_seed_and_seed_matters():
    picks = [
        tuple(c["case_id"] for c in split_cases(acdc_like_cases(), labeled=1, seed=s)["labeled"]) for s in range(8)
    ]
    again = [
        tuple(c["case_id"] for c in split_cases(acdc_like_cases(), labeled=1, seed=s)["labeled"]) for s in range(8)
    ]
    assert picks == again
    assert len(set(picks)) > 1


def test_split_explicit_ids_and_errors():
    groups = split_cases(acdc_like_cases(), labeled=["patient003", "patient001_frame12"], test=1, seed=0)
    assert sorted({c["patient_id"] for c in groups["labeled"]}) == ["patient001", "patient003"]
    assert len(groups["labeled"]) == 4  # the named frame brings its patient's other frame along
    assert {c["patient_id"] for c in groups["test"]}.isdisjoint({"patient001", "patient003"})
    with pytest.raises(DatalistError, match="unlabelled-only"):
        split_cases(acdc_like_cases(), labeled=["extra"])
    with pytest.raises(DatalistError, match="unknown"):
        split_cases(acdc_like_cases(), labeled=["nobody"])
    with pytest.raises(DatalistError, match="only 6"):
        split_cases(acdc_like_cases(), labeled=7)


def test_write_and_load_roundtrip_relative_paths(tmp_path):
    (tmp_path / "img").mkdir()
    dl = {
        "name": "t",
        "labels": {"0": "background", "1": "a", "2": "b"},
        "labeled": [
            {"case_id": "a", "image": str(tmp_path / "img/a.nii.gz"), "label": str(tmp_path / "img/al.nii.gz")}
        ],
        "unlabeled": [
            {"case_id": "b", "image": str(tmp_path / "img/b.nii.gz"), "label": str(tmp_path / "img/bl.nii.gz")}
        ],
    }
    path = write_datalist(dl, tmp_path / "datalist.json")
    raw = json.loads(path.read_text())
    assert raw["labeled"][0]["image"] == "img/a.nii.gz"
    assert raw["unlabeled"][0]["group"] == "unlabeled"
    loaded = load_datalist(path)
    assert loaded["labeled"][0]["image"] == str(tmp_path / "img/a.nii.gz")
    assert loaded["labeled"][0]["patient_id"] == "a"
    assert num_classes(loaded) == 3
    # the unlabelled case's label is never handed to training code
    assert "label" not in group_cases(loaded, "unlabeled")[0]
    assert [c["case_id"] for c in training_cases(loaded)] == ["a", "b"]
    assert all("label" not in c for c in training_cases(loaded) if c["group"] == "unlabeled")


def test_load_reports_every_structural_problem(tmp_path):
    bad = {
        "labeled": [{"case_id": "a", "image": "a.nii.gz"}, {"case_id": "a", "image": "b.nii.gz", "label": "l"}],
        "test": [{"image": "c.nii.gz", "label": "l"}],
    }
    (tmp_path / "d.json").write_text(json.dumps(bad))
    with pytest.raises(DatalistError) as e:
        load_datalist(tmp_path / "d.json")
    msg = str(e.value)
    assert str(tmp_path / "d.json") in msg
    assert "needs a label" in msg and "also in labeled" in msg and "missing case_id" in msg
    (tmp_path / "e.json").write_text("{not json")
    with pytest.raises(DatalistError, match="not valid JSON"):
        load_datalist(tmp_path / "e.json")
    with pytest.raises(DatalistError, match="not found"):
        load_datalist(tmp_path / "missing.json")


def test_case_seed_is_seed_and_crc32_of_the_case_id():
    import zlib

    import numpy as np

    from monai_ssl.data.datalist import case_seed

    assert case_seed(3, "d123") == [3, zlib.crc32(b"d123")]
    a, b = (np.random.default_rng(case_seed(0, c)).random() for c in ("d1", "d2"))
    assert a != b and np.random.default_rng(case_seed(0, "d1")).random() == a
