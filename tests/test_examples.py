"""The walkthroughs in examples/: the abdominal CT builder for real, and every documented command against the code.

The commands of each walkthrough are obtained by running its ```bash blocks, in order, in one bash process whose
``PATH`` holds only recording stand-ins for ``python`` and ``torchrun``: the shell expands variables and quoting
exactly as for a user, nothing else can run, and each recorded command line is then checked against the real
parsers (data and registration CLIs, the builder), the bundle configs (files, run ids, override keys and types)
and the other commands of the same walkthrough (datalist, registration folder and kind, checkpoints, classes).
"""

from __future__ import annotations

import ast
import gzip
import importlib.util
import inspect
import json
import re
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from fire.parser import DefaultParseValue
from monai.bundle import ConfigParser, ckpt_export
from monai.bundle import run as bundle_run

from monai_ssl import demo
from monai_ssl.data.__main__ import build_parser as data_parser
from monai_ssl.data.converters import ACDC_LABELS, SYNAPSE_LABELS
from monai_ssl.data.datalist import GROUPS, load_datalist
from monai_ssl.data.validation import validate_datalist
from registration.cli import build_parser as registration_parser
from registration.params import KINDS

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
BUILDER = EXAMPLES / "abdomen_ct" / "build_dataset.py"

# what each walkthrough must use, from independent sources: class tables of the code, modality of the data
EXPECTED = {
    "demo_brain.md": {"num_classes": len(demo.CLASS_NAMES), "modality": "MR"},
    "acdc.md": {"num_classes": len(ACDC_LABELS), "modality": "MR"},
    "synapse.md": {"num_classes": len(SYNAPSE_LABELS), "modality": "CT"},
    "abdomen_ct.md": {"num_classes": len(SYNAPSE_LABELS), "modality": "CT"},
}
METHODS = ["unet_ls", "cps", "cts", "cts_rsl"]
# TotalSegmentator "total" ids -> Synapse 8-organ ids, as the issue specifies them
TS_TO_SYNAPSE = {52: 1, 4: 2, 3: 3, 2: 4, 5: 5, 7: 6, 1: 7, 6: 8}
# values of these keys must agree between a training run and the evaluation/inference/export that loads it
NETWORK_KEYS = ["method", "num_classes", "spatial_dims", "context", "students"]
# ... and these too between training and the evaluation/inference runs (same preprocessing and output folders)
DATA_KEYS = ["pixdim", "patch_size", "modality"]
# train.json's default: training and evaluation read the modality from the datalist
DATALIST_MODALITY = "$monai_ssl.data.datalist.load_datalist(@datalist).get('modality', 'MR')"
DATALIST_NUM_CLASSES = "$monai_ssl.data.datalist.num_classes(monai_ssl.data.datalist.load_datalist(@datalist))"
#: a value evaluation and inference take from the trained model's record (``models/model.json``) at run time
RECORDED = "<from the model's record>"


def effective(parser, key: str, name: str):
    """A config value as the run uses it: the datalist defaults are the walkthrough data's modality and class
    count (its datalist records them; the converters' tests check that); evaluation's and inference's defaults
    come from the model's record, which refuses any contradicting override at run time."""
    value = parser.get(key)
    if key == "modality" and (value == DATALIST_MODALITY or "'modality'" in str(value) and "recorded(" in str(value)):
        return EXPECTED[name]["modality"]
    if key == "num_classes" and value == DATALIST_NUM_CLASSES:
        return EXPECTED[name]["num_classes"]
    if isinstance(value, str) and "inference.record.recorded(" in value:
        return RECORDED
    return value


# --------------------------------------------------------------------------------------- abdominal CT builder


@cache
def _load_builder():
    """The builder script as a module (registered, as dataclasses need their module in ``sys.modules``)."""
    spec = importlib.util.spec_from_file_location("abdomen_ct_build_dataset", BUILDER)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def builder():
    return _load_builder()


@pytest.fixture(scope="module")
def archive(builder):
    """The cached TotalSegmentator source archive (downloaded once per machine into the default cache)."""
    try:
        return builder.fetch_archive()
    except builder.DownloadError as e:
        pytest.skip(f"the package index cannot be reached and {builder.ARCHIVE} is not cached: {e}")


