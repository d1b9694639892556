"""The MONAI bundle: metadata, properties, train -> evaluate -> infer -> export on tiny data, bad inputs."""

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from monai.bundle import ConfigWorkflow, ckpt_export, run, verify_metadata

from monai_ssl.data.validation import InputError
from tests.conftest import write_nifti
from tests.test_trainer import tiny_dataset

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles" / "cctr_brain_demo" / "configs"
METHODS = sorted(p.stem for p in (CONFIGS / "methods").glob("*.json"))
# tiny students and volumes so that a bundle run takes seconds on 2 CPU cores
TINY = {
    "num_classes": 3,
    "patch_size": [16, 16],
    "pixdim": [-1, -1, -1],
    "batch_size": 4,
    "student_0#channels": [4, 8, 16],
    "student_0#num_res_units": 1,
    "student_1#embed_dim": 12,
    "student_1#num_heads": [1, 2, 2, 4],
    "student_1#window_size": 4,
    "mcsc_scales": [[2, 4], [4, 4]],  # the tiny U-Net's coarsest map has stride 4
}


def tiny_overrides(method: str) -> dict:
    """TINY, with a tiny U-Net as the second student where the method uses two U-Nets (CPS)."""
    import json

    second = json.loads((CONFIGS / "methods" / f"{method}.json").read_text()).get("student_1#name", "swin_unet")
    if second != "unet":
        return dict(TINY)
    out = {k: v for k, v in TINY.items() if not k.startswith("student_1#")}
    return dict(out, **{"student_1#channels": [4, 8, 16], "student_1#num_res_units": 1})


def configs(*names):
    return [str(CONFIGS / n) for n in names]


def export_traced(ts: Path, ckpt: Path, method: str, input_shape: list[int], overrides: dict) -> Path:
    """MONAI's ``ckpt_export`` of the inference network, traced at ``input_shape``."""
    ckpt_export(
        "network_def",
        filepath=str(ts),
        ckpt_file=str(ckpt),
        meta_file=str(CONFIGS / "metadata.json"),
        config_file=configs("inference.json", f"methods/{method}.json"),
        use_trace=True,
        input_shape=input_shape,
        **{k: v for k, v in overrides.items() if k not in ("dataset_dir", "output_root", "pixdim")},
    )
    return ts


def test_metadata_verifies_offline_against_repo_schema():
    verify_metadata(
        meta_file=str(CONFIGS / "metadata.json"), filepath=str(REPO / "bundles" / "schema" / "meta_schema.json")
    )
    # and a broken metadata file is rejected
    import json

    import jsonschema

    meta = json.loads((CONFIGS / "metadata.json").read_text())
    del meta["network_data_format"]["outputs"]["pred"]
    schema = json.loads((REPO / "bundles" / "schema" / "meta_schema.json").read_text())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(meta, schema)


# methods whose terms own trainable parameters (projectors, InfoNCE heads, the diffusion refiner)
TERMS_WITH_PARAMETERS = {"cctr", "cts_scl", "mcsc", "mcscv2", "pclmix", "hybrid"}


@pytest.mark.parametrize("method", METHODS)
def test_check_properties_train_and_inference(method, tiny_registered):
    overrides = dict(
        tiny_overrides(method), dataset_dir=str(tiny_registered / "data"), registration_dir=str(tiny_registered / "reg")
    )
    infer = {"input_dir": str(tiny_registered / "data" / "datalist.json"), "input_groups": ["validation"]}
    for workflow_type, files in (("train", ("train.json",)), ("infer", ("inference.json",))):
        if workflow_type == "infer":
            overrides.update(infer)
        wf = ConfigWorkflow(
            config_file=[str(CONFIGS / f) for f in files] + [str(CONFIGS / "methods" / f"{method}.json")],
            meta_file=str(CONFIGS / "metadata.json"),
            logging_file=str(CONFIGS / "logging.conf"),
            workflow_type=workflow_type,
            **overrides,
        )
        wf.initialize()
        assert wf.check_properties() == [], (workflow_type, method)
        if workflow_type == "train":
            assert "@network.networks" not in json.dumps(wf.parser.get("loss_terms")), method  # terms never name them
            terms = wf.parser.get_parsed_content("bound_loss_terms")
            own = [id(p) for t in terms for p in t.parameters() if p.requires_grad]
            groups = wf.parser.get_parsed_content("optimizer").param_groups
            assert set(own) <= {id(p) for g in groups for p in g["params"]}, method  # bound before the optimiser
            assert bool(own) == (method in TERMS_WITH_PARAMETERS), method


