"""Class-balanced sampling (slices and 3D patches) and anatomy-respecting flips: fractions over many draws,
centres on the drawn class, and pixel_to_world still exact for class-centred crops."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import RandFlipd, RandHistogramShiftd

from monai_ssl.data.pipeline import patch_augmentations
from monai_ssl.data.slices import SAMPLED_CLASS_KEY, ForegroundSampler, PatchDataset, SliceDataset, VolumeDataset
from monai_ssl.data.transforms import PixelToWorldd, slice_augmentations, volume_transforms
from tests.conftest import write_nifti
from tests.test_slices import WINDOW, world_coordinate_volumes

SHAPE = (30, 28, 8)


def tiny_class_volume(affine=None):
    """Class 1 fills a third of the volume; class 2 is 4 voxels in one slice (0.06% of the volume)."""
    label = np.zeros(SHAPE, np.uint8)
    label[:10] = 1
    label[20:22, 5:7, 6] = 2
    image = torch.as_tensor(label, dtype=torch.float32)[None]
    aff = torch.as_tensor(np.diag([1.5, 1.5, 4.0, 1.0]) if affine is None else affine)
    return {
        "case_id": "t",
        "image": MetaTensor(image, affine=aff),
        "label": MetaTensor(torch.as_tensor(label)[None], affine=aff),
    }


def test_sampler_fraction_and_uniform_class_choice_over_many_draws():
    sampler = ForegroundSampler([tiny_class_volume()], fraction=0.4, num_classes=3, seed=0)
    assert sampler.classes == [1, 2] and len(sampler.voxels[2]) == 4
    draws = [sampler.draw() for _ in range(4000)]
    centred = [d for d in draws if d is not None]
    assert abs(len(centred) / 4000 - 0.4) < 0.03
    tiny = [d for d in centred if d[0] == 2]
    assert abs(len(tiny) / len(centred) - 0.5) < 0.04  # uniform over the classes present, not over voxels
    label = tiny_class_volume()["label"][0].numpy()
    assert all(label[tuple(ijk)] == c for c, _, ijk in centred)
    assert ForegroundSampler([tiny_class_volume()], fraction=0.0).draw() is None


def test_sampler_caps_voxels_per_class_and_skips_ignore_values():
    vol = tiny_class_volume()
    vol["label"][0, 25:, :, :] = 255  # unannotated (scribbles): never a centre
    sampler = ForegroundSampler([vol], fraction=1.0, num_classes=3, max_per_class=50, seed=1)
    assert sampler.classes == [1, 2]
    assert len(sampler.voxels[1]) == 50 and len(sampler.voxels[2]) == 4
    with pytest.raises(ValueError, match="fraction"):
        ForegroundSampler([vol], fraction=1.5)


def test_slice_dataset_centres_crops_on_the_drawn_class():
    vol = tiny_class_volume()
    aug = slice_augmentations((12, 12), flip_prob=0, affine_prob=0) + [PixelToWorldd()]
    uniform = SliceDataset([vol], aug).set_random_state(0)
    balanced = SliceDataset([vol], aug, foreground=ForegroundSampler([vol], 0.5, num_classes=3)).set_random_state(0)
    rng = np.random.default_rng(0)
    n, seen = 1000, {"uniform": 0, "balanced": 0}
    kinds = []
    for name, ds in (("uniform", uniform), ("balanced", balanced)):
        for i in rng.integers(0, len(ds), n):
            s = ds[int(i)]
            seen[name] += int((s["label"] == 2).any())
            if name == "balanced":
                kinds.append(s[SAMPLED_CLASS_KEY])
                if s[SAMPLED_CLASS_KEY] >= 0:  # the centre pixel (or its crop-clamped neighbour) holds the class
                    assert (s["label"][0, 5:7, 5:7] == s[SAMPLED_CLASS_KEY]).any() or s[SAMPLED_CLASS_KEY] == 1
    kinds = np.array(kinds)
    assert abs((kinds >= 0).mean() - 0.5) < 0.04
    # the 4-voxel class: 1 slice in 8 and a 12x12 crop of 30x28 -> rare uniformly, in ~1/4 of balanced draws
    assert seen["uniform"] / n < 0.06
    assert abs(seen["balanced"] / n - (0.25 + 0.5 * seen["uniform"] / n)) < 0.05


def test_class_centred_slice_pixels_still_map_to_their_world_points(tmp_path):
    paths, _ = world_coordinate_volumes(tmp_path)
    tfm = volume_transforms(modality="CT", ct_window=WINDOW, pixdim=(1.0, 1.0, -1.0))
    vols = VolumeDataset([{"case_id": f"c{a}", "image": p} for a, p in enumerate(paths)], tfm)
    label = torch.zeros_like(vols[0]["image"], dtype=torch.uint8)
    label[0, 2:4, 3:5, 4] = 1  # a small class near a corner: the crop must be shifted to stay inside
    stacked = dict(
        vols[0],
        image=MetaTensor(torch.cat([vols[a]["image"] for a in range(4)]), meta=vols[0]["image"].meta),
        label=MetaTensor(label, meta=vols[0]["image"].meta),
    )
    sampler = ForegroundSampler([stacked], fraction=1.0, num_classes=2, seed=0)
    transform = slice_augmentations((18, 18), rotate_deg=30, scale=0.15, affine_prob=1.0) + [PixelToWorldd()]
    ds = SliceDataset([stacked], transform, foreground=sampler)
    for seed in range(5):
        sample = ds.set_random_state(seed)[0]
        assert sample["slice_index"] == 4 and sample[SAMPLED_CLASS_KEY] == 1
        img = sample["image"].numpy() * (WINDOW[1] - WINDOW[0]) + WINDOW[0]
        ii, jj = np.nonzero(img[3] > 999.0)
        m = sample["pixel_to_world"].numpy()
        predicted = (m @ np.stack([ii, jj, np.zeros_like(ii), np.ones_like(ii)]))[:3].T
        assert ii.size > 50 and np.abs(predicted - img[:3, ii, jj].T).max() < 0.02


def test_class_centred_3d_patch_holds_the_class_at_its_centre_and_maps_to_world():
    affine = np.array([[0, -1.2, 0, 10.0], [1.1, 0, 0, -4.0], [0, 0, 3.0, 2.0], [0, 0, 0, 1]])
    vol = tiny_class_volume(affine)
    sampler = ForegroundSampler([vol], fraction=1.0, num_classes=3, seed=0)
    ds = PatchDataset([vol], patch_augmentations((8, 8, 4), flip_prob=0), foreground=sampler).set_random_state(0)
    for _ in range(20):
        s = ds[0]
        c = s[SAMPLED_CLASS_KEY]
        assert s["label"].shape == (1, 8, 8, 4) and c in (1, 2)
        if c == 2:  # tiny class: away from the border, so the patch is centred on the drawn voxel
            ijk = np.argwhere(s["label"][0].numpy() == 2)
            assert len(ijk) >= 1 and np.abs(ijk - [4, 4, 2]).max() <= 2
        # every patch voxel's world point is the volume's world point of the voxel it was cut from
        world = s["pixel_to_world"].numpy() @ [1, 2, 3, 1]
        src = np.linalg.inv(affine) @ world
        assert np.allclose(src, np.round(src), atol=1e-6)
        assert s["label"][0, 1, 2, 3] == vol["label"][0][tuple(np.round(src[:3]).astype(int))]


def test_flip_axes_flip_only_the_named_axes():
    assert not any(isinstance(t, RandFlipd) for t in slice_augmentations((8, 8)))  # default: no flips
    flips = [t for t in slice_augmentations((8, 8), flip_axes=[0]) if isinstance(t, RandFlipd)]
    assert [f.flipper.spatial_axis for f in flips] == [0]
    flips3d = [t for t in patch_augmentations((4, 4, 4), flip_axes=(0, 2)) if isinstance(t, RandFlipd)]
    assert [f.flipper.spatial_axis for f in flips3d] == [0, 2]
    with pytest.raises(ValueError, match="flip_axes"):
        slice_augmentations((8, 8), flip_axes=[2])
    # axis 0 flips left-right only: a slice whose value is its row index keeps its columns
    data = {"image": MetaTensor(torch.arange(8.0).reshape(1, 8, 1).expand(1, 8, 8).clone(), affine=torch.eye(3))}
    tf = slice_augmentations((8, 8), label_keys=(), flip_prob=1.0, affine_prob=0, flip_axes=[0])
    out = data
    for t in tf:
        out = t(out)
    assert torch.equal(out["image"][0, :, 0], torch.arange(7.0, -1, -1)) and torch.equal(
        out["image"][0, 0], torch.full((8,), 7.0)
    )


def test_training_datasets_pass_the_sampler_and_flips(tmp_path):
    from monai_ssl.data.datalist import write_datalist
    from monai_ssl.data.pipeline import training_datasets

    vol = tiny_class_volume()
    aff = vol["image"].affine.numpy()
    case = {
        "case_id": "t",
        "image": write_nifti(tmp_path / "t.nii.gz", vol["image"][0].numpy(), aff, np.float32),
        "label": write_nifti(tmp_path / "t_l.nii.gz", vol["label"][0].numpy(), aff, np.uint8),
    }
    unlabeled = {"case_id": "u", "image": case["image"]}
    dl = write_datalist(
        {"name": "s", "labels": {"0": "bg", "1": "big", "2": "tiny"}, "labeled": [case], "unlabeled": [unlabeled]},
        tmp_path / "dl.json",
    )
    lab, unl = training_datasets(
        dl, (12, 12), pixdim=(-1, -1, -1), foreground_fraction=0.25, flip_axes=[0],
        registered_labels={"u": case["label"]}, unlabeled_foreground_fraction=0.5,
    )  # fmt: skip
    assert lab.foreground.fraction == 0.25 and lab.foreground.classes == [1, 2]
    assert [t.flipper.spatial_axis for t in lab.transform.transforms if isinstance(t, RandFlipd)] == [0]
    # unlabelled draws are balanced on the registered label, which they carry; they never carry "label"
    assert unl.foreground.key == "reg_label" and unl.foreground.classes == [1, 2]
    unl.set_random_state(0)
    drawn = [unl[0] for _ in range(200)]
    assert all("label" not in s and "reg_label" in s for s in drawn)
    assert abs(np.mean([s[SAMPLED_CLASS_KEY] >= 0 for s in drawn]) - 0.5) < 0.1
    lab0, _ = training_datasets(dl, (12, 12), pixdim=(-1, -1, -1), foreground_fraction=0.0)
    assert lab0.foreground is None
    assert not any(isinstance(t, RandHistogramShiftd) for t in lab.transform.transforms)  # contrast off by default
    for dims, patch in ((2, (12, 12)), (3, (12, 12, 4))):
        ds = training_datasets(dl, patch, spatial_dims=dims, pixdim=(-1, -1, -1), intensity_prob=0.4)
        shifts = [t for d in ds for t in d.transform.transforms if isinstance(t, RandHistogramShiftd)]
        assert [t.prob for t in shifts] == [0.4, 0.4], dims  # labelled and unlabelled samples alike
