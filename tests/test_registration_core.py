"""Registration results in world coordinates: known transforms, map_points vs warp, cycle scores, BRS, report.

Elastix runs in this process (imported once, ~10 s) on tiny synthetic volumes with an oblique direction.
"""

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from registration.cycle import compose, cycle_scores, foreground_mask
from registration.elastix import register_pair
from registration.geometry import flip_xy, image_affine_ras
from registration.inputs import load_cases
from registration.pairs import PairTask, plan_pairs, write_sidecar
from registration.params import RegistrationSettings
from registration.report import run_report
from registration.select import Selection, run_select
from registration.store import RegistrationStore
from tests.synthetic import known_pair, phantom, random_affine, random_deformation, write_dataset

SIZE, SPACING = (32, 32, 14), (1.5, 1.5, 3.0)
PHANTOM_CLASSES = {"0": "background", "1": "body", "2": "a", "3": "b"}
pytestmark = pytest.mark.filterwarnings("ignore:builtin type:DeprecationWarning")


def _ras_truth(tr: sitk.Transform, pts_ras: np.ndarray) -> np.ndarray:
    return flip_xy(np.array([tr.TransformPoint(p) for p in flip_xy(pts_ras).tolist()]))


def _foreground_ras(image: sitk.Image, n: int = 400, seed: int = 0) -> np.ndarray:
    idx = np.argwhere(sitk.GetArrayViewFromImage(image) > 50)[:, ::-1]  # (i, j, k)
    idx = idx[np.random.default_rng(seed).choice(len(idx), min(n, len(idx)), replace=False)]
    return (image_affine_ras(image) @ np.c_[idx, np.ones(len(idx))].T)[:3].T


def _register_all(datalist, out, settings) -> RegistrationStore:
    cases = load_cases(datalist)
    root = out / settings.kind
    cases.write(root / "cases.json")
    for task in plan_pairs(cases.training, cases.evaluation, root / "pairs", settings):
        register_pair(task, threads=2)
    return RegistrationStore(out, settings.kind)


@pytest.fixture(scope="module")
def affine_case(tmp_path_factory):
    """Moving m (labelled) and fixed f = m resampled through a known affine G (f's points -> m's points)."""
    root = tmp_path_factory.mktemp("affine")
    m, m_label = phantom(SIZE, SPACING, seed=1)
    g = random_affine(m, np.random.default_rng(4))
    f, _ = known_pair(m, g, m_label)
    datalist = write_dataset(root, {"m": ("labeled", m, m_label), "f": ("unlabeled", f, None)}, PHANTOM_CLASSES)
    store = _register_all(datalist, root / "out", RegistrationSettings(kind="affine"))
    return store, g, f


def test_known_affine_recovered_in_the_stored_direction(affine_case):
    store, g, f = affine_case
    pts = _foreground_ras(f)
    truth = _ras_truth(g, pts)
    err = np.linalg.norm(store.map_points("f", "m", pts) - truth, axis=1)
    assert err.mean() < 0.6, err.mean()  # voxels are 1.5 x 1.5 x 3 mm
    # the opposite direction is clearly not it: the stored pair (fixed=f, moving=m) maps f -> m
    wrong = np.linalg.norm(store.map_points("f", "m", pts) - _ras_truth(g.GetInverse(), pts), axis=1)
    assert wrong.mean() > 3.0
    # the reverse registration was computed independently and approximates G^-1
    back = store.map_points("m", "f", truth)
    assert np.linalg.norm(back - pts, axis=1).mean() < 0.6
    # pair_affine_ras is the exact 4x4 of the same mapping
    a = store.pair_affine_ras("f", "m")
    np.testing.assert_allclose(pts @ a[:3, :3].T + a[:3, 3], store.map_points("f", "m", pts), atol=1e-9)
    side = store.pair_status("f", "m")
    assert side["status"] == "ok" and side["threads"] == 2 and side["threader"] == "Pool"
    assert side["metrics"]["mi_after"] > side["metrics"]["mi_before"]
    assert store.pair_path("f", "m", ".TransformParameters.0.txt").exists()