def test_evaluation_preprocesses_with_the_datalist_modality(tmp_path):
    # training reads the modality from the datalist; evaluation (train.json + evaluate.json) must do the same
    import json

    from monai.bundle import ConfigParser

    datalist = tiny_dataset(tmp_path / "data")
    dl = json.loads(Path(datalist).read_text())
    dl["modality"] = "CT"
    Path(datalist).write_text(json.dumps(dl))
    parser = ConfigParser()
    parser.read_config(configs("train.json", "evaluate.json"))
    parser.update({"datalist": str(datalist)})
    assert parser.get_parsed_content("modality") == "CT"
    parser.update({"modality": "MR"})  # an explicit override still wins
    assert parser.get_parsed_content("modality") == "MR"


def oblique_input(tmp_path, src: str) -> str:
    """The same voxels as ``src`` stored with a rotated, LPS-like direction matrix."""
    img = nib.load(src)
    c, s = np.cos(0.3), np.sin(0.3)
    aff = np.eye(4)
    aff[:3, :3] = np.array([[-c, s, 0], [-s, -c, 0], [0, 0, 1]]) @ np.diag(img.header.get_zooms()[:3])
    aff[:3, 3] = [12.0, -7.0, 30.0]
    return write_nifti(tmp_path / "oblique" / "obl_case.nii.gz", np.asarray(img.dataobj), aff, np.float32)


#: TensorBoard scalars of a CCT-R run (bundle docs, "TensorBoard"): training ones at every iteration, validation ones
#: at the iterations validated (every val_interval and the last)
TRAIN_TAGS = ["loss", "sup", "cross", "rsl", "scl", "w_sup", "w_cross", "w_rsl", "w_scl", "lr_0", "lr_1", "lr_2",
              "scl/anchors", "scl/classes", "scl/reps_found"]  # fmt: skip
VAL_TAGS = ["val_mean_dice", "val_dice/blob", "val_dice/ring", "val_seconds"]


def test_cctr_bundle_trains_with_registration_terms_and_logs_at_the_true_iteration(tmp_path, tiny_registered):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "runs"
    common = dict(TINY, dataset_dir=str(tiny_registered / "data"), registration_dir=str(tiny_registered / "reg"))
    run("training", config_file=configs("train.json", "methods/cctr.json"), max_iterations=3, val_interval=2,
        output_root=str(out), **common)  # fmt: skip
    ckpt = torch.load(out / "cctr" / "models" / "checkpoint_iteration=2.pt", map_location="cpu", weights_only=False)
    # the contrastive projector is checkpointed with the students, and an optimiser steps it
    assert any("projector" in k for k in ckpt["loss_terms"])
    assert len(ckpt["optimizer"]["param_groups"]) == 3  # a group per student and one for the projector
    steps: dict[str, list[int]] = {}
    for events in (out / "cctr").glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            steps.setdefault(tag, []).extend(e.step for e in acc.Scalars(tag))
    for tag in TRAIN_TAGS:
        assert sorted(steps.get(tag, [])) == [1, 2, 3], tag
    for tag in VAL_TAGS:
        assert sorted(steps.get(tag, [])) == [2, 3], tag
    # the validation scored the registration prior's shares; model.json says which registration it needs
    assert sorted(steps.get("val_dice_student0_prior0.5", [])) == [2, 3]
    record = json.loads((out / "cctr" / "models" / "model.json").read_text())
    assert record["registration_prior"] is True and record["registration_kind"] == "affine"
    # evaluation in a fresh process (its config's imports replace training's) reads the validation priors
    proc = _bundle_cli("run", "evaluating", config_file=configs("train.json", "evaluate.json", "methods/cctr.json"),
                       output_root=str(out), eval_groups=["validation"], eval_dir=str(tmp_path / "ev"), progress=False,
                       **common)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert pd.read_csv(tmp_path / "ev" / "metrics_per_case.csv")["case_id"].unique().tolist() == ["val"]
    # a model that mixes in the prior: inference needs the test volumes' priors, and says so otherwise
    ckpt_path = out / "cctr" / "models" / "model_final.pt"
    state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    state["prior_weight"] = torch.tensor(0.5)
    torch.save(state, out / "cctr" / "models" / "model.pt")
    infer = dict(TINY, output_root=str(out), input_dir=str(tiny_registered / "data" / "datalist.json"),
                 input_groups=["validation"], progress=False)  # fmt: skip
    with pytest.raises(Exception) as e:
        run("run", config_file=configs("inference.json", "methods/cctr.json"), output_dir=str(tmp_path / "a"), **infer)
    assert any(isinstance(c, InputError) and "val.nii.gz: the model mixes in 0.5 of the registration prior" in str(c)
               for c in _chain(e.value))  # fmt: skip
    run("run", config_file=configs("inference.json", "methods/cctr.json"), output_dir=str(tmp_path / "b"),
        registration_dir=str(tiny_registered / "reg"), **infer)  # fmt: skip
    assert len(list((tmp_path / "b").glob("*_seg.nii.gz"))) == 1
    run("run", config_file=configs("inference.json", "methods/cctr.json"), output_dir=str(tmp_path / "c"),
        prior_weight=0.0, **infer)  # fmt: skip
    assert len(list((tmp_path / "c").glob("*_seg.nii.gz"))) == 1


