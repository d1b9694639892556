"""benchmarks/methods.py on tiny data: result rows, per-class metrics, re-split, reg-only rows, step timing."""

import json
import math
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents

from benchmarks import methods as bm
from monai_ssl.data.datalist import load_datalist, write_datalist
from tests.test_bundle import TINY
from tests.test_trainer import tiny_dataset

REPO = Path(__file__).resolve().parents[1]

CLASSES = ["blob", "ring"]


def tiny_with_test(root):
    """The trainer tests' tiny data set plus a labelled test case (the validation volume under another id)."""
    raw = json.loads(tiny_dataset(root).read_text())
    raw["test"] = [{**raw["validation"][0], "case_id": "tst", "group": "test"}]
    return write_datalist(raw, root / "datalist_test.json")


def dice(pred, gt, c):
    p, g = pred == c, gt == c
    return 2.0 * np.logical_and(p, g).sum() / (p.sum() + g.sum())


def test_two_methods_train_evaluate_and_unknown_or_unready_methods_are_reported(tmp_path):
    datalist = tiny_with_test(tmp_path / "data")
    settings = bm.BenchmarkSettings("test", iterations=2, patch_size=(16, 16), batch_size=4)
    overrides = {k: v for k, v in TINY.items() if k not in ("patch_size", "batch_size")}
    seen = []
    df = bm.benchmark(
        ["unet_ls", "cts", "no_such_method", "cts_rsl"],
        [1],
        settings,
        work_dir=tmp_path / "work",
        datalist=datalist,
        registration_dir=tmp_path / "no_registration",
        overrides=overrides,
        progress=False,
        on_row=lambda partial: seen.append(partial["method"].tolist()),
    )
    # the table so far is handed over after every row, so a stopped run keeps what it measured
    assert seen == [["unet_ls"], ["unet_ls", "cts"], ["unet_ls", "cts", "no_such_method"], df["method"].tolist()]
    per_class = [f"dice_{c}" for c in CLASSES] + [f"hd95_{c}" for c in CLASSES]
    overlap = [f"{m}_{c}" for m in ("iou", "bf1") for c in CLASSES]
    assert bm.MAIN_COLUMNS[3:7] == ["dice_mean", "hd95_mean_mm", "iou_mean", "bf1_mean"]
    assert list(df.columns) == bm.MAIN_COLUMNS + per_class + overlap + bm.INFO_COLUMNS
    assert df["method"].tolist() == ["unet_ls", "cts", "no_such_method", "cts_rsl"]
    ok = df[df["status"] == "ok"].set_index("method")
    assert ok.index.tolist() == ["unet_ls", "cts"]
    # HD95 is at most the volume diagonal (20x20x6 voxels of 1.5x1.5x3 mm), Dice in [0, 1]
    diagonal = math.dist((0, 0, 0), (19 * 1.5, 19 * 1.5, 5 * 3.0))
    label = np.asarray(nib.load(tmp_path / "data" / "val_seg.nii.gz").dataobj)
    for method, row in ok.iterrows():
        assert ((row[["dice_mean", *per_class[:2]]] >= 0) & (row[["dice_mean", *per_class[:2]]] <= 1)).all()
        assert ((row[per_class[2:]] >= 0) & (row[per_class[2:]] <= diagonal + 1e-6)).all()
        # one test case, both classes present in its label: the overall figures are the class means
        assert row["dice_mean"] == pytest.approx(np.mean([row["dice_blob"], row["dice_ring"]]))
        assert row["hd95_mean_mm"] == pytest.approx(np.mean([row["hd95_blob"], row["hd95_ring"]]))
        # IoU and boundary F1 in [0, 1]; IoU = Dice / (2 - Dice) per class (one case)
        assert ((row[["iou_mean", "bf1_mean", *overlap]] >= 0) & (row[["iou_mean", "bf1_mean", *overlap]] <= 1)).all()
        assert row["iou_mean"] == pytest.approx(np.mean([row["iou_blob"], row["iou_ring"]]))
        assert row["bf1_mean"] == pytest.approx(np.mean([row["bf1_blob"], row["bf1_ring"]]))
        for c in CLASSES:
            assert row[f"iou_{c}"] == pytest.approx(row[f"dice_{c}"] / (2 - row[f"dice_{c}"]), abs=1e-6)
        # Dice recomputed with numpy from the saved test prediction (the test group, not validation)
        pred = np.asarray(
            nib.load(tmp_path / "work" / "labeled_1" / method / "eval" / "predictions" / "tst_seg.nii.gz").dataobj
        )
        assert pred.shape == label.shape
        for i, c in enumerate(CLASSES, 1):
            assert row[f"dice_{c}"] == pytest.approx(dice(pred, label, i), abs=1e-5)
        assert 0 < row["sec_per_iter"] < row["train_s"] and row["data_sec_per_iter"] > 0
        assert row["cpu_sec_per_iter"] > 0
        assert row["iterations"] == 2 and row["patch_size"] == "16x16" and row["mode"] == "test"
    assert ok.loc["cts", "sec_per_iter_vs_cts"] == 1.0 and ok.loc["cts", "cpu_sec_per_iter_vs_cts"] == 1.0
    assert ok.loc["unet_ls", "sec_per_iter_vs_cts"] == pytest.approx(
        ok.loc["unet_ls", "sec_per_iter"] / ok.loc["cts", "sec_per_iter"]
    )

    missing = df.set_index("method").loc[["no_such_method", "cts_rsl"]]
    assert missing.loc["no_such_method", "status"].startswith("not available: no override file")
    assert "no_such_method.json" in missing.loc["no_such_method", "status"]
    assert (
        missing.loc["cts_rsl", "status"].startswith("not available")
        and "python -m registration precompute" in missing.loc["cts_rsl", "status"]
    )
    assert missing[["dice_mean", "hd95_mean_mm", "sec_per_iter"]].isna().all().all()

    # the CSV round-trips; the ablation table has one row per method, Dice and HD95 per labelled count
    path = bm.write_results(df, tmp_path / "results" / "methods.csv")
    back = pd.read_csv(path)
    assert list(back.columns) == list(df.columns)
    assert np.allclose(back["dice_mean"], df["dice_mean"], equal_nan=True, rtol=1e-5)
    table = bm.ablation_table(df)
    assert table.index.tolist() == df["method"].tolist()
    assert table.columns.tolist() == [(1, "Dice"), (1, "HD95 (mm)")]


