"""Slice sampling: pixel_to_world stays correct through preprocessing and augmentation; mixed batches."""

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose

from monai_ssl.data.slices import SemiSupervisedLoader, SliceDataset, VolumeDataset, extract_slice
from monai_ssl.data.transforms import PixelToWorldd, intensity_augmentations, slice_augmentations, volume_transforms
from tests.conftest import write_nifti

WINDOW = (-1000.0, 1000.0)  # CT window used as an exactly invertible linear intensity map in these tests


def oblique_affine():
    """Voxel->world (RAS) with a rotation, flipped axes (LPS-like storage) and anisotropic spacing."""
    c, s = np.cos(0.3), np.sin(0.3)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag([-1.0, -1.0, 1.0])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([1.2, 0.9, 4.0])
    aff[:3, 3] = [40.0, -25.0, 12.0]
    return aff


def world_coordinate_volumes(tmp_path, shape=(22, 26, 6)):
    """Three images whose intensities are the RAS world x, y, z of each voxel (plus a constant image)."""
    aff = oblique_affine()
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    world = ijk @ aff[:3, :3].T + aff[:3, 3]
    paths = [write_nifti(tmp_path / f"w{a}.nii.gz", world[..., a], aff, np.float32) for a in range(3)]
    paths.append(write_nifti(tmp_path / "ones.nii.gz", np.full(shape, 1000.0), aff, np.float32))
    return paths, aff


def test_augmented_pixel_maps_to_its_source_world_point(tmp_path):
    paths, _ = world_coordinate_volumes(tmp_path)
    tfm = volume_transforms(modality="CT", ct_window=WINDOW, pixdim=(1.0, 1.0, -1.0))
    vols = VolumeDataset([{"case_id": f"c{a}", "image": p} for a, p in enumerate(paths)], tfm)
    # resampled to RAS with 1 mm in-plane, slice axis kept
    assert np.allclose(vols[0]["image"].pixdim[:2], 1.0)
    stacked = dict(
        vols[0], image=MetaTensor(torch.cat([vols[a]["image"] for a in range(4)]), meta=vols[0]["image"].meta)
    )
    transform = slice_augmentations((18, 18), rotate_deg=30, scale=0.15, affine_prob=1.0) + [PixelToWorldd()]
    ds = SliceDataset([stacked], transform)
    checked = 0
    for seed in range(6):
        ds.set_random_state(seed)
        for z in (1, 3):
            sample = ds[z + stacked["image"].shape[-1] * 0]
            img = sample["image"].numpy() * (WINDOW[1] - WINDOW[0]) + WINDOW[0]
            valid = img[3] > 999.0  # fully inside the resampled volume (no zero padding mixed in)
            ii, jj = np.nonzero(valid)
            m = sample["pixel_to_world"].numpy()
            predicted = (m @ np.stack([ii, jj, np.zeros_like(ii), np.ones_like(ii)]))[:3].T
            decoded = img[:3, ii, jj].T
            assert sample["slice_index"] == z
            assert np.abs(predicted - decoded).max() < 0.02, seed
            checked += ii.size
    assert checked > 500


def test_pixel_to_world_third_column_steps_between_slices(tmp_path):
    paths, aff = world_coordinate_volumes(tmp_path)
    tfm = volume_transforms(modality="CT", ct_window=WINDOW, pixdim=(-1, -1, -1))
    vol = VolumeDataset([{"case_id": "z", "image": paths[2]}], tfm)[0]
    s2 = PixelToWorldd()(extract_slice(vol, 2))
    s3 = PixelToWorldd()(extract_slice(vol, 3))
    p2, p3 = s2["pixel_to_world"].numpy(), s3["pixel_to_world"].numpy()
    assert np.allclose(p2 @ [4, 5, 1, 1], p3 @ [4, 5, 0, 1])
    assert np.isclose(np.linalg.norm(p2[:3, 2]), 4.0)  # slice spacing kept


def test_context_slices_become_channels_and_clamp(tmp_path):
    vol = {
        "case_id": "k",
        "image": MetaTensor(torch.arange(5.0).reshape(1, 1, 1, 5).expand(2, 3, 4, 5).clone(), affine=torch.eye(4)),
        "label": MetaTensor(torch.arange(5).reshape(1, 1, 1, 5).expand(1, 3, 4, 5).clone(), affine=torch.eye(4)),
    }
    s = extract_slice(vol, 0, context=3)
    assert s["image"].shape == (6, 3, 4)
    # channel-major: channel 0 gets slices (0, 0, 1) clamped, then channel 1 the same
    assert s["image"][:, 0, 0].tolist() == [0, 0, 1, 0, 0, 1]
    assert s["label"].shape == (1, 3, 4)
    assert int(s["label"].flatten()[0]) == 0
    assert extract_slice(vol, 4, context=3)["image"][:3, 0, 0].tolist() == [3, 4, 4]
    with pytest.raises(ValueError, match="odd"):
        extract_slice(vol, 0, context=2)