def test_fallback_settings_register_too(affine_case, tmp_path):
    """The retry's parameter maps (more samples, fewer levels, centre-of-gravity start) are valid and work."""
    store, g, f = affine_case
    c = store.cases
    task = PairTask("f", "m", c["f"]["image"], c["m"]["image"], str(tmp_path), RegistrationSettings(), fallback=True)
    record = register_pair(task, threads=1)
    assert record["fallback"] is True and record["threads"] == 1
    t = sitk.ReadTransform(str(task.transform_path))
    pts = _foreground_ras(f, 100)
    assert np.linalg.norm(_ras_truth(t, pts) - _ras_truth(g, pts), axis=1).mean() < 0.6


def test_map_points_agrees_with_warp(affine_case):
    store, _, _ = affine_case
    label = sitk.GetArrayFromImage(store.label("m"))
    blob = int(np.argmax(np.bincount(label.ravel())[2:])) + 2  # the largest inner class
    idx = np.argwhere(label == blob)[:, ::-1].mean(0)
    centroid_m = (store.affine_ras("m") @ [*idx, 1])[:3]
    warped = store.warp("m", onto="f", what="label")  # [i, j, k] on f's grid
    assert warped.dtype == np.uint8 and set(np.unique(warped)) <= set(np.unique(label))
    f_affine = nib.load(store.cases["f"]["image"]).affine  # nibabel's own view of f's grid
    centroid_f = (f_affine @ [*np.argwhere(warped == blob).mean(0), 1])[:3]
    mapped = store.map_points("m", "f", centroid_m[None])[0]
    assert np.linalg.norm(mapped - centroid_f) < 0.8, (mapped, centroid_f)
    with pytest.raises(ValueError, match="nearest"):
        store.warp("m", onto="f", what="label", interpolation="linear")
    with pytest.raises(KeyError, match="no label"):
        store.label("f")


def test_cycle_score_near_zero_when_consistent_and_large_when_corrupted(affine_case):
    store, g, f = affine_case
    image = store.image("f")
    exact = cycle_scores(image, g, g.GetInverse())
    assert exact.transform_mm < 1e-6 and exact.rmse < 1e-4  # resampled once through an identity round trip
    registered = store.cycle("f", "m")
    assert registered.transform_mm < 1.0  # two independent registrations, each ~0.15 mm off at the centre
    shift = sitk.TranslationTransform(3, (4.0, 0.0, 0.0))
    corrupted = cycle_scores(image, store.transform("f", "m"), compose(store.transform("m", "f"), shift))
    assert corrupted.transform_mm == pytest.approx(4.0, abs=0.3)
    assert corrupted.rmse > 3 * registered.rmse and corrupted.mi < registered.mi
    assert corrupted.score > registered.score > exact.score - 1e-9
    assert foreground_mask(image).mean() == pytest.approx((sitk.GetArrayViewFromImage(image) > 30).mean(), abs=0.1)


def test_known_deformation_is_the_demo_generator_in_physical_space():
    # the fixture's displacement field is the demo's sampling map, mapped from grid voxels to LPS mm: at a grid
    # point p = O + D (step * i) the transform gives O + D (step * coords(i)), with coords drawn from the same rng
    from monai_ssl.demo.synthesis import random_smooth_deformation

    image, _ = phantom(SIZE, SPACING, seed=4)  # oblique direction, anisotropic spacing: step = 1.5 mm
    tr = random_deformation(image, np.random.default_rng(3), smoothing_mm=9.0, max_displacement_mm=3.0)
    shape = [32, 32, 27]  # extent (46.5, 46.5, 39) mm on a 1.5 mm grid
    coords, _ = random_smooth_deformation(
        shape, np.random.default_rng(3), 0.0, 0.0, 0.0, max_displacement=2.0, smoothing=6.0
    )
    origin, direction = np.array(image.GetOrigin()), np.array(image.GetDirection()).reshape(3, 3)
    lengths = []
    for i in [(0, 0, 0), (5, 17, 3), (31, 2, 26), (16, 16, 14)]:
        point = origin + direction @ (1.5 * np.array(i, float))
        want = origin + direction @ (1.5 * coords[(slice(None), *i)])
        np.testing.assert_allclose(tr.TransformPoint(point.tolist()), want, atol=1e-4)
        lengths.append(np.linalg.norm(want - point))
    assert 0.2 < max(lengths) <= 3.0 + 1e-4