@pytest.mark.parametrize("method, teacher_key", [("mt", "1.teacher"), ("uamt", "1.teacher"), ("fixmatch", "1.teacher"),
                                                 ("hstf", "2.teacher"), ("hybrid", "1.teacher")])  # fmt: skip
def test_teacher_methods_train_and_checkpoint_their_teacher(tmp_path, tiny_registered, method, teacher_key):
    out = tmp_path / "runs"
    common = dict(tiny_overrides(method), dataset_dir=str(tiny_registered / "data"), output_root=str(out))
    run("training", config_file=configs("train.json", f"methods/{method}.json"), max_iterations=2, val_interval=2,
        mc_samples=2, **common)  # fmt: skip
    ckpt = torch.load(out / method / "models" / "checkpoint_iteration=2.pt", map_location="cpu", weights_only=False)
    assert int(ckpt["loss_terms"][f"{teacher_key}.updates"]) == 2  # the EMA teacher followed both steps
    # no optimiser for the frozen teacher: one AdamW per student only
    # one AdamW per student (the frozen teacher has none), plus one for hybrid's InfoNCE heads and denoiser
    assert len(ckpt["optimizer"]["param_groups"]) == (2 if method in ("hstf", "hybrid") else 1)
    if method == "hybrid":  # evaluation refines with the trained denoiser (steps from the override, here 2)
        run("evaluating", config_file=configs("train.json", "evaluate.json", "methods/hybrid.json"),
            eval_groups=["validation"], refine_steps=2, refine_samples=2, **common)  # fmt: skip
        summary = pd.read_csv(out / "hybrid" / "eval" / "metrics_summary.csv")
        assert summary["dice_mean"].notna().any()
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config(configs("train.json", "evaluate.json", "methods/hybrid.json"))
        parser.update(dict(common, refine_steps=2))
        ensemble = parser.get_parsed_content("network_def")
        assert ensemble.refiner is not None and ensemble.refine_steps == 2