@pytest.fixture(scope="module")
def built(builder, archive, tmp_path_factory):
    out = tmp_path_factory.mktemp("abdomen_ct")
    return builder.build_dataset(out, archive.parent, seed=0, num_unlabeled=3)


def _member_nifti(archive: Path, member: str) -> nib.Nifti1Image:
    with tarfile.open(archive, "r:gz") as tar:
        return nib.Nifti1Image.from_bytes(gzip.decompress(tar.extractfile(member).read()))


def test_abdomen_ct_builder_writes_a_valid_datalist(built, builder):
    assert validate_datalist(built, progress=False) == []
    dl = load_datalist(built)
    assert dl["modality"] == "CT" and dl["labels"] == SYNAPSE_LABELS
    assert {g: len(dl[g]) for g in GROUPS} == {"labeled": 1, "unlabeled": 3, "validation": 1, "test": 1}
    real = dl["labeled"][0]
    assert real["case_id"] == "real00" and not real.get("synthetic")
    for case in dl["unlabeled"] + dl["validation"] + dl["test"]:
        assert case["synthetic"] and case["source_patient"] == real["patient_id"] != case["patient_id"]
    out = built.parent
    assert not list(out.rglob(".tmp-*")), "temporary files left behind"
    readme = (out / "README.md").read_text()
    for phrase in ("is real", "synthetic", "model predictions", "Apache License 2.0", builder.ARCHIVE_SHA256):
        assert phrase in readme
    assert (out / "LICENSE-totalsegmentator.txt").read_text().lstrip().startswith("Apache License")
    summary = pd.read_csv(out / "summary.csv")
    assert (summary.loc[summary["source"] != "real", "min_jacobian"] > 0).all()


def test_abdomen_ct_labels_are_remapped_to_synapse_organs(built, archive, builder):
    source = np.asarray(_member_nifti(archive, builder.SEG_MEMBER).dataobj)
    out = np.asarray(nib.load(built.parent / "labels" / "real00.nii.gz").dataobj)
    for ts_id, syn_id in TS_TO_SYNAPSE.items():
        voxel = tuple(np.argwhere(source == ts_id)[0])  # one voxel of each organ maps as specified
        assert out[voxel] == syn_id, (ts_id, syn_id)
    for other in (8, 18, 20, 25):  # adrenal gland, small bowel, colon, sacrum: not Synapse organs
        assert (out[source == other] == 0).all()
    lut = np.zeros(256, dtype=np.uint8)
    lut[list(TS_TO_SYNAPSE)] = list(TS_TO_SYNAPSE.values())
    np.testing.assert_array_equal(out, lut[source])

    # the ids name the same organs in TotalSegmentator's own class map as in the Synapse label table
    with tarfile.open(archive, "r:gz") as tar:
        code = tar.extractfile("totalsegmentator-2.18.0/totalsegmentator/map_to_binary.py").read().decode()
    class_map = next(
        ast.literal_eval(node.value)
        for node in ast.parse(code).body
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "class_map"
    )
    for ts_id, syn_id in TS_TO_SYNAPSE.items():
        assert set(class_map["total"][ts_id].split("_")) == set(SYNAPSE_LABELS[str(syn_id)].split("_"))


def test_abdomen_ct_geometry_is_preserved(built, archive, builder):
    ct = _member_nifti(archive, builder.CT_MEMBER)
    source_ct = np.asarray(ct.dataobj)
    source_seg = np.asarray(_member_nifti(archive, builder.SEG_MEMBER).dataobj)
    out = built.parent
    real = nib.load(out / "images" / "real00.nii.gz")
    np.testing.assert_array_equal(np.asarray(real.dataobj), source_ct)
    liver_hu = source_ct[source_seg == 5].mean()
    for case in ["real00", "syn01", "syn02", "syn03", "syn04", "syn05"]:
        image, label = nib.load(out / "images" / f"{case}.nii.gz"), nib.load(out / "labels" / f"{case}.nii.gz")
        for img in (image, label):
            assert img.shape == ct.shape
            np.testing.assert_allclose(img.affine, ct.affine, atol=1e-5)
            assert int(img.header["sform_code"]) == int(ct.header["sform_code"])
        lab = np.asarray(label.dataobj)
        assert set(np.unique(lab).tolist()) == set(range(9)), case  # every organ survives the deformation
        # image and labels were warped by the same map: the liver label still covers liver intensities
        assert abs(np.asarray(image.dataobj)[lab == 5].mean() - liver_hu) < 15.0, case
        if case != "real00":
            assert not np.array_equal(lab, np.asarray(nib.load(out / "labels" / "real00.nii.gz").dataobj))


