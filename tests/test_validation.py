"""Bad input gets a clear error naming the file and the problem; validate-datalist reports all of them."""

import gzip
import subprocess
import sys

import numpy as np
import pytest

from monai_ssl.data.datalist import write_datalist
from monai_ssl.data.slices import VolumeDataset
from monai_ssl.data.transforms import volume_transforms
from monai_ssl.data.validation import InputError, check_case, validate_datalist
from tests.conftest import write_nifti

AFFINE = np.diag([1.5, 1.5, 4.0, 1.0])


def good_case(tmp_path, name="a", shape=(8, 9, 5)):
    rng = np.random.default_rng(0)
    img = write_nifti(tmp_path / f"{name}.nii.gz", rng.random(shape), AFFINE, np.float32)
    lab = write_nifti(tmp_path / f"{name}_gt.nii.gz", rng.integers(0, 3, shape), AFFINE, np.uint8)
    return {"case_id": name, "image": img, "label": lab}


def test_good_case_has_no_problems(tmp_path):
    assert check_case(good_case(tmp_path), n_classes=3) == []


def test_each_bad_input_is_named(tmp_path):
    case = good_case(tmp_path)
    cases = {}
    cases["missing"] = dict(case, image=str(tmp_path / "nope.nii.gz"))
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(gzip.compress(b"this is not a nifti file" * 10))
    cases["corrupt"] = dict(case, image=str(corrupt))
    cases["2d"] = dict(case, image=write_nifti(tmp_path / "flat.nii.gz", np.zeros((8, 9)), AFFINE, np.float32))
    nan = np.zeros((8, 9, 5), np.float32)
    nan[1, 1, 1], nan[2, 2, 2] = np.nan, np.inf
    cases["nan"] = dict(case, image=write_nifti(tmp_path / "nan.nii.gz", nan, AFFINE))
    cases["range"] = dict(case, label=write_nifti(tmp_path / "r.nii.gz", np.full((8, 9, 5), 7), AFFINE, np.uint8))
    cases["shape"] = dict(case, label=write_nifti(tmp_path / "s.nii.gz", np.zeros((8, 9, 6)), AFFINE, np.uint8))
    shifted = AFFINE.copy()
    shifted[0, 3] = 2.0
    cases["geometry"] = dict(case, label=write_nifti(tmp_path / "g.nii.gz", np.zeros((8, 9, 5)), shifted, np.uint8))
    frac = np.full((8, 9, 5), 0.5, np.float32)
    cases["fraction"] = dict(case, label=write_nifti(tmp_path / "f.nii.gz", frac, AFFINE))
    expected = {
        "missing": ("nope.nii.gz", "not found"),
        "corrupt": ("corrupt.nii.gz", "corrupt"),
        "2d": ("flat.nii.gz", "expected a 3D volume"),
        "nan": ("nan.nii.gz", "1 NaN and 1 infinite"),
        "range": ("r.nii.gz", "label values 7 outside the declared classes 0..2"),
        "shape": ("s.nii.gz", "shape (8, 9, 6) differs"),
        "geometry": ("g.nii.gz", "affine differs"),
        "fraction": ("f.nii.gz", "non-integer"),
    }
    for kind, (fname, problem) in expected.items():
        problems = check_case(cases[kind], n_classes=3)
        assert len(problems) == 1, (kind, problems)
        assert fname in problems[0] and problem in problems[0], (kind, problems)


def test_validate_datalist_reports_every_problem_and_cli(tmp_path):
    a, b, c = good_case(tmp_path, "a"), good_case(tmp_path, "b"), good_case(tmp_path, "c")
    b["image"] = str(tmp_path / "missing_b.nii.gz")
    c["label"] = write_nifti(tmp_path / "c_bad.nii.gz", np.full((8, 9, 5), 9), AFFINE, np.uint8)
    dl = {"labels": {"0": "bg", "1": "x", "2": "y"}, "labeled": [a], "unlabeled": [b], "test": [c]}
    path = write_datalist(dl, tmp_path / "datalist.json")
    problems = validate_datalist(path, progress=False)
    assert len(problems) == 2
    assert any("missing_b.nii.gz" in p for p in problems) and any("c_bad.nii.gz" in p for p in problems)
    res = subprocess.run(
        [sys.executable, "-m", "monai_ssl.data", "validate-datalist", str(path)], capture_output=True, text=True
    )
    assert res.returncode == 1
    assert "2 problem(s)" in res.stdout and "missing_b.nii.gz" in res.stdout and "c_bad.nii.gz" in res.stdout


