"""MONAI model-zoo readiness, checked offline in the spirit of model-zoo's premerge (``ci/verify_bundle.py --mode
min``, its pre-commit hooks and unit checks): layout, weights outside git, metadata, JSON format, shapes."""

import json
from pathlib import Path

import yaml
from monai.bundle import ConfigParser, verify_metadata, verify_net_in_out

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "cctr_brain_demo"
SCHEMA = BUNDLE.parent / "schema" / "meta_schema.json"
MAX_FILE_KB = 1024  # model-zoo's check-added-large-files hook


def test_layout_has_the_files_model_zoo_requires_and_no_large_file():
    required = ("configs/metadata.json", "LICENSE", "configs/inference.json", "docs/README.md", "docs/data_license.txt")
    for name in required:
        assert (BUNDLE / name).is_file(), name
    big = [p for p in BUNDLE.rglob("*") if p.is_file() and p.stat().st_size > MAX_FILE_KB * 1024]
    assert big == []


def test_weights_are_listed_in_large_files_yml():
    entries = yaml.safe_load((BUNDLE / "large_files.yml").read_text())["large_files"]
    paths = {e["path"] for e in entries}
    assert "models/model.pt" in paths
    for e in entries:
        assert e["url"].startswith("https://") and e["url"].endswith(Path(e["path"]).name)
        assert e["hash_type"] in ("md5", "sha1", "sha256")
    # MONAI's config reader (what model-zoo's download step uses) reads it too
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "large_files.yml"))
    assert parser.get()["large_files"][0]["path"] == entries[0]["path"]


def test_metadata_version_changelog_and_eval_metrics():
    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    assert meta["version"] in meta["changelog"]
    assert meta["eval_metrics"] and all(isinstance(v, float) and 0 < v <= 1 for v in meta["eval_metrics"].values())
    verify_metadata(meta_file=str(BUNDLE / "configs" / "metadata.json"), filepath=str(SCHEMA))


def test_every_json_file_is_in_model_zoos_pretty_format():
    """pre-commit's pretty-format-json with --no-sort-keys --indent=4: 4 spaces, keys in order, final newline."""
    for path in [*BUNDLE.rglob("*.json"), SCHEMA]:
        text = path.read_text()
        assert text == json.dumps(json.loads(text), indent=4) + "\n", path


def test_network_input_and_output_shapes_match_the_metadata():
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(BUNDLE / "configs" / "metadata.json"),
        config_file=str(BUNDLE / "configs" / "inference.json"),
        bundle_root=str(BUNDLE),
    )


def test_torchscript_support_is_documented_where_model_zoo_looks():
    """Scripting fails in MONAI's Swin patch embedding; model-zoo skips bundles listed in its
    ``exclude_verify_torchscript_list``, and the docs say to add this bundle there and export by tracing."""
    docs = (BUNDLE / "docs" / "README.md").read_text()
    assert "exclude_verify_torchscript_list" in docs and "--use_trace True" in docs
