"""Scoring label files on disk (monai_ssl.metrics.files and its CLI), against hand-computed values."""

import subprocess
import sys

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from monai_ssl.data.validation import InputError
from monai_ssl.metrics.files import score_files, score_table


def _save(path, data, spacing=(2.0, 1.0, 3.0)):
    nib.save(nib.Nifti1Image(data.astype(np.int16), np.diag([*spacing, 1.0])), str(path))
    return str(path)


def test_score_table_copies_columns_and_uses_the_file_spacing(tmp_path):
    ref = np.zeros((6, 6, 4), np.int16)
    ref[1:5, 1:5, 1:3] = 1  # 32 voxels
    pred = np.zeros_like(ref)
    pred[1:5, 1:3, 1:3] = 1  # 16 voxels, all inside
    table = pd.DataFrame(
        [
            {
                "case_id": "a",
                "strategy": "brs",
                "prediction": _save(tmp_path / "p.nii.gz", pred),
                "reference": _save(tmp_path / "r.nii.gz", ref),
            }
        ]
    )
    out = tmp_path / "scores.csv"
    rows = score_table(table, 2, {"1": "blob"}, out, progress=False)
    assert list(rows["case_id"]) == ["a"] and list(rows["strategy"]) == ["brs"]
    assert rows.loc[0, "dice"] == pytest.approx(2 * 16 / (16 + 32))
    assert rows.loc[0, "iou"] == pytest.approx(16 / 32)
    assert rows.loc[0, "class_name"] == "blob"
    assert pd.read_csv(out)["dice"].iloc[0] == pytest.approx(2 / 3)
    # HD95 in mm along the 1 mm axis: 2 voxels of the reference's surface are 2 mm from the prediction's
    assert rows.loc[0, "hd95_mm"] == pytest.approx(2.0)


def test_geometry_mismatch_and_truncated_files_name_the_file(tmp_path):
    ref = _save(tmp_path / "r.nii.gz", np.ones((4, 4, 4)))
    shifted = _save(tmp_path / "p.nii.gz", np.ones((4, 4, 4)), spacing=(2.0, 1.0, 2.5))
    with pytest.raises(InputError, match=r"p\.nii\.gz: voxel-to-world affine differs"):
        score_files(shifted, ref, 2)
    raw = (tmp_path / "r.nii.gz").read_bytes()
    (tmp_path / "t.nii.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError, match=r"t\.nii\.gz: cannot read label"):
        score_files(ref, str(tmp_path / "t.nii.gz"), 2)
    table = tmp_path / "table.csv"
    pd.DataFrame([{"prediction": ref, "reference": str(tmp_path / "gone.nii.gz")}]).to_csv(table, index=False)
    proc = subprocess.run(
        [sys.executable, "-m", "monai_ssl.metrics", "score", str(table), str(tmp_path / "o.csv"), "--num-classes", "2"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].endswith("gone.nii.gz: label file not found")
    assert not (tmp_path / "o.csv").exists()