def test_pipeline_raises_input_error_naming_file(tmp_path):
    case = good_case(tmp_path)
    tfm = volume_transforms(num_classes=3, pixdim=(-1, -1, -1))
    assert VolumeDataset([case], tfm)[0]["image"].shape == (1, 8, 9, 5)
    nan = np.zeros((8, 9, 5), np.float32)
    nan[0, 0, 0] = np.nan
    bad = dict(case, image=write_nifti(tmp_path / "nanimg.nii.gz", nan, AFFINE))
    with pytest.raises(InputError, match=r"nanimg\.nii\.gz: 1 NaN"):
        VolumeDataset([bad], tfm)
    with pytest.raises(InputError, match="outside the declared classes 0..1"):
        VolumeDataset([case], volume_transforms(num_classes=2, pixdim=(-1, -1, -1)))
    truncated = tmp_path / "trunc.nii.gz"
    truncated.write_bytes((tmp_path / "a.nii.gz").read_bytes()[:200])
    with pytest.raises(InputError, match=r"trunc\.nii\.gz"):
        VolumeDataset([dict(case, image=str(truncated))], tfm)


def test_unlabeled_label_is_never_read(tmp_path):
    """A corrupt label file named by an unlabelled case does not matter, because training never opens it."""
    from monai_ssl.data.datalist import group_cases, load_datalist

    case = good_case(tmp_path)
    junk = tmp_path / "junk_label.nii.gz"
    junk.write_bytes(b"garbage")
    dl = {
        "labels": {"0": "bg", "1": "x", "2": "y"},
        "labeled": [case],
        "unlabeled": [dict(case, case_id="u", label=str(junk))],
    }
    loaded = load_datalist(write_datalist(dl, tmp_path / "dl.json"))
    tfm = volume_transforms(num_classes=3, pixdim=(-1, -1, -1))
    volumes = VolumeDataset(group_cases(loaded, "unlabeled"), tfm)
    assert "label" not in volumes[0]
    # the same file, in a group that is allowed to read labels, fails loudly
    with pytest.raises(InputError, match="junk_label"):
        VolumeDataset([dict(loaded["unlabeled"][0])], tfm)


def test_an_empty_datalist_is_an_error_and_4d_is_named(tmp_path):
    import nibabel as nib

    path = tmp_path / "dl.json"
    path.write_text('{"name": "empty", "labels": {"0": "bg", "1": "a"}, "labeled": [], "unlabeled": []}')
    (problem,) = validate_datalist(path, progress=False)
    assert "dl.json: no cases" in problem
    img = tmp_path / "series.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 3), np.float32), np.eye(4)), str(img))
    (problem,) = check_case({"image": str(img)})
    assert "series.nii.gz: expected a 3D volume" in problem and "4D series" in problem


def test_volume_shape_and_array_drop_only_trailing_singletons():
    import nibabel as nib

    from monai_ssl.data.validation import volume_array, volume_shape

    assert volume_shape((4, 5, 6, 1, 1)) == (4, 5, 6)
    assert volume_shape((4, 5, 6, 2)) == (4, 5, 6, 2)  # a real 4th dimension stays, so checks can refuse it
    assert volume_shape((4, 1, 6)) == (4, 1, 6)  # never below three dimensions
    data = np.arange(120, dtype=np.int16).reshape(4, 5, 6, 1)
    out = volume_array(nib.Nifti1Image(data, np.eye(4)))
    assert out.shape == (4, 5, 6) and (out == data[..., 0]).all()
