"""Seeded label noise near class boundaries (monai_ssl.data.label_noise) and its datalist/CLI."""

import nibabel as nib
import numpy as np
from scipy import ndimage

from monai_ssl.data.__main__ import main as data_main
from monai_ssl.data.datalist import load_datalist
from monai_ssl.data.label_noise import boundary_mask, noisy_label, write_noisy_datalist
from tests.test_trainer import tiny_dataset


def blob_labels(shape=(24, 24, 4)):
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    r1 = np.linalg.norm(grid[..., :2] - [9, 10], axis=-1)
    r2 = np.linalg.norm(grid[..., :2] - [17, 15], axis=-1)
    label = np.where(r1 < 6, 1, 0) + np.where(r1 < 2.5, 1, 0)
    return np.where(r2 < 3, 3, label).astype(np.uint8)  # classes 0, 1, 2 (inside 1) and a small 3


def test_noise_is_seeded_near_boundaries_and_keeps_classes():
    clean = blob_labels()
    a, b = noisy_label(clean, seed=4, case_id="x"), noisy_label(clean, seed=4, case_id="x")
    assert np.array_equal(a, b) and a.dtype == clean.dtype
    assert not np.array_equal(a, noisy_label(clean, seed=5, case_id="x"))
    assert not np.array_equal(a, noisy_label(clean, seed=4, case_id="y"))
    for seed in range(6):
        noisy = noisy_label(clean, seed=seed, max_radius=2, erode_prob=0.5, dilate_prob=0.5, jitter_prob=0.5)
        changed = noisy != clean
        assert changed.any()
        # in-plane distance (the slice axis is far) to the nearest clean boundary voxel
        dist = ndimage.distance_transform_edt(~boundary_mask(clean), sampling=(1, 1, 1e6))
        assert dist[changed].max() <= 3
        assert set(np.unique(noisy)) == set(np.unique(clean))
    # tiny classes survive a large erosion
    assert 3 in noisy_label(clean, seed=0, erode_prob=1.0, dilate_prob=0.0, max_radius=5, jitter_prob=0.0)


def test_noisy_datalist_and_cli(tmp_path):
    datalist = tiny_dataset(tmp_path / "data", n_unlabeled=1, shape=(12, 12, 3))
    out = write_noisy_datalist(datalist, tmp_path / "noisy", seed=1, jitter_prob=0.5)
    dl, src = load_datalist(out), load_datalist(datalist)
    assert dl["label_noise"]["seed"] == 1 and dl["label_noise"]["jitter_prob"] == 0.5
    noisy_img, clean_img = nib.load(dl["labeled"][0]["label"]), nib.load(src["labeled"][0]["label"])
    assert np.allclose(noisy_img.affine, clean_img.affine)
    assert not np.array_equal(np.asarray(noisy_img.dataobj), np.asarray(clean_img.dataobj))
    assert dl["validation"][0]["label"] == src["validation"][0]["label"]  # evaluation keeps clean labels
    assert dl["labeled"][0]["image"] == src["labeled"][0]["image"]
    assert not list((tmp_path / "noisy" / "labels").glob(".tmp-*"))
    assert data_main(["noisy-labels", "--datalist", str(datalist), "--out", str(tmp_path / "cli"), "--seed", "1",
                      "--jitter-prob", "0.5"]) == 0  # fmt: skip
    again = load_datalist(tmp_path / "cli" / "datalist.json")
    assert np.array_equal(np.asarray(nib.load(again["labeled"][0]["label"]).dataobj), np.asarray(noisy_img.dataobj))