@pytest.mark.slow
def test_bundle_train_evaluate_infer_export_end_to_end(tmp_path):
    data = tmp_path / "data"
    tiny_dataset(data)
    out = tmp_path / "runs"
    common = dict(TINY, dataset_dir=str(data), output_root=str(out))
    run("training", config_file=configs("train.json", "methods/cts.json"), max_iterations=5, val_interval=2, **common)
    models = out / "cts" / "models"
    assert {"model.pt", "model_final.pt", "checkpoint_iteration=4.pt"} <= {p.name for p in models.iterdir()}
    final = torch.load(models / "checkpoint_iteration=4.pt", map_location="cpu", weights_only=True)
    assert final["run_length"] == {"max_iterations": 5}
    # validation chose the students' weights and the best checkpoint records them; make the choice student 1
    # alone, so that evaluation, inference and export visibly follow what the checkpoint says
    best = torch.load(models / "model.pt", map_location="cpu", weights_only=True)
    assert best["member_weights"].tolist() in [[1.0, 0.0], [0.75, 0.25], [0.5, 0.5], [0.25, 0.75], [0.0, 1.0]]
    best["member_weights"] = torch.tensor([0.0, 1.0])
    torch.save(best, models / "model.pt")

    ev = ConfigWorkflow(
        config_file=configs("train.json", "evaluate.json", "methods/cts.json"),
        workflow_type=None,
        run_id="evaluating",
        eval_groups=["validation"],
        **common,
    )
    ev.initialize()
    ev.run()
    assert ev.parser.get_parsed_content("network").member_weights.tolist() == [0.0, 1.0]
    per_case = pd.read_csv(out / "cts" / "eval" / "metrics_per_case.csv")
    assert per_case["case_id"].unique().tolist() == ["val"] and len(per_case) == 2  # two foreground classes
    assert (out / "cts" / "eval" / "overlays" / "val.png").exists()
    val_seg = nib.load(out / "cts" / "eval" / "predictions" / "val_seg.nii.gz")
    assert val_seg.shape == nib.load(data / "val.nii.gz").shape

    # inference on an input with a non-identity direction matrix: output on the input's own grid
    src = oblique_input(tmp_path, str(data / "u0.nii.gz"))
    infer_keys = {k: v for k, v in common.items() if k != "batch_size"}
    run(
        "run",
        config_file=configs("inference.json", "methods/cts.json"),
        input_dir=str(tmp_path / "oblique"),
        output_dir=str(tmp_path / "pred"),
        uncertainty=True,
        **infer_keys,
    )
    seg, ref = nib.load(tmp_path / "pred" / "obl_case_seg.nii.gz"), nib.load(src)
    assert seg.shape == ref.shape and np.allclose(seg.affine, ref.affine)
    assert set(np.unique(np.asarray(seg.dataobj))) <= {0, 1, 2}
    ent = np.asarray(nib.load(tmp_path / "pred" / "obl_case_entropy.nii.gz").dataobj)
    assert ent.shape == ref.shape and ent.min() >= 0 and ent.max() <= np.log(3) + 1e-5

    # export: TorchScript (traced at the patch size) reproduces the eager ensemble's logits
    ts = export_traced(tmp_path / "model.ts", models / "model.pt", "cts", [1, 1, 16, 16], infer_keys)
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "inference.json"), str(CONFIGS / "methods" / "cts.json")])
    for k, v in infer_keys.items():
        parser[k] = v
    eager = parser.get_parsed_content("network_def")
    eager.load_state_dict(torch.load(models / "model.pt", map_location="cpu"))
    eager.eval()
    x = torch.rand(2, 1, 16, 16)
    exported = torch.jit.load(str(ts))
    with torch.no_grad():
        assert torch.allclose(exported(x), eager(x), atol=1e-5)
        assert torch.allclose(exported(x), eager.networks[1](x), atol=1e-5)  # student 1 alone, as recorded