def _labeled_unlabeled(tmp_path):
    rng = np.random.default_rng(1)
    aff = np.diag([1.0, 1.0, 3.0, 1.0])
    cases = []
    for name in ("a", "b"):
        img = write_nifti(tmp_path / f"{name}.nii.gz", rng.random((12, 12, 4)), aff, np.float32)
        lab = write_nifti(tmp_path / f"{name}_l.nii.gz", rng.integers(0, 2, (12, 12, 4)), aff, np.uint8)
        cases.append({"case_id": name, "image": img, "label": lab})
    unl = [{"case_id": f"u{i}", "image": cases[0]["image"]} for i in range(3)]
    tfm = volume_transforms(num_classes=2, pixdim=(-1, -1, -1))
    aug = slice_augmentations((8, 8)) + [PixelToWorldd()]
    return SliceDataset(VolumeDataset(cases, tfm), aug), SliceDataset(VolumeDataset(unl, tfm), aug)


def test_mixed_batches_ratio_and_no_unlabeled_labels(tmp_path):
    lab, unl = _labeled_unlabeled(tmp_path)
    assert len(lab) == 8 and len(unl) == 12
    loader = SemiSupervisedLoader(lab, unl, batch_size=5, labeled_ratio=0.4, seed=3)
    batch = next(iter(loader))
    assert batch["labeled"]["image"].shape == (2, 1, 8, 8)
    assert batch["labeled"]["label"].shape == (2, 1, 8, 8) and batch["labeled"]["label"].dtype == torch.long
    assert batch["unlabeled"]["image"].shape == (3, 1, 8, 8)
    assert "label" not in batch["unlabeled"]
    assert batch["unlabeled"]["pixel_to_world"].shape == (3, 4, 4)
    assert set(batch["unlabeled"]["case_id"]) <= {"u0", "u1", "u2"}
    # reproducible by seed: same draws, same augmentation
    again = next(iter(SemiSupervisedLoader(lab, unl, batch_size=5, labeled_ratio=0.4, seed=3)))
    assert torch.equal(batch["labeled"]["image"], again["labeled"]["image"])
    assert batch["unlabeled"]["case_id"] == again["unlabeled"]["case_id"]
    other = next(iter(SemiSupervisedLoader(lab, unl, batch_size=5, labeled_ratio=0.4, seed=4)))
    assert not torch.equal(batch["labeled"]["image"], other["labeled"]["image"])
    supervised = next(iter(SemiSupervisedLoader(lab, None, batch_size=3)))
    assert list(supervised) == ["labeled"] and supervised["labeled"]["image"].shape[0] == 3


def test_resampling_preserves_world_geometry_against_nibabel(tmp_path):
    """A voxel's RAS position after the pipeline matches nibabel's for the voxel holding the same value."""
    paths, aff = world_coordinate_volumes(tmp_path, shape=(10, 12, 5))
    vol = VolumeDataset(
        [{"case_id": "x", "image": paths[0]}], volume_transforms("CT", pixdim=(-1, -1, -1), ct_window=WINDOW)
    )[0]
    img = vol["image"]
    # Orientationd reorders/flips axes to RAS: the new affine must be diagonal-dominant with positive x, y
    assert img.affine[0, 0] > 0 and img.affine[1, 1] > 0
    nib_img = nib.load(paths[0])
    val = img[0].numpy() * (WINDOW[1] - WINDOW[0]) + WINDOW[0]
    i, j, k = 3, 7, 2
    world = img.affine.numpy() @ [i, j, k, 1]
    assert np.isclose(val[i, j, k], world[0], atol=1e-2)
    src_voxel = np.linalg.solve(nib_img.affine, world)
    assert np.allclose(src_voxel, np.round(src_voxel), atol=1e-4)  # lands on an original voxel centre


def test_stack_context_gives_every_slice_the_channels_extract_slice_gives_it():
    """Inference stacks the volume once; slice z of the result equals training's 2.5D slice z (clamped ends)."""
    from monai.data import MetaTensor

    from monai_ssl.data.slices import stack_context

    rng = np.random.default_rng(0)
    image = torch.as_tensor(rng.normal(size=(2, 5, 4, 6)), dtype=torch.float32)  # 2 channels, 6 slices
    volume = {"image": MetaTensor(image, affine=torch.eye(4))}
    stacked = stack_context(image[None], 3)[0]
    assert stacked.shape == (6, 5, 4, 6)
    for z in range(6):
        expected = extract_slice(volume, z, context=3)["image"]
        assert torch.equal(stacked[..., z], expected.as_tensor()), z
    assert torch.equal(stack_context(image[None], 1), image[None])


def test_intensity_augmentation_is_a_monotone_remap_of_the_image_only():
    """Random contrast changes intensities but keeps their order (tissues stay brighter or darker than each
    other), never touches the labels, and is absent at probability 0."""
    assert intensity_augmentations(0.0) == []
    ramp = torch.linspace(0, 1, 400).reshape(1, 20, 20)
    label = (ramp * 5).long()
    changed = 0
    for seed in range(8):
        tf = Compose(intensity_augmentations(1.0))
        tf.set_random_state(seed)
        out = tf({"image": ramp.clone(), "label": label.clone()})
        flat = torch.as_tensor(out["image"]).flatten()
        assert torch.all(flat[1:] >= flat[:-1] - 1e-6), seed
        assert torch.equal(torch.as_tensor(out["label"]), label)
        changed += int((flat - ramp.flatten()).abs().max() > 0.02)
    assert changed == 8