def test_main_exits_nonzero_for_unknown_method_and_appends_rows(tmp_path, capsys):
    out = tmp_path / "m.csv"
    args = ["--out", str(out), "--work-dir", str(tmp_path), "--threads", "0", "--no-progress"]  # 0: leave torch be
    assert bm.main(["--methods", "cctr_missing", *args]) == 1
    row = pd.read_csv(out).iloc[0]
    assert row["method"] == "cctr_missing" and row["status"].startswith("not available")
    assert "NOT OK cctr_missing" in capsys.readouterr().err
    # --append keeps the rows of other (method, labeled, mode) keys and replaces those measured again
    assert bm.main(["--methods", "other_missing,cctr_missing", "--labeled", "1", "--quick", "--append", *args]) == 1
    assert bm.main(["--methods", "other_missing", "--quick", "--append", *args]) == 1
    table = pd.read_csv(out)
    assert sorted(zip(table["method"], table["mode"], strict=True)) == [
        ("cctr_missing", "full"),
        ("cctr_missing", "quick"),
        ("other_missing", "quick"),
    ]
    assert list(table.columns) == bm.MAIN_COLUMNS + bm.INFO_COLUMNS


def test_labeled_datalist_resplits_by_patient_keeping_eval_groups_and_nested_labels(tmp_path):
    datalist = tiny_with_test(tmp_path)
    assert bm.labeled_datalist(datalist, 1, tmp_path / "work") == datalist.resolve()  # already 1 labelled
    two = bm.labeled_datalist(datalist, 2, tmp_path / "work", seed=0)
    assert two == (tmp_path / "work" / "datalists" / "labeled_2.json").resolve()
    dl = load_datalist(two)
    labeled = [c["case_id"] for c in dl["labeled"]]
    assert len(labeled) == 2 and "lab" in labeled and set(labeled) <= {"lab", "u0", "u1"}
    assert [c["case_id"] for c in dl["validation"]] == ["val"] and [c["case_id"] for c in dl["test"]] == ["tst"]
    assert {c["case_id"] for c in dl["unlabeled"]} == {"u0", "u1"} - set(labeled)
    assert dl["labeled"][0]["image"] == load_datalist(datalist)["labeled"][0]["image"]  # same files, absolute
    # deterministic for a seed
    again = bm.labeled_datalist(datalist, 2, tmp_path / "again", seed=0)
    assert [c["case_id"] for c in load_datalist(again)["labeled"]] == labeled
    with pytest.raises(ValueError, match="only 2 labelled ones are left"):
        bm.labeled_datalist(datalist, 4, tmp_path / "work")