def test_inference_bundle_rejects_bad_inputs(tmp_path):
    bad = tmp_path / "bad"
    write_nifti(bad / "flat.nii.gz", np.zeros((8, 8)), np.eye(4), np.float32)
    (bad / "corrupt.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    kwargs = dict(TINY, output_dir=str(tmp_path / "o"), output_root=str(tmp_path / "runs"))
    with pytest.raises(Exception) as e:
        run("run", config_file=configs("inference.json"), input_dir=str(bad), **kwargs)
    text = "\n".join(str(c) for c in _chain(e.value))
    assert "flat.nii.gz" in text and "3D volume" in text and "corrupt.nii.gz" in text
    assert any(isinstance(c, InputError) for c in _chain(e.value))
    with pytest.raises(Exception) as e:
        run("run", config_file=configs("inference.json"), input_dir=str(tmp_path / "nowhere"), **kwargs)
    assert "not found" in "\n".join(str(c) for c in _chain(e.value))
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def _chain(err):
    while err is not None:
        yield err
        err = err.__cause__ or err.__context__


def test_two_and_a_half_d_trains_evaluates_infers_and_exports(tmp_path):
    """context=3: 3-channel students validate, evaluate and infer on stacked neighbouring slices; export too."""
    data = tmp_path / "data"
    tiny_dataset(data)
    out = tmp_path / "runs"
    common = dict(TINY, dataset_dir=str(data), output_root=str(out), context=3)
    run("training", config_file=configs("train.json", "methods/unet_ls.json"), max_iterations=3, val_interval=2,
        **common)  # fmt: skip
    models = out / "unet_ls" / "models"
    state = torch.load(models / "model.pt", map_location="cpu", weights_only=True)
    first = next(v for k, v in state.items() if k.endswith("conv.weight"))
    assert first.shape[1] == 3  # the student reads 3 slices
    run("evaluating", config_file=configs("train.json", "evaluate.json", "methods/unet_ls.json"),
        eval_groups=["validation"], **common)  # fmt: skip
    summary = pd.read_csv(out / "unet_ls" / "eval" / "metrics_summary.csv")
    assert summary["dice_mean"].notna().all()
    infer_keys = {k: v for k, v in common.items() if k != "batch_size"}
    run("run", config_file=configs("inference.json", "methods/unet_ls.json"), input_dir=str(data / "val.nii.gz"),
        output_dir=str(tmp_path / "pred"), **infer_keys)  # fmt: skip
    seg = nib.load(tmp_path / "pred" / "val_seg.nii.gz")
    assert seg.shape == nib.load(data / "val.nii.gz").shape
    ts = export_traced(tmp_path / "model.ts", models / "model.pt", "unet_ls", [1, 3, 16, 16], infer_keys)
    assert torch.jit.load(str(ts))(torch.rand(2, 3, 16, 16)).shape == (2, 3, 16, 16)


def _bundle_cli(*args: str, **overrides) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "monai.bundle", *args]
    for key, value in overrides.items():
        cmd += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_bundle_errors_end_with_the_file_and_the_problem(tmp_path):
    """Bad data, a corrupt checkpoint and a checkpoint of another network each end the output with one line
    that names the file and the problem (the traceback stays above it, for the log)."""
    data = tmp_path / "data"
    tiny_dataset(data)
    bad = tmp_path / "bad"
    raw = (data / "val.nii.gz").read_bytes()
    (bad / "in").mkdir(parents=True)
    (bad / "in" / "cut.nii.gz").write_bytes(raw[: len(raw) // 2])
    infer = dict(TINY, output_dir=str(tmp_path / "o"), output_root=str(tmp_path / "runs"), progress=False)
    files = json.dumps(configs("inference.json", "methods/cts.json"))
    res = _bundle_cli("run", "--config_file", files, input_dir=str(bad / "in"), **infer)
    last = res.stderr.strip().splitlines()[-1]
    assert res.returncode != 0 and last.startswith("error: ") and "cut.nii.gz" in last and "corrupt" in last, last

    models = tmp_path / "runs" / "cts" / "models"
    models.mkdir(parents=True)
    (models / "model.pt").write_bytes(b"PK\x03\x04 truncated zip")
    res = _bundle_cli("run", "--config_file", files, input_dir=str(data / "val.nii.gz"), **infer)
    last = res.stderr.strip().splitlines()[-1]
    assert "model.pt: not a readable checkpoint, corrupt or truncated" in last and "weights_only" not in last, last
    assert "weights_only=False" not in res.stderr.split("error: ")[-1]

    unet = {f"networks.0.encoder.{i}.weight": torch.zeros(2) for i in range(2)}
    torch.save(unet, models / "model.pt")
    res = _bundle_cli("run", "--config_file", files, input_dir=str(data / "val.nii.gz"), **infer)
    last = res.stderr.strip().splitlines()[-1]
    assert "model.pt: this checkpoint belongs to another method or network" in last, last
    assert "student 0: encoder" in last and "student 1:" in last  # what it holds and what this run builds
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())  # nothing written


def test_the_model_carries_its_preprocessing_to_inference(tmp_path):
    """A CT model and an MR model, each trained with its own spacing, patch size and classes, infer from only the
    model, the inputs and an output folder; an override that contradicts the model is refused, naming both."""
    arch = {k: v for k, v in TINY.items() if k.startswith("student_")}  # the network, not the preprocessing
    for modality in ("CT", "MR"):
        data = tmp_path / modality / "data"
        datalist = tiny_dataset(data)
        dl = json.loads(Path(datalist).read_text())
        dl["modality"] = modality
        Path(datalist).write_text(json.dumps(dl))
        out = tmp_path / modality / "runs"
        train = dict(arch, dataset_dir=str(data), output_root=str(out), pixdim=[1.5, 1.5, -1], patch_size=[16, 16],
                     batch_size=4)  # fmt: skip
        files = configs("train.json", "methods/cts.json")
        run("training", config_file=files, max_iterations=2, val_interval=2, **train)
        record = json.loads((out / "cts" / "models" / "model.json").read_text())
        assert record["modality"] == modality and record["num_classes"] == 3 and record["patch_size"] == [16, 16]
        assert record["class_names"] == ["background", "blob", "ring"] and record["pixdim"] == [1.5, 1.5, -1]
        infer = dict(arch, output_root=str(out), input_dir=str(data / "val.nii.gz"), progress=False)
        run("run", config_file=configs("inference.json", "methods/cts.json"), output_dir=str(tmp_path / modality / "p"),
            **infer)  # fmt: skip
        seg, ref = nib.load(tmp_path / modality / "p" / "val_seg.nii.gz"), nib.load(data / "val.nii.gz")
        assert seg.shape == ref.shape and np.allclose(seg.affine, ref.affine)
        other = "MR" if modality == "CT" else "CT"
        with pytest.raises(Exception) as e:
            run("run", config_file=configs("inference.json", "methods/cts.json"), modality=other,
                output_dir=str(tmp_path / modality / "q"), **infer)  # fmt: skip
        message = "\n".join(str(c) for c in _chain(e.value))
        assert f'trained with modality="{modality}", this run asks for modality="{other}"' in message
        assert "model.json" in message and not (tmp_path / modality / "q").exists()


def test_training_with_a_corrupt_label_ends_with_the_file_and_the_problem(tmp_path):
    data = tmp_path / "data"
    tiny_dataset(data)
    raw = (data / "lab_seg.nii.gz").read_bytes()
    (data / "lab_seg.nii.gz").write_bytes(raw[: len(raw) // 2])
    out = tmp_path / "runs"
    files = json.dumps(configs("train.json", "methods/unet_ls.json"))
    res = _bundle_cli("run", "training", "--config_file", files, dataset_dir=str(data), output_root=str(out),
                      max_iterations=2, val_interval=2, progress=False, **TINY)  # fmt: skip
    last = res.stderr.strip().splitlines()[-1]
    assert res.returncode != 0 and last.startswith("error: ") and "lab_seg.nii.gz" in last, last
    models = out / "unet_ls" / "models"
    assert not models.exists() or not list(models.glob("*.pt"))  # nothing trained, nothing written


@pytest.mark.parametrize("value", [False, "false", "False", True, "true", "True"])
def test_transductive_key_reads_every_boolean_spelling(tiny_registered, value):
    """``--transductive false`` reaches the config as the string "false", which is truthy: the key must parse it,
    and when on, priors come for exactly the validation and test cases (never the labelled ones)."""
    import json

    from monai.bundle import ConfigParser

    datalist = tiny_registered / "data" / "datalist.json"
    parser = ConfigParser()
    parser.read_config(configs("train.json"))
    parser.update({"datalist": str(datalist), "registration_dir": str(tiny_registered / "reg"), "transductive": value})
    priors = parser.get_parsed_content("transductive_priors")
    if str(value).lower() == "false":
        assert priors is None
    else:
        dl = json.loads(datalist.read_text())
        assert sorted(priors) == sorted(c["case_id"] for g in ("validation", "test") for c in dl.get(g, []))
