"""The batch job: input checks, failure isolation (crash, hang, bad volume), Dask.

The pool's fork server imports elastix once per test process (~10 s). Injected faults (tests/registration_faults.py,
in a job subprocess) make a named pair crash its worker with SIGSEGV or hang, so the isolation paths run for real.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from registration.cli import main
from registration.inputs import InputError, check_files, load_cases
from registration.jobs import precompute
from registration.params import RegistrationSettings
from registration.store import RegistrationStore
from tests.registration_faults import faults_env
from tests.synthetic import known_pair, phantom, random_affine, write_dataset

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore:builtin type:DeprecationWarning")


def dataset(root: Path, n: int, bad: str | None = None) -> Path:
    """c0 labelled, c1..c{n-1} unlabelled (each c0 moved by a random affine); ``bad`` is a constant volume."""
    img, lab = phantom((24, 24, 12), (2.0, 2.0, 4.0), seed=0)
    rng = np.random.default_rng(0)
    cases = {"c0": ("labeled", img, lab)}
    for i in range(1, n):
        cases[f"c{i}"] = ("unlabeled", known_pair(img, random_affine(img, rng))[0], None)
    if bad:
        cases[bad] = ("unlabeled", sitk.Image(img) * 0, None)
    return write_dataset(root, cases, {"0": "background", "1": "body", "2": "a", "3": "b"})


def cli(*args, env=None, **kw):
    """Start ``python -m registration ARGS`` in a subprocess from the repository root."""
    return subprocess.Popen(
        [sys.executable, "-m", "registration", *args],
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kw,
    )


def test_cli_rejects_missing_files_and_lists_every_problem(tmp_path):
    datalist = dataset(tmp_path, 3)
    (tmp_path / "images" / "c1.nii.gz").unlink()
    (tmp_path / "labels" / "c0.nii.gz").write_bytes(b"not a nifti")
    dl = json.loads(datalist.read_text())
    dl["unlabeled"].append({"case_id": "c9", "image": "images/nowhere.nii.gz", "group": "unlabeled"})
    datalist.write_text(json.dumps(dl))
    proc = cli("precompute", "--datalist", str(datalist), "--out", str(tmp_path / "out"), "--kind", "affine")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    assert "3 problem(s)" in err
    assert "case c1:" in err and "c1.nii.gz: image file not found" in err
    assert "case c0:" in err and "cannot read label" in err
    assert "nowhere.nii.gz" in err
    assert not (tmp_path / "out").exists()  # rejected before any work or output


def test_inputs_are_read_in_full_with_the_training_validator(tmp_path):
    """Truncated data, NaN voxels, labels outside the classes, float labels and 4D images are all refused
    before any work, each problem naming its file; a header-only check would pass the truncated file."""
    datalist = dataset(tmp_path, 5)
    images, labels = tmp_path / "images", tmp_path / "labels"
    raw = (images / "c1.nii.gz").read_bytes()
    (images / "c1.nii.gz").write_bytes(raw[: len(raw) // 2])  # truncated: ITK would read zeros
    nan = sitk.ReadImage(str(images / "c2.nii.gz"), sitk.sitkFloat32)
    nan[1, 1, 1] = float("nan")
    sitk.WriteImage(nan, str(images / "c2.nii.gz"))
    lab = sitk.ReadImage(str(labels / "c0.nii.gz"))
    lab[2, 2, 2] = 7  # classes are 0..3
    sitk.WriteImage(lab, str(labels / "c0.nii.gz"))
    four_d = sitk.JoinSeries([sitk.ReadImage(str(images / "c3.nii.gz"))] * 2)
    sitk.WriteImage(four_d, str(images / "c3.nii.gz"))
    with pytest.raises(InputError) as e:
        load_cases(datalist)
    text = str(e.value)
    assert e.value.problems[0].startswith(f"{datalist}: 4 problem(s)")
    assert "c1.nii.gz: cannot read image" in text
    assert "c2.nii.gz: 1 NaN and 0 infinite intensities" in text
    assert "c0.nii.gz: label values 7 outside the declared classes 0..3" in text
    assert "c3.nii.gz: expected a 3D volume" in text and "4D series" in text
    # the header-only check passes the truncated file: the full read is what catches it
    case = {"case_id": "c1", "group": "unlabeled", "image": str(images / "c1.nii.gz")}
    assert check_files([case], 4, load_data=False) == []
    assert "cannot read image" in check_files([case], 4)[0]

    float_label = sitk.Cast(sitk.ReadImage(str(labels / "c0.nii.gz")), sitk.sitkFloat32) * 0.5
    tmp_label = tmp_path / "float_label.nii.gz"
    sitk.WriteImage(float_label, str(tmp_label))
    case = {"case_id": "c4", "group": "labeled", "image": str(images / "c4.nii.gz"), "label": str(tmp_label)}
    (problem,) = check_files([case], 4)
    assert "float_label.nii.gz: label map has non-integer values" in problem


def test_help_documents_every_command(capsys):
    for command, options in [
        (
            "precompute",
            [
                "--datalist",
                "--kind",
                "--workers",
                "--threads-per-worker",
                "--timeout",
                "--fields",
                "--scheduler",
                "--dask-local",
                "--grid-mm",
                "--no-eval",
            ],
        ),
        ("select", ["--score", "--w-rmse", "--w-mi", "--label-interp"]),
        ("report", ["--score", "--out", "--kind"]),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        assert all(option in text for option in options), (command, text)


def test_pool_isolates_crash_hang_and_bad_volume(tmp_path):
    datalist = dataset(tmp_path, 3, bad="c3")
    out = tmp_path / "out"
    args = ["--datalist", str(datalist), "--out", str(out), "--kind", "affine", "--no-progress"]
    # a real job process whose workers crash on c1__c2 and hang on c2__c1 (tests/registration_faults_site)
    proc = cli("precompute", *args, "--workers", "2", "--timeout", "15", "--fields",
               env=faults_env("c1__c2=crash,c2__c1=sleep:120"))  # fmt: skip
    printed, _ = proc.communicate(timeout=600)
    assert proc.returncode == 1
    manifest = pd.read_csv(out / "affine" / "manifest.csv").set_index(["fixed", "moving"])
    assert len(manifest) == 12
    ok = {("c0", "c1"), ("c1", "c0"), ("c0", "c2"), ("c2", "c0")}
    assert set(manifest.index[manifest["status"] == "ok"]) == ok
    assert (manifest.loc[list(ok), "attempts"] == 1).all()
    pairs = out / "affine" / "pairs"
    for stem, reason in [
        ("c1__c2", "SIGSEGV"),
        ("c2__c1", "timeout after 15 s"),
        ("c3__c0", "constant"),
        ("c1__c3", "constant"),
    ]:
        side = json.loads((pairs / f"{stem}.json").read_text())
        assert side["status"] == "failed" and side["attempts"] == 2 and side["fallback"] is True
        assert reason in side["error"] and reason in side["previous_errors"][0]
        assert not (pairs / f"{stem}.h5").exists()
    # low-resolution fields exist for the finished pairs only, and map points like the exact transform
    fields = sorted(p.name for p in (out / "affine" / "fields").glob("*.nii.gz"))
    assert fields == sorted(f"{f}__{m}.nii.gz" for f, m in ok)
    store = RegistrationStore(out, "affine")
    pts = (store.affine_ras("c1") @ np.c_[np.random.default_rng(0).uniform(2, 10, (20, 3)), np.ones(20)].T)[:3].T
    np.testing.assert_allclose(store.field("c1", "c0").map_points(pts), store.map_points("c1", "c0", pts), atol=1e-3)
    assert "4 computed, 8 failed" in printed and "FAILED c1__c2: worker crashed (SIGSEGV)" in printed
    # selection goes on for the good cases and reports the one without usable pairs
    rc = main(["select", *args])
    assert rc == 1
    brs = json.loads((out / "affine" / "brs.json").read_text())
    assert brs["cases"]["c1"]["choice"] == brs["cases"]["c2"]["choice"] == "c0"
    assert set(brs["failed"]) == {"c3"}
    assert (out / "affine" / "registered_labels" / "c1.nii.gz").exists()
    assert not (out / "affine" / "registered_labels" / "c3.nii.gz").exists()


def test_dask_runs_pairs_and_records_failures(tmp_path):
    distributed = pytest.importorskip("distributed")
    datalist = dataset(tmp_path, 2, bad="c2")
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None) as client:
        summary = precompute(
            load_cases(datalist), tmp_path / "out", RegistrationSettings(), scheduler=client, progress=False
        )
    assert summary.ok == 2 and sorted(summary.failed) == ["c0__c2", "c1__c2", "c2__c0", "c2__c1"]
    side = json.loads((tmp_path / "out" / "affine" / "pairs" / "c0__c1.json").read_text())
    assert side["status"] == "ok" and side["threads"] == 1
    assert "constant" in summary.failed["c2__c1"]