def test_abdomen_ct_builder_fails_clearly_without_a_source(builder, tmp_path, monkeypatch, caplog):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / builder.ARCHIVE).write_bytes(b"not the archive")
    with pytest.raises(builder.SourceDataError, match="does not match the pinned") as e:
        builder.fetch_archive(bad)
    assert str(bad / builder.ARCHIVE) in str(e.value) and "pip download" in str(e.value)
    assert builder.main(["--out", str(tmp_path / "out"), "--cache", str(bad)]) == 1
    assert "does not match the pinned" in caplog.text and not (tmp_path / "out").exists()

    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip cannot reach any index
    empty = tmp_path / "empty"
    with pytest.raises(builder.DownloadError, match="could not download") as e:
        builder.fetch_archive(empty)
    assert "by hand" in str(e.value) and not (empty / builder.ARCHIVE).exists()
    assert not [p for p in empty.iterdir() if p.name.startswith(".download-")]


# ----------------------------------------------------------------------------------- walkthrough commands


RECORDER = """#!/bin/sh
{ printf '%s' "${0##*/}"; for a in "$@"; do printf '\\037%s' "$a"; done; printf '\\036'; } >> "$RECORD"
"""


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)


@cache
def recorded_commands(name: str) -> tuple[tuple[str, ...], ...]:
    """Run the walkthrough's bash blocks with recording ``python``/``torchrun``; return the argv of each call."""
    blocks = bash_blocks((EXAMPLES / name).read_text())
    assert blocks, f"{name}: no ```bash blocks"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "bin").mkdir()
        for tool in ("python", "torchrun"):
            (tmp / "bin" / tool).write_text(RECORDER)
            (tmp / "bin" / tool).chmod(0o755)
        script = "set -euo pipefail\n" + "\n".join(blocks)
        env = {"PATH": str(tmp / "bin"), "RECORD": str(tmp / "record"), "HOME": str(tmp)}
        proc = subprocess.run(["/bin/bash", "-c", script], cwd=tmp, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, f"{name}: the bash blocks fail ({proc.stderr.strip()})"
        raw = (tmp / "record").read_text() if (tmp / "record").exists() else ""
    return tuple(tuple(cmd.split("\x1f")) for cmd in raw.split("\x1e") if cmd)


def python_argv(cmd: tuple[str, ...]) -> list[str]:
    """The arguments after ``python`` (for ``torchrun``: from its ``-m``)."""
    if cmd[0] == "torchrun":
        assert "-m" in cmd, f"torchrun without -m: {cmd}"
        return list(cmd[cmd.index("-m") :])
    return list(cmd[1:])


@dataclass
class BundleCall:
    """One ``python -m monai.bundle <command>`` call: positionals, config files and overrides."""

    command: str
    positional: list[str]
    options: dict[str, Any]
    overrides: dict[str, Any]
    files: list[str] = field(default_factory=list)

    @property
    def defaults(self) -> ConfigParser:
        """The merged config files without the command line overrides."""
        parser = ConfigParser()
        parser.read_config([str(REPO / f) for f in self.files])
        return parser

    @property
    def parser(self) -> ConfigParser:
        """The merged config files with the command line overrides applied."""
        parser = self.defaults
        for key, value in self.overrides.items():
            parser[key] = value
        return parser


def parse_bundle(args: list[str]) -> BundleCall:
    """Split a bundle command line the way ``fire`` does: ``--key value``/``--key=value``, fire-parsed values."""
    command, rest = args[0], args[1:]
    assert command in ("run", "ckpt_export"), f"unexpected bundle command {command!r}"
    positional, flags, i = [], {}, 0
    while i < len(rest):
        token = rest[i]
        if not token.startswith("--"):
            assert not flags, f"positional {token!r} after options in {args}"
            positional.append(token)
            i += 1
            continue
        key, eq, value = token[2:].partition("=")
        if not eq:
            assert i + 1 < len(rest) and not rest[i + 1].startswith("--"), f"--{key} has no value in {args}"
            value, i = rest[i + 1], i + 1
        assert key not in flags, f"--{key} given twice in {args}"
        flags[key] = DefaultParseValue(value)
        i += 1
    function = bundle_run if command == "run" else ckpt_export
    named = set(inspect.signature(function).parameters) - {"override"}
    call = BundleCall(
        command,
        positional,
        {k: v for k, v in flags.items() if k in named},
        {k: v for k, v in flags.items() if k not in named},
    )
    files = call.options.get("config_file")
    assert files, f"bundle call without --config_file: {args}"
    call.files = [files] if isinstance(files, str) else list(files)
    return call


def bundle_calls(name: str) -> list[BundleCall]:
    return [
        parse_bundle(argv[2:])
        for argv in map(python_argv, recorded_commands(name))
        if argv[:2] == ["-m", "monai.bundle"]
    ]


def cli_calls(name: str, module: str) -> list[list[str]]:
    return [argv[2:] for argv in map(python_argv, recorded_commands(name)) if argv[:2] == ["-m", module]]


def _same_path(a: Any, b: Any) -> bool:
    return Path(str(a)).as_posix().rstrip("/") == Path(str(b)).as_posix().rstrip("/")


def _type_matches(default: Any, value: Any) -> bool:
    """An override must have the kind of value the config holds (a string 'true' for a bool is a bug)."""
    if isinstance(default, str) and default.startswith(("$", "@", "%")) or default is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int | float):
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, type(default))