def test_cycle_score_of_deformable_round_trip_resamples_once_exactly():
    image, _ = phantom(SIZE, SPACING, seed=4)
    rng = np.random.default_rng(8)
    forward = random_deformation(image, rng, smoothing_mm=10.0, max_displacement_mm=3.0)
    backward = random_deformation(image, rng, smoothing_mm=10.0, max_displacement_mm=3.0)
    got = cycle_scores(image, forward, backward)
    direct = sitk.Resample(image, image, compose(forward, backward), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    a, b = sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(direct)
    lo, hi = np.percentile(a, [1, 99])
    assert got.rmse == pytest.approx(np.sqrt(np.mean(((a - b) / (hi - lo)) ** 2)), rel=1e-5)
    pts = _foreground_ras(image, 200)
    moved = _ras_truth(backward, _ras_truth(forward, pts))
    assert got.transform_mm == pytest.approx(np.linalg.norm(moved - pts, axis=1).mean(), rel=0.15)
    assert got.transform_mm > 0.5


def test_bspline_recovers_a_smooth_deformation(tmp_path):
    m, m_label = phantom(SIZE, SPACING, seed=2)
    affine = random_affine(m, np.random.default_rng(5), 4, 0.03, 3)
    g = sitk.CompositeTransform(
        [affine, random_deformation(m, np.random.default_rng(6), smoothing_mm=12.0, max_displacement_mm=3.0)]
    )
    f, _ = known_pair(m, g, m_label)
    datalist = write_dataset(tmp_path, {"m": ("labeled", m, m_label), "f": ("unlabeled", f, None)})
    settings = RegistrationSettings(kind="bspline", grid_mm=12, bspline_iterations=60, bspline_levels=2)
    cases = load_cases(datalist)
    task = plan_pairs(cases.training, [], tmp_path / "out" / "bspline" / "pairs", settings)[1]
    assert (task.fixed, task.moving) == ("f", "m")
    cases.write(tmp_path / "out" / "bspline" / "cases.json")
    register_pair(task, threads=2)
    store = RegistrationStore(tmp_path / "out", "bspline")
    pts = _foreground_ras(f)
    truth = _ras_truth(g, pts)
    before = np.linalg.norm(pts - truth, axis=1).mean()
    err = np.linalg.norm(store.map_points("f", "m", pts) - truth, axis=1).mean()
    assert err < 0.35 * before and err < 1.0, (err, before)
    assert len(store.pair_status("f", "m")["parameter_files"]) == 2
    with pytest.raises(ValueError, match="not a linear"):
        store.pair_affine_ras("f", "m")


def _put(root, fixed, moving, transform, settings):
    task = PairTask(fixed, moving, "", "", str(root / "pairs"), settings)
    task.transform_path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteTransform(transform, str(task.transform_path))
    write_sidecar(task, {"status": "ok"})


def test_brs_picks_the_consistent_atlas_and_report_scores_it(tmp_path):
    """Atlases 'good' and 'bad' are both u moved by known affines; only bad's stored pair is inconsistent."""
    u, u_label = phantom(SIZE, SPACING, seed=3)
    rng = np.random.default_rng(7)
    g_good, g_bad, g_eval = (random_affine(u, rng) for _ in range(3))  # atlas points -> u points
    good, good_label = known_pair(u, g_good, u_label)
    bad, bad_label = known_pair(u, g_bad, u_label)
    ev, ev_label = known_pair(u, g_eval, u_label)
    datalist = write_dataset(
        tmp_path,
        {
            "good": ("labeled", good, good_label),
            "bad": ("labeled", bad, bad_label),
            "u": ("unlabeled", u, None),
            "e": ("validation", ev, ev_label),
        },
        {"0": "background", "1": "body", "2": "a", "3": "b"},
    )
    settings = RegistrationSettings()
    root = tmp_path / "out" / "affine"
    load_cases(datalist).write(root / "cases.json")
    nudge = sitk.Euler3DTransform((0, 0, 0), 0.0, 0.0, 0.12, (3.0, 0.0, 0.0))
    _put(root, "good", "u", g_good, settings)
    _put(root, "u", "good", g_good.GetInverse(), settings)
    _put(root, "bad", "u", g_bad, settings)
    _put(root, "u", "bad", compose(g_bad.GetInverse(), nudge), settings)  # inconsistent round trip
    for name, g in (("good", g_good), ("bad", g_bad)):  # e -> atlas = (atlas -> u)^-1 after (e -> u)
        _put(root, "e", name, compose(g_eval, g.GetInverse()), settings)
        _put(root, name, "e", compose(g, g_eval.GetInverse()), settings)
    store = RegistrationStore(tmp_path / "out", "affine")
    for score in ("published", "transform"):
        brs = run_select(store, Selection(score=score, strategy="brs"), progress=False)
        entry = brs["cases"]["u"]
        assert entry["choice"] == "good" and entry["choice_published"] == entry["choice_transform"] == "good"
        assert entry["scores"]["bad"]["transform_mm"] > 2.0 > 0.01 > entry["scores"]["good"]["transform_mm"]
        assert entry["strategy"] == "brs" and not store.registered_probabilities_path("u").exists()
    assert json.loads((root / "brs.json").read_text())["cases"]["u"]["choice"] == "good"
    # the validation case's registration prior: BRS's atlas alone, i.e. the one-hot of its warped label
    assert brs["priors"]["e"]["strategy"] == "brs" and "e" not in brs["cases"]  # never a training target
    assert store.selected("prior") == {"e": store.prior_path("e")}
    prior = nib.load(store.prior_path("e"))
    np.testing.assert_allclose(prior.affine, nib.load(store.cases["e"]["image"]).affine, atol=1e-5)
    brs_prior = prior.get_fdata()
    assert set(np.unique(np.round(brs_prior, 3))) == {0.0, 1.0}  # 255 * (1/255): one-hot up to float rounding
    warped = store.warp(brs["priors"]["e"]["choice"], onto="e", what="label")
    np.testing.assert_array_equal(brs_prior.argmax(-1), warped)
    written = nib.load(store.registered_label_path("u"))
    np.testing.assert_allclose(written.affine, nib.load(store.cases["u"]["image"]).affine, atol=1e-5)
    truth = sitk.GetArrayFromImage(u_label).transpose(2, 1, 0)
    assert (np.asarray(written.dataobj) == truth).mean() > 0.95
    # two atlases: the default strategy fuses them and writes class probabilities on u's grid
    fused = run_select(store, Selection(), progress=False)["cases"]["u"]
    assert fused["strategy"] == "fusion" and fused["atlases"] == ["good", "bad"] and fused["choice"] == "good"
    label = np.asarray(nib.load(store.registered_label_path("u")).dataobj)
    probs = nib.load(store.registered_probabilities_path("u"))
    assert probs.shape == (*label.shape, 4)
    np.testing.assert_allclose(probs.affine, written.affine, atol=1e-5)
    p = probs.get_fdata()
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=4 * 1 / 255)  # uint8 steps of 1/255
    np.testing.assert_array_equal(p.argmax(-1)[p.max(-1) > 0.51], label[p.max(-1) > 0.51])
    assert (label == truth).mean() > 0.95
    # registration-only baseline on the labelled validation case: brs, fusion and oracle rows
    result = run_report(store, Selection(), progress=False)
    # ... whose fused label is the argmax of the prior `select` wrote for it
    fused_prior = nib.load(store.prior_path("e")).get_fdata()
    baseline = np.asarray(nib.load(root / "reg_only" / "labels" / "e.nii.gz").dataobj)
    sure = fused_prior.max(-1) > 0.51
    np.testing.assert_array_equal(fused_prior.argmax(-1)[sure], baseline[sure])
    assert not np.array_equal(fused_prior, brs_prior)
    per_case = pd.read_csv(root / "reg_only" / "per_case.csv")
    by = {s: g.set_index("class_name") for s, g in per_case.groupby("strategy")}
    assert set(by) == {"brs", "fusion", "oracle"} and set(per_case["class_name"]) == {"body", "a", "b"}
    assert set(by["brs"]["atlas"]) == {"good"} and set(by["fusion"]["atlas"]) == {"good+bad"}
    assert per_case["default"].eq(per_case["strategy"] == "fusion").all()  # fusion: two atlases
    # two nearest-neighbour resamplings on 3 mm slices: small classes lose some overlap
    assert (per_case["dice"] > 0.65).all() and (per_case["status"] == "ok").all()
    assert by["brs"].loc["body", "dice"] > 0.9 and by["fusion"].loc["body", "dice"] > 0.9
    assert {"iou", "bf1", "hd95_mm"} <= set(per_case.columns) and per_case["iou"].notna().all()
    per_atlas = pd.read_csv(root / "reg_only" / "per_atlas.csv").groupby("atlas")["dice"].mean()
    oracle = per_atlas.idxmax()
    np.testing.assert_allclose(by["oracle"]["dice"].mean(), per_atlas.max())
    assert set(by["oracle"]["atlas"]) == {oracle}
    selection = json.loads((root / "reg_only" / "selection.json").read_text())
    assert selection["cases"]["e"]["oracle"] == oracle
    assert selection["cases"]["e"]["brs_is_oracle"] == (oracle == "good")
    summary = pd.read_csv(root / "reg_only" / "summary.csv")
    overall = summary[summary["class_name"] == "overall"].set_index("strategy")
    assert list(overall.index) == ["brs", "fusion", "oracle"]
    assert overall.loc["brs", "dice_mean"] == pytest.approx(by["brs"]["dice"].mean())
    assert not result["failed"]


def test_atlas_only_plans_exactly_the_pairs_select_and_report_read(tmp_path):
    img, lab = phantom((8, 8, 4), (2.0, 2.0, 4.0), seed=0)
    cases = {"a": ("labeled", img, lab), "b": ("labeled", img, lab), "v": ("validation", img, lab)}
    cases.update({f"u{i}": ("unlabeled", img, None) for i in range(3)})
    table = load_cases(write_dataset(tmp_path, cases, PHANTOM_CLASSES))
    settings = RegistrationSettings(kind="bspline")
    every = {t.stem for t in plan_pairs(table.training, table.evaluation, tmp_path / "p", settings)}
    atlas = {t.stem for t in plan_pairs(table.training, table.evaluation, tmp_path / "p", settings, atlas_only=True)}
    assert len(every) == 5 * 4 + 2 * 2 and atlas < every
    # both directions between each atlas and every other case, nothing between two unlabelled cases
    expected = {f"{x}__{y}" for x in ("a", "b") for y in ("a", "b", "u0", "u1", "u2", "v") if x != y}
    assert atlas == expected | {f"{y}__{x}" for x in ("a", "b") for y in ("u0", "u1", "u2", "v")}