def test_every_split_trains_each_set_of_added_labelled_patients_once(tmp_path):
    """--every-split: each combination of added labelled patients once, in its own datalist and run folder,
    each row named by its set; a seeded draw is one of those sets, and the given set passes through."""
    datalist = tiny_with_test(tmp_path / "data")
    assert bm.labeled_splits(datalist, 1, every=True) == [["lab"]]
    assert bm.labeled_splits(datalist, 2, every=True) == [["lab", "u0"], ["lab", "u1"]]
    assert bm.labeled_splits(datalist, 3, every=True) == [["lab", "u0", "u1"]]
    drawn = bm.labeled_splits(datalist, 2, seed=0)
    assert len(drawn) == 1 and drawn[0] in bm.labeled_splits(datalist, 2, every=True)
    seeded = load_datalist(bm.labeled_datalist(datalist, 2, tmp_path / "w"))
    assert [c["case_id"] for c in seeded["labeled"]] == drawn[0]
    with pytest.raises(ValueError, match="only 2 labelled ones are left"):
        bm.labeled_splits(datalist, 4, every=True)
    named = bm.labeled_datalist(datalist, 2, tmp_path / "w", chosen=["lab", "u1"])
    assert named.name == "labeled_2_u1.json"
    assert sorted(c["case_id"] for c in load_datalist(named)["labeled"]) == ["lab", "u1"]
    assert bm.labeled_datalist(datalist, 1, tmp_path / "w", chosen=["lab"]) == datalist.resolve()

    settings = bm.BenchmarkSettings("test", iterations=2, patch_size=(16, 16), batch_size=4)
    overrides = {k: v for k, v in TINY.items() if k not in ("patch_size", "batch_size")}
    where = {"work_dir": tmp_path / "work", "datalist": datalist, "registration_dir": tmp_path / "none"}
    df = bm.benchmark(["unet_ls", "no_such_method"], [2, 4], settings, **where, overrides=overrides, progress=False,
                      every_split=True)  # fmt: skip
    assert list(zip(df["method"], df["labeled_ids"], strict=True)) == [
        ("unet_ls", "lab,u0"), ("no_such_method", "lab,u0"), ("unet_ls", "lab,u1"), ("no_such_method", "lab,u1"),
        ("unet_ls", ""), ("no_such_method", ""),
    ]  # fmt: skip
    assert df["status"].tolist()[:4:2] == ["ok", "ok"] and "only 2 labelled ones are left" in df["status"].iloc[4]
    for added in ("u0", "u1"):
        run = tmp_path / "work" / f"labeled_2_{added}" / "unet_ls"
        assert (run / "eval" / "metrics_summary.csv").exists()
    table = bm.ablation_table(df)  # one row per method: the mean over the labelled sets of a count
    assert table.index.tolist() == ["unet_ls", "no_such_method"]
    assert table.loc["unet_ls", (2, "Dice")] == pytest.approx(df["dice_mean"].iloc[[0, 2]].mean())
    assert table.loc["no_such_method"].isna().all()
    # --append replaces a set's row measured again and keeps the other sets'
    path = bm.write_results(df.iloc[:4], tmp_path / "m.csv")
    again = df.iloc[[2]].assign(dice_mean=0.5)
    table = pd.read_csv(bm.write_results(again, path, append=True))
    assert len(table) == 4
    assert table.set_index(["method", "labeled_ids"]).loc[("unet_ls", "lab,u1"), "dice_mean"] == 0.5
    kept = table.set_index(["method", "labeled_ids"]).loc[("unet_ls", "lab,u0"), "dice_mean"]
    assert kept == pytest.approx(df["dice_mean"].iloc[0], rel=1e-5)


def test_reg_only_metrics_summarise_default_test_rows_of_the_registration_report(tmp_path):
    rows = [
        ("v", "validation", "brs", True, 1, "blob", 0.1, 9.0, 0.05, 0.2, "ok"),
        ("t1", "test", "brs", True, 1, "blob", 0.8, 2.0, 0.7, 0.9, "ok"),
        ("t1", "test", "brs", True, 2, "ring", 0.6, 4.0, 0.5, 0.7, "ok"),
        ("t1", "test", "oracle", False, 2, "ring", 0.9, 1.0, 0.8, 1.0, "ok"),
        ("t2", "test", "fusion", True, 1, "blob", 0.4, 6.0, 0.3, 0.5, "ok"),
        ("t2", "test", "fusion", True, 2, "ring", np.nan, np.nan, np.nan, np.nan, "both_empty"),
    ]
    columns = ["case_id", "group", "strategy", "default", "class_index", "class_name", "dice", "hd95_mm", "iou", "bf1"]
    per_case = pd.DataFrame(rows, columns=[*columns, "status"])
    (tmp_path / "affine" / "reg_only").mkdir(parents=True)
    per_case.assign(atlas="a").to_csv(tmp_path / "affine" / "reg_only" / "per_case.csv", index=False)
    got = bm.reg_only_metrics(tmp_path, "affine")
    # validation rows, other strategies' rows and both-empty rows are left out; overall pools the 3 used test rows
    assert got == pytest.approx(
        {
            "dice_mean": (0.8 + 0.6 + 0.4) / 3,
            "hd95_mean_mm": (2.0 + 4.0 + 6.0) / 3,
            "iou_mean": (0.7 + 0.5 + 0.3) / 3,
            "bf1_mean": (0.9 + 0.7 + 0.5) / 3,
            "dice_blob": 0.6,
            "hd95_blob": 4.0,
            "iou_blob": 0.5,
            "bf1_blob": 0.7,
            "dice_ring": 0.6,
            "hd95_ring": 4.0,
            "iou_ring": 0.5,
            "bf1_ring": 0.7,
        }
    )
    oracle = bm.reg_only_metrics(tmp_path, "affine", strategy="oracle")
    assert oracle["dice_mean"] == pytest.approx(0.9)