WALKTHROUGHS = sorted(EXPECTED)


def test_examples_index_links_every_walkthrough():
    index = (EXAMPLES / "README.md").read_text()
    links = set(re.findall(r"\]\(([^)#]+)\)", index))
    assert set(WALKTHROUGHS) <= links
    assert "abdomen_ct/build_dataset.py" in links
    for link in links:
        if not link.startswith("http"):
            assert (EXAMPLES / link).exists(), link
    assert {p.name for p in EXAMPLES.glob("*.md")} - {"README.md"} == set(WALKTHROUGHS)


@pytest.mark.parametrize("name", WALKTHROUGHS)
def test_walkthrough_commands_use_real_cli_options(name):
    commands = [python_argv(c) for c in recorded_commands(name)]
    assert commands, f"{name}: no commands recorded"
    for argv in commands:
        where = f"{name}: python {' '.join(argv)}"
        try:
            if argv[:2] == ["-m", "monai_ssl.data"]:
                data_parser().parse_args(argv[2:])
            elif argv[:2] == ["-m", "registration"]:
                registration_parser().parse_args(argv[2:])
            elif argv and argv[0] == "examples/abdomen_ct/build_dataset.py":
                _load_builder().build_parser().parse_args(argv[1:])
            elif argv[:2] == ["-m", "monai_ssl.demo"]:
                flags = {a.split("=")[0] for a in argv[2:] if a.startswith("--")}
                assert flags <= {"--out", "--seed", "--cache", "--num-synthetic", "--force"}, where
                assert "--out" in flags, where
            elif argv[:1] == ["-c"]:
                compile(argv[1], where, "exec")
            else:
                assert argv[:2] == ["-m", "monai.bundle"], f"unknown command {where}"
        except SystemExit as e:  # argparse rejects unknown options and missing required ones
            pytest.fail(f"{where}: rejected by the real parser (exit {e.code})")


