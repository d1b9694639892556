"""Dataset converters (ACDC, Synapse) and the data command line, on tiny mock dataset trees."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from monai_ssl.data.__main__ import count_or_ids, main
from monai_ssl.data.converters import (
    SYNAPSE_REMAP,
    ConversionError,
    convert_acdc,
    convert_synapse,
    remap_label_file,
)
from monai_ssl.data.datalist import GROUPS, DatalistError, load_datalist

AFFINE = np.array([[-1.5, 0.0, 0.0, 10.0], [0.0, 1.25, 0.0, -20.0], [0.0, 0.0, 5.0, 3.0], [0.0, 0.0, 0.0, 1.0]])


def _nifti(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def _acdc_patient(folder: Path, pid: str, ed: int, es: int, info: bool = True, gt: bool = True) -> None:
    """A patient folder as ACDC ships it: 4d volume, ED/ES frames with _gt labels, Info.cfg."""
    vol = np.zeros((8, 8, 4), np.float32)
    _nifti(folder / pid / f"{pid}_4d.nii.gz", np.zeros((8, 8, 4, 3), np.float32))
    for frame in (ed, es):
        _nifti(folder / pid / f"{pid}_frame{frame:02d}.nii.gz", vol)
        if gt:
            _nifti(folder / pid / f"{pid}_frame{frame:02d}_gt.nii.gz", vol.astype(np.uint8))
    if info:
        text = f"ED: {ed}\nES: {es}\nGroup: NOR\nHeight: 180.0\nNbFrame: 30\nWeight: 80.0\n"
        (folder / pid / "Info.cfg").write_text(text)


@pytest.fixture(scope="module")
def acdc_root(tmp_path_factory) -> Path:
    """Six labelled patients in training/ and testing/, one with an extra unlabelled frame, one flat."""
    root = tmp_path_factory.mktemp("acdc")
    for i in range(1, 5):
        _acdc_patient(root / "training", f"patient{i:03d}", ed=1, es=10 + i)
    _acdc_patient(root / "testing", "patient101", ed=1, es=9)
    _acdc_patient(root, "patient102", ed=2, es=7, info=False)
    _nifti(root / "training" / "patient004" / "patient004_frame05.nii.gz", np.zeros((8, 8, 4), np.float32))
    return root


def _by_id(datalist: dict) -> dict[str, dict]:
    return {c["case_id"]: c for g in GROUPS for c in datalist[g]}


def test_acdc_cases_fields_and_phases(acdc_root, tmp_path):
    dl = convert_acdc(acdc_root, tmp_path / "acdc.json", labeled=2, validation=1, test=1, seed=0)
    cases = _by_id(dl)
    # 6 patients x (ED, ES) + one extra frame; the 4d files are not cases
    assert len(cases) == 13 and not any("4d" in c for c in cases)
    assert (dl["name"], dl["modality"]) == ("acdc", "MR")
    assert dl["labels"] == {"0": "background", "1": "RV", "2": "MYO", "3": "LV"}
    c = cases["patient003_frame13"]
    assert (c["patient_id"], c["frame"], c["phase"]) == ("patient003", 13, "ES")
    assert c["image"] == str(acdc_root / "training/patient003/patient003_frame13.nii.gz")
    assert c["label"] == str(acdc_root / "training/patient003/patient003_frame13_gt.nii.gz")
    assert cases["patient003_frame01"]["phase"] == "ED"
    assert cases["patient101_frame09"]["phase"] == "ES"
    # no Info.cfg: no phase invented
    assert "phase" not in cases["patient102_frame02"] and cases["patient102_frame07"]["frame"] == 7
    # the frame without _gt is unlabelled-only, and its patient therefore stays in the unlabelled group
    extra = cases["patient004_frame05"]
    assert extra["unlabeled_only"] and "label" not in extra and "phase" not in extra
    assert {c["group"] for c in cases.values() if c["patient_id"] == "patient004"} == {"unlabeled"}


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_acdc_frames_of_a_patient_share_a_group(acdc_root, tmp_path, seed):
    dl = convert_acdc(acdc_root, tmp_path / "acdc.json", labeled=2, validation=1, test=1, seed=seed)
    group_of: dict[str, set[str]] = {}
    for c in _by_id(dl).values():
        group_of.setdefault(c["patient_id"], set()).add(c["group"])
    assert all(len(g) == 1 for g in group_of.values())
    # counts are patients: 2 labelled patients = 4 frames
    assert [len(dl[g]) for g in ("labeled", "validation", "test")] == [4, 2, 2]


def test_acdc_split_is_deterministic_by_seed(acdc_root, tmp_path):
    def groups(seed: int, name: str) -> dict[str, list[str]]:
        dl = convert_acdc(acdc_root, tmp_path / name, labeled=2, validation=1, seed=seed)
        return {g: [c["case_id"] for c in dl[g]] for g in GROUPS}

    assert groups(0, "a.json") == groups(0, "b.json")
    # 5 eligible patients: some seed among a few must pick a different labelled pair
    assert any(groups(s, f"s{s}.json")["labeled"] != groups(0, "a.json")["labeled"] for s in range(1, 6))


def test_acdc_explicit_labeled_ids(acdc_root, tmp_path):
    dl = convert_acdc(acdc_root, tmp_path / "acdc.json", labeled=["patient002", "patient101"], test=["patient102"])
    assert [c["case_id"] for c in dl["labeled"]] == [
        "patient002_frame01",
        "patient002_frame12",
        "patient101_frame01",
        "patient101_frame09",
    ]
    assert {c["patient_id"] for c in dl["test"]} == {"patient102"}
    # a patient with an unlabelled frame cannot be asked for as labelled
    with pytest.raises(DatalistError, match="patient004"):
        convert_acdc(acdc_root, tmp_path / "bad.json", labeled=["patient004"])


def test_acdc_bad_input_names_the_path(tmp_path):
    with pytest.raises(ConversionError, match=str(tmp_path / "missing")):
        convert_acdc(tmp_path / "missing", tmp_path / "dl.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="no ACDC frames"):
        convert_acdc(tmp_path / "empty", tmp_path / "dl.json")
    root = tmp_path / "acdc"
    _acdc_patient(root, "patient001", ed=1, es=12)
    bad = _nifti(root / "patient001" / "patient001_frameXX.nii.gz", np.zeros((2, 2, 2), np.float32))
    with pytest.raises(ConversionError, match=f"{bad}: not an ACDC file name"):
        convert_acdc(root, tmp_path / "dl.json")
    bad.unlink()
    orphan = _nifti(root / "patient001" / "patient001_frame03_gt.nii.gz", np.zeros((2, 2, 2), np.uint8))
    with pytest.raises(ConversionError, match=f"{orphan}: label without its image"):
        convert_acdc(root, tmp_path / "dl.json")
    orphan.unlink()
    (root / "patient001" / "Info.cfg").write_text("ED: one\nES: 12\n")
    with pytest.raises(ConversionError, match="Info.cfg: 'ED: one'"):
        convert_acdc(root, tmp_path / "dl.json")
    assert not (tmp_path / "dl.json").exists()


# --- Synapse ---------------------------------------------------------------------------------------------------------


def _synapse_root(root: Path, n: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for i in range(1, n + 1):
        _nifti(root / "img" / f"img{i:04d}.nii.gz", rng.normal(size=(8, 8, 4)).astype(np.float32))
        # every original value 0..13 present, float-stored as some BTCV files are
        lab = np.resize(np.arange(14), 8 * 8 * 4)
        lab = rng.permutation(lab).reshape(8, 8, 4).astype(np.float32)
        _nifti(root / "label" / f"label{i:04d}.nii.gz", lab)
    return root


def test_synapse_remap_table_voxel_by_voxel(tmp_path):
    root = _synapse_root(tmp_path / "synapse", n=1)
    dl = convert_synapse(root, tmp_path / "out" / "synapse.json")
    src = nib.load(root / "label" / "label0001.nii.gz")
    out_path = tmp_path / "out" / "labels_8organ" / "label0001.nii.gz"
    assert dl["labeled"][0]["label"] == str(out_path)
    out = nib.load(out_path)
    s, o = np.asanyarray(src.dataobj), np.asanyarray(out.dataobj)
    assert set(np.unique(s).tolist()) == set(range(14))
    # the expected 8-organ value of each original organ, written out by name from the two label tables
    by_name = {
        "spleen": 7,
        "right_kidney": 4,
        "left_kidney": 3,
        "gallbladder": 2,
        "esophagus": 0,
        "liver": 5,
        "stomach": 8,
        "aorta": 1,
        "inferior_vena_cava": 0,
        "portal_and_splenic_veins": 0,
        "pancreas": 6,
        "right_adrenal_gland": 0,
        "left_adrenal_gland": 0,
        "background": 0,
    }
    expected = {int(k): by_name[v] for k, v in dl["source_labels"].items()}
    assert expected == SYNAPSE_REMAP
    for idx in np.ndindex(s.shape):
        assert o[idx] == expected[int(s[idx])], idx
    # the table is recorded in the datalist, and names agree with the 8-organ table
    assert dl["label_remap"] == {str(k): v for k, v in expected.items()}
    assert all(dl["labels"][str(v)] == name for name, v in by_name.items() if v)
    # header and geometry preserved, integer dtype
    assert out.get_data_dtype() == np.uint8 and o.dtype == np.uint8
    np.testing.assert_allclose(out.affine, src.affine)
    np.testing.assert_allclose(out.header.get_sform(), src.header.get_sform())
    assert out.header.get_qform(coded=True)[1] == src.header.get_qform(coded=True)[1]
    assert out.header.get_zooms() == src.header.get_zooms()


def test_synapse_datalist_loads_and_rerun_is_idempotent(tmp_path):
    root = _synapse_root(tmp_path / "synapse")
    out = tmp_path / "dl" / "synapse.json"
    convert_synapse(root, out, labeled=1, validation=1, test=1, seed=3)
    dl = load_datalist(out)
    assert (dl["name"], dl["modality"]) == ("synapse", "CT")
    cases = _by_id(dl)
    assert sorted(cases) == ["case0001", "case0002", "case0003"]
    assert sorted(len(dl[g]) for g in GROUPS) == [0, 1, 1, 1]
    for c in cases.values():
        # images in place, labels remapped beside the datalist, both existing
        assert c["image"] == str(root / "img" / f"img{c['case_id'][4:]}.nii.gz")
        assert Path(c["label"]).parent == out.parent / "labels_8organ" and Path(c["label"]).is_file()
    # paths in the file are relative to it for the labels (under its folder)
    raw = json.loads(out.read_text())
    assert not any(Path(c["label"]).is_absolute() for g in GROUPS for c in raw[g])
    labels = sorted((out.parent / "labels_8organ").iterdir())
    stamps = [p.stat().st_mtime_ns for p in labels]
    convert_synapse(root, out, labeled=1, validation=1, test=1, seed=3)
    assert [p.stat().st_mtime_ns for p in labels] == stamps
    assert sorted((out.parent / "labels_8organ").iterdir()) == labels  # no temporary files left
    assert json.loads(out.read_text()) == raw
    # a changed source label is rewritten
    src = root / "label" / "label0002.nii.gz"
    os.utime(src, ns=(stamps[1] + 10**9, stamps[1] + 10**9))
    convert_synapse(root, out, labeled=1, validation=1, test=1, seed=3)
    assert labels[1].stat().st_mtime_ns != stamps[1] and labels[0].stat().st_mtime_ns == stamps[0]


def test_synapse_labels_dir_and_unlabeled(tmp_path):
    root = _synapse_root(tmp_path / "synapse", n=2)
    _nifti(root / "img" / "img0003.nii.gz", np.zeros((8, 8, 4), np.float32))
    with pytest.raises(ConversionError, match=f"{root / 'img' / 'img0003.nii.gz'}: no label"):
        convert_synapse(root, tmp_path / "dl.json")
    dl = convert_synapse(root, tmp_path / "dl.json", labels_dir=tmp_path / "lab8", allow_unlabeled=True)
    cases = _by_id(dl)
    assert cases["case0003"]["unlabeled_only"] and "label" not in cases["case0003"]
    assert cases["case0003"]["group"] == "unlabeled"
    assert sorted(p.name for p in (tmp_path / "lab8").iterdir()) == ["label0001.nii.gz", "label0002.nii.gz"]


def test_synapse_bad_input_names_the_path(tmp_path):
    root = tmp_path / "synapse"
    (root / "img").mkdir(parents=True)
    with pytest.raises(ConversionError, match=f"{root / 'img'}: no Synapse images"):
        convert_synapse(root, tmp_path / "dl.json", allow_unlabeled=True)
    _synapse_root(root, n=1)
    with pytest.raises(ConversionError, match="would overwrite the original"):
        convert_synapse(root, tmp_path / "dl.json", labels_dir=root / "label")
    (root / "label" / "label0001.nii.gz").rename(root / "label" / "seg0001.nii.gz")
    with pytest.raises(ConversionError, match=f"{root / 'label' / 'seg0001.nii.gz'}: not a Synapse file name"):
        convert_synapse(root, tmp_path / "dl.json")
    bad = _nifti(tmp_path / "bad.nii.gz", np.full((2, 2, 2), 14.0, np.float32))
    with pytest.raises(ConversionError, match=rf"{bad}: label values \[14\]"):
        remap_label_file(bad, tmp_path / "out.nii.gz", SYNAPSE_REMAP)
    bad = _nifti(tmp_path / "frac.nii.gz", np.full((2, 2, 2), 1.5, np.float32))
    with pytest.raises(ConversionError, match=f"{bad}: label values must be integers"):
        remap_label_file(bad, tmp_path / "out.nii.gz", SYNAPSE_REMAP)
    assert not (tmp_path / "out.nii.gz").exists() and not (tmp_path / "dl.json").exists()


# --- command line ----------------------------------------------------------------------------------------------------


def test_count_or_ids():
    assert count_or_ids("3") == 3
    assert count_or_ids(" patient001, patient007 ") == ["patient001", "patient007"]
    assert count_or_ids("9861,") == ["9861"]
    with pytest.raises(Exception, match="neither a count"):
        count_or_ids(",")


def test_cli_convert_acdc_subprocess(acdc_root, tmp_path):
    out = tmp_path / "acdc.json"
    cmd = [sys.executable, "-m", "monai_ssl.data", "convert-acdc", "--root", str(acdc_root), "--out", str(out)]
    res = subprocess.run(cmd + ["--labeled", "patient001,patient003", "--test", "1"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    dl = load_datalist(out)
    assert {c["patient_id"] for c in dl["labeled"]} == {"patient001", "patient003"}
    assert len(dl["test"]) == 2 and len(dl["validation"]) == 0
    assert "labeled        4 cases     2 patients" in res.stdout
    res = subprocess.run(
        cmd[:4] + ["--root", str(tmp_path / "nope"), "--out", str(out)], capture_output=True, text=True
    )
    assert res.returncode == 1 and f"error: {tmp_path / 'nope'}: ACDC root does not exist" in res.stderr


def test_cli_convert_synapse_and_split(tmp_path, capsys):
    root = _synapse_root(tmp_path / "synapse", n=3)
    out = tmp_path / "syn.json"
    labels = tmp_path / "l8"
    assert main(["convert-synapse", "--root", str(root), "--out", str(out), "--labels-dir", str(labels)]) == 0
    assert "unlabeled      2 cases" in capsys.readouterr().out
    assert len(list(labels.iterdir())) == 3
    split = tmp_path / "sub" / "split.json"
    argv = ["split", "--datalist", str(out), "--out", str(split), "--labeled", "case0003,", "--validation", "2"]
    assert main(argv) == 0
    dl = load_datalist(split)
    assert [c["case_id"] for c in dl["labeled"]] == ["case0003"]
    assert sorted(c["case_id"] for c in dl["validation"]) == ["case0001", "case0002"]
    assert dl["label_remap"] == json.loads(out.read_text())["label_remap"]
    assert dl["split"] == {"labeled": ["case0003"], "validation": 2, "test": 0, "seed": 0}
    assert main(["split", "--datalist", str(tmp_path / "missing.json"), "--out", str(split)]) == 1
    assert f"{tmp_path / 'missing.json'}: datalist file not found" in capsys.readouterr().err


def test_cli_split_keeps_unlabeled_only(acdc_root, tmp_path, capsys):
    first = tmp_path / "a.json"
    convert_acdc(acdc_root, first, labeled=1)
    assert main(["split", "--datalist", str(first), "--out", str(tmp_path / "b.json"), "--labeled", "5"]) == 0
    dl = load_datalist(tmp_path / "b.json")
    # five eligible patients all labelled; patient004 (with its unlabelled frame) stays unlabelled
    assert {c["patient_id"] for c in dl["unlabeled"]} == {"patient004"}
    assert len(dl["labeled"]) == 10
    assert main(["split", "--datalist", str(first), "--out", str(tmp_path / "c.json"), "--labeled", "6"]) == 1
    assert "asked for 6 patients but only 5" in capsys.readouterr().err
