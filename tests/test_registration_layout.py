"""The registration output layout: one reader of the selection, the lock probe, the paths the job writes."""

import json

import pytest

from monai_ssl.data.validation import InputError
from registration.jobs import exclusive
from registration.layout import Layout


def test_selection_reader_resolves_paths_and_names_missing_files(tmp_path):
    layout = Layout(tmp_path, "bspline")
    assert layout.root == tmp_path / "bspline" and layout.selection_path == tmp_path / "bspline" / "brs.json"
    with pytest.raises(InputError, match="registration select"):
        layout.read_selection()
    (layout.root / "registered_labels").mkdir(parents=True)
    layout.registered_label_path("u1").write_bytes(b"x")
    cases = {
        "u1": {"choice": "l", "registered_label": "registered_labels/u1.nii.gz"},
        "u2": {"choice": None},  # no usable atlas: no file, not listed
    }
    layout.selection_path.write_text(json.dumps({"cases": cases}))
    assert layout.selected() == {"u1": layout.registered_label_path("u1")}
    assert layout.selected("registered_probabilities") == {}
    cases["u2"] = {"choice": "l", "registered_label": "registered_labels/u2.nii.gz"}
    layout.selection_path.write_text(json.dumps({"cases": cases}))
    with pytest.raises(InputError, match=r"u2\.nii\.gz: registered label listed in .*brs\.json is missing"):
        layout.selected()
    with pytest.raises(ValueError, match="what must be one of"):
        layout.selected("image")


def test_busy_is_true_exactly_while_a_job_holds_the_folder(tmp_path):
    layout = Layout(tmp_path, "affine")
    assert not layout.busy()
    with exclusive(layout):
        assert layout.busy()
        with pytest.raises(RuntimeError, match="another registration job"), exclusive(layout):
            pass
    assert not layout.busy()