def test_every_documented_subcommand_answers_help():
    """Each distinct ``python -m monai_ssl.data|registration <cmd>`` runs as a real process with ``--help``."""
    subcommands = set()
    for name in WALKTHROUGHS:
        for module in ("monai_ssl.data", "registration"):
            subcommands |= {(module, args[0]) for args in cli_calls(name, module)}
    assert ("registration", "precompute") in subcommands and ("monai_ssl.data", "validate-datalist") in subcommands
    procs = {
        sub: subprocess.Popen(
            [sys.executable, "-m", *sub, "--help"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for sub in sorted(subcommands)
    }
    for (module, command), proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, (module, command, err)
        assert command in out.splitlines()[0], (module, command, out[:200])


@pytest.mark.parametrize("name", WALKTHROUGHS)
def test_walkthrough_bundle_calls_match_the_configs(name):
    calls = bundle_calls(name)
    assert {c.positional[0] for c in calls if c.command == "run" and c.positional} == {"training", "evaluating"}
    trained = {Path(f).stem for c in calls if c.positional == ["training"] for f in c.files if "/methods/" in f}
    assert set(METHODS) <= trained, f"{name}: methods trained {sorted(trained)}"
    for call in calls:
        where = f"{name}: {call.command} {call.positional} {call.files}"
        for f in call.files:
            assert (REPO / f).is_file(), f"{where}: config file {f} does not exist"
        defaults, parser = call.defaults, call.parser
        run_id = call.positional[0] if call.command == "run" and call.positional else "run"
        assert (call.positional[0] if call.command == "ckpt_export" else run_id) in parser, where
        for key, value in call.overrides.items():
            assert key in defaults, f"{where}: override --{key} is not a key of the merged config"
            default = defaults[key]
            assert _type_matches(default, value), f"{where}: --{key} {value!r} does not fit the default {default!r}"
        assert effective(parser, "num_classes", name) in (EXPECTED[name]["num_classes"], RECORDED), where
        if call.command == "run":  # export builds the network only
            assert effective(parser, "modality", name) == EXPECTED[name]["modality"], where
        kind = parser.get("registration_kind", "affine")
        assert kind in KINDS or effective(parser, "registration_kind", name) == RECORDED, where
        for key in ("eval_groups", "input_groups"):
            assert set(parser.get(key) or []) <= set(GROUPS), where


def _resolved(parser: ConfigParser, key: str) -> Any:
    return parser.get_parsed_content(key, instantiate=False, eval_expr=True)


@pytest.mark.parametrize("name", WALKTHROUGHS)
def test_walkthrough_steps_fit_together(name):
    """Datalist, registration folder/kind, checkpoints and model settings agree between the steps."""
    calls = bundle_calls(name)
    training = [c for c in calls if c.positional == ["training"]]
    datalists = {str(_resolved(c.parser, "datalist")) for c in training}
    assert len(datalists) == 1, f"{name}: training runs use different datalists {datalists}"
    datalist = datalists.pop()
    validated = [a[1] for a in cli_calls(name, "monai_ssl.data") if a[0] == "validate-datalist"]
    assert any(_same_path(v, datalist) for v in validated), f"{name}: {datalist} is never validated"
    for args in cli_calls(name, "monai_ssl.data"):
        if args[0].startswith("convert-"):
            assert _same_path(args[args.index("--out") + 1], datalist), f"{name}: converter writes elsewhere"

    registration = [registration_parser().parse_args(a) for a in cli_calls(name, "registration")]
    for args in registration:
        assert args.datalist is None or _same_path(args.datalist, datalist), f"{name}: registration datalist"
    done = {(str(a.out), a.kind, a.command) for a in registration}
    for call in training:
        parser = call.parser
        if parser.get("registered_labels") is None:
            continue
        out, kind = parser["registration_dir"], parser["registration_kind"]
        for step in ("precompute", "select"):
            assert any(_same_path(o, out) and k == kind and s == step for o, k, s in done), (
                f"{name}: {call.files[-1]} reads {out}/{kind} but the walkthrough never runs `{step}` there"
            )

    runs = {str(Path(str(_resolved(c.parser, "ckpt_dir")))): c.parser for c in training}
    for call in calls:
        if call.positional == ["training"]:
            continue
        parser = call.parser
        if call.command == "ckpt_export":
            ckpt_dir = str(Path(call.options["ckpt_file"]).parent)
        else:
            ckpt_dir = str(Path(str(_resolved(parser, "ckpt_dir"))))
        assert ckpt_dir in runs, f"{name}: {call.files} loads {ckpt_dir}, which no training run writes"
        trained = runs[ckpt_dir]
        for key in NETWORK_KEYS + (DATA_KEYS if call.command == "run" else []):
            mine, theirs = effective(parser, key, name), effective(trained, key, name)
            assert mine in (theirs, RECORDED), f"{name}: {key} {mine} != trained {theirs}"
        for student in ("student_0", "student_1"):
            assert parser[student]["name"] == trained[student]["name"], f"{name}: {student} differs"
        if call.command == "ckpt_export":
            shape = list(call.options["input_shape"])
            assert shape[1:] == [trained["context"], *trained["patch_size"]], f"{name}: export input_shape {shape}"


@cache
def _student_output_shape(name: str, num_classes: int, in_channels: int, patch: tuple[int, ...]) -> tuple[int, ...]:
    from monai_ssl.networks import build_network

    net = build_network(name, spatial_dims=len(patch), in_channels=in_channels, out_channels=num_classes).eval()
    with torch.no_grad():
        return tuple(net(torch.zeros(1, in_channels, *patch)).shape)


def test_walkthrough_students_run_at_the_documented_patch_size():
    """Every student of every training command accepts its patch and gives ``num_classes`` channels back."""
    seen = set()
    for name in WALKTHROUGHS:
        for call in bundle_calls(name):
            if call.positional != ["training"]:
                continue
            parser = call.parser
            nc, ctx, patch = effective(parser, "num_classes", name), parser["context"], tuple(parser["patch_size"])
            for ref in parser["students"]:
                student = parser[ref.lstrip("@")]["name"]
                seen.add((student, nc, patch))
                assert _student_output_shape(student, nc, ctx, patch) == (1, nc, *patch), (name, student, patch)
    assert len(seen) >= 4


# ----------------------------------------------------------------------------------------- user's own data


@pytest.mark.parametrize("name, dataset", [("acdc.md", "ACDC"), ("synapse.md", "Synapse")])
def test_user_data_examples_say_they_need_the_users_data(name, dataset):
    text = (EXAMPLES / name).read_text()
    assert f"This example needs the user's own copy of the {dataset} data." in text
    assert "Where to get it" in text and "Expected layout" in text
    assert re.search(r"https://\S+", text)


def test_abdomen_ct_walkthrough_matches_the_builder(builder):
    """The CT example builds with the builder's defaults and its commands read the dataset it writes."""
    calls = [python_argv(c) for c in recorded_commands("abdomen_ct.md")]
    build = [a for a in calls if a and a[0] == "examples/abdomen_ct/build_dataset.py"]
    assert len(build) == 1
    out = builder.build_parser().parse_args(build[0][1:]).out
    parsers = [c.parser for c in bundle_calls("abdomen_ct.md") if c.command == "run"]
    datalists = {str(_resolved(p, "datalist")) for p in parsers if "datalist" in p}
    inputs = {str(p["input_dir"]) for p in parsers if "input_dir" in p}
    assert inputs == {f"{out}/datalist.json", f"{out}/images/real00.nii.gz"}, inputs
    assert datalists and all(_same_path(d, Path(out) / "datalist.json") for d in datalists), datalists
    args = [registration_parser().parse_args(a) for a in cli_calls("abdomen_ct.md", "registration")]
    assert {(a.command, a.kind) for a in args} == {(c, k) for c in ("precompute", "select", "report") for k in KINDS}
    grids = [a.grid_mm for a in args if a.command == "precompute" and a.kind == "bspline"]
    assert grids and all(g is None or g >= 2 * 3.0 for g in grids)  # at least twice the 3 mm slice spacing


def test_synapse_bspline_grid_is_at_least_twice_the_slice_spacing():
    args = [registration_parser().parse_args(a) for a in cli_calls("synapse.md", "registration")]
    assert {a.kind for a in args} == set(KINDS)
    grids = [a.grid_mm for a in args if a.command == "precompute" and a.kind == "bspline"]
    assert grids and all(g >= 2 * 5.0 for g in grids)  # Synapse slices are at most 5 mm apart


def test_recorded_commands_keep_quoted_lists_intact():
    """The recorder sees what a user's shell passes: a quoted config list is one argument, fire-parsed."""
    call = next(c for c in bundle_calls("demo_brain.md") if c.positional == ["training"])
    assert call.files == [
        "bundles/cctr_brain_demo/configs/train.json",
        f"bundles/cctr_brain_demo/configs/methods/{Path(call.files[1]).stem}.json",
    ]
    assert json.dumps(call.overrides["max_iterations"]) == "2000"