def test_method_discovery_and_registration_needs():
    names = bm.available_methods()
    expected = {"unet_ls", "cps", "cts", "cts_rsl", "cctr", "mcscv2", "mt", "uamt", "fixmatch", "hstf", "hybrid"}
    assert expected <= set(names)
    assert bm.needs_registration("cts_rsl") and bm.needs_registration(bm.REG_ONLY)
    assert not any(bm.needs_registration(m) for m in ("unet_ls", "cps", "cts", "mt", "hybrid"))


def test_step_timer_counts_only_the_model_step_and_batch_fetch():
    """Fake clocks: each fetch costs 2, step i costs 3*i wall and i CPU seconds, and 100 more after
    MODEL_COMPLETED (post-step work), 50 in ITERATION_COMPLETED handlers; none of the latter is counted."""
    wall, cpu = {"now": 0.0}, {"now": 0.0}

    def advance(w, c=0.0):
        wall["now"] += w
        cpu["now"] += c

    def data():
        while True:
            advance(2)
            yield {}

    def step(engine, _batch):
        advance(3 * engine.state.iteration, engine.state.iteration)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        advance(100, 100)

    engine = Engine(step)
    engine.register_events(*IterationEvents)
    timer = bm.StepTimer(warmup=1, clock=lambda: wall["now"], cpu_clock=lambda: cpu["now"]).attach(engine)
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda _: advance(50, 50))
    engine.run(data(), max_epochs=1, epoch_length=4)
    assert timer.steps == [3, 6, 9, 12] and timer.cpu_steps == [1, 2, 3, 4] and timer.fetches == [2, 2, 2, 2]
    # medians after one warm-up iteration
    assert timer.sec_per_iter == 9 and timer.cpu_sec_per_iter == 3 and timer.data_sec_per_iter == 2


def test_training_labels_make_noisy_or_scribbled_labelled_cases(tmp_path):
    datalist = tiny_with_test(tmp_path / "data")
    assert bm.training_labels(datalist, "clean", tmp_path / "w") == datalist
    noisy = load_datalist(bm.training_labels(datalist, "noisy", tmp_path / "w"))
    scribbled = load_datalist(bm.training_labels(datalist, "scribbles", tmp_path / "w"))
    clean = load_datalist(datalist)
    for dl in (noisy, scribbled):
        assert dl["labeled"][0]["label"] != clean["labeled"][0]["label"]  # a new label file for training
        assert dl["test"] == clean["test"]  # evaluation stays on the clean dense labels
    assert scribbled["ignore_index"] == 255
    with pytest.raises(ValueError, match="labels must be one of"):
        bm.training_labels(datalist, "fuzzy", tmp_path / "w")


def test_script_does_not_shadow_the_registration_package():
    # as a script, benchmarks/ is sys.path[0] and its registration.py would hide the registration package that
    # CCT-R imports in-process; the script removes its own folder from the path
    code = (
        "import sys, runpy; sys.path.insert(0, 'benchmarks'); runpy.run_path('benchmarks/methods.py', run_name='x'); "
        "import registration.cycle; print(registration.__file__)"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().endswith(str(Path("registration") / "__init__.py"))


def test_a_registration_prior_makes_any_method_need_the_registration_output(tmp_path):
    datalist = tiny_with_test(tmp_path / "data")
    settings = bm.BenchmarkSettings("test", iterations=2, patch_size=(16, 16), batch_size=4, seed=3)
    df = bm.benchmark(
        ["unet_ls"],
        [1],
        settings,
        work_dir=tmp_path / "work",
        datalist=datalist,
        registration_dir=tmp_path / "no_registration",
        overrides={"registration_prior": True},
        progress=False,
    )
    row = df.iloc[0]
    assert row["status"].startswith("not available") and "python -m registration precompute" in row["status"]
    assert row["variant"] == "registration_prior=true" and row["seed"] == 3 and row["registration_kind"] == "affine"
