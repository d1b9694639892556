"""REPS: feature-resolution geometry, inter-volume affines, the FIFO slice bank and registered positives."""

import json
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from monai_ssl.losses.memory import SliceFeatureBank
from monai_ssl.losses.reps import AffineCorrespondences, RegistrationPositives, feature_pixel_to_world, pixel_world

# ---- a hand-built pair of slices -------------------------------------------------------------------------------
# Volume B, slice 3: rotated in plane by the augmentation, 1.5 mm pixels, 4 mm slices, plane z = 24.
#   world = (30 - 1.5 j, -10 + 1.5 i, 24 + 4 k)
M_B = np.array([[0, -1.5, 0, 30], [1.5, 0, 0, -10], [0, 0, 4, 24], [0, 0, 0, 1]], float)
# Registration A -> B: rotation by 90 degrees about z, then translation (7, -3, 2).
T_AB = np.array([[0, -1, 0, 7], [1, 0, 0, -3], [0, 0, 1, 2], [0, 0, 0, 1]], float)
# Volume A's slice (flipped differently, 3 mm slices) is built so that, at stride 2, A's feature pixel (p, q) lies
# on B's feature pixel (q, 3 - p): by hand, B's stride-2 pixel (i, j) centre is (29.25 - 3j, -9.25 + 3i, 24),
# T_AB^-1 (x, y, z) = (y + 3, 7 - x, z - 2), and A's stride-2 pixel (p, q) centre is (-6.25 + 3q, -13.25 - 3p, 22).
M_A = np.array([[0, 1.5, 0, -7], [-1.5, 0, 0, -12.5], [0, 0, 3, 22], [0, 0, 0, 1]], float)
STRIDE = 2


def b_features(offset=0.0):
    """A (3, 4, 4) map of B whose pixel (i, j) holds (i, j, i^2 + j^2) + offset: position, and a non-bilinear code."""
    i, j = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    return torch.stack([i, j, i**2 + j**2])[None] + offset


def reps_ab(capacity=4):
    corr = AffineCorrespondences(["a", "b", "c"], {("a", "b"): T_AB})
    reps = RegistrationPositives(corr, capacity=capacity)
    reps.update(b_features(), torch.tensor(M_B)[None], ["b"], [3], stride=STRIDE)
    return reps


def a_world(p, q, dk=0.0):
    """World points of A's stride-2 feature pixels (p, q) (fractional allowed), shifted dk mm along z."""
    m = feature_pixel_to_world(torch.tensor(M_A)[None], STRIDE).expand(len(p), 4, 4)
    w = pixel_world(m, torch.as_tensor(p, dtype=torch.float64), torch.as_tensor(q, dtype=torch.float64))
    return w + torch.tensor([0.0, 0.0, dk], dtype=torch.float64)


def test_feature_pixel_to_world_uses_the_feature_pixel_centre():
    m = torch.tensor([[2.0, 0, 0, 10], [0, 3.0, 0, 20], [0, 0, 5.0, 30], [0, 0, 0, 1]], dtype=torch.float64)
    f = feature_pixel_to_world(m[None], 4)[0]
    # feature pixel (1, 2) covers input pixels [4, 8) x [8, 12): centre (5.5, 9.5) -> (10 + 11, 20 + 28.5, 30)
    assert torch.allclose(
        f @ torch.tensor([1.0, 2.0, 0, 1], dtype=torch.float64), torch.tensor([21, 48.5, 30, 1.0]).double()
    )
    assert torch.equal(f[:, 2], m[:, 2])  # one slice step is unchanged
    w = pixel_world(f[None].expand(2, 4, 4), torch.tensor([1, 0]), torch.tensor([2, 0]))
    assert torch.allclose(w, torch.tensor([[21, 48.5, 30], [10 + 3, 20 + 4.5, 30]], dtype=torch.float64))


def test_affine_correspondences_map_every_pair_and_flag_missing_ones():
    t_ac = np.diag([2.0, 1.0, 1.0, 1.0])
    corr = AffineCorrespondences(["a", "b", "c"], {("a", "b"): T_AB, ("a", "c"): t_ac})
    pts = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [5.0, 5.0, 5.0]], dtype=torch.float64)
    src = corr.index(["a", "a", "zz"])
    assert src.tolist() == [0, 0, -1]
    out, valid = corr.map_all(src, pts)
    # T_AB (x, y, z) = (-y + 7, x - 3, z + 2); T_AC doubles x
    assert torch.allclose(out[0, 1], torch.tensor([5.0, -2.0, 5.0], dtype=torch.float64))
    assert torch.allclose(out[0, 2], torch.tensor([2.0, 2.0, 3.0], dtype=torch.float64))
    assert valid.tolist() == [[False, True, True], [False, True, True], [False, False, False]]
    one = corr.map(corr.index(["a", "b"]), pts[:2], corr.index(["b", "a"]))
    assert torch.allclose(one[0], torch.tensor([5.0, -2.0, 5.0], dtype=torch.float64))
    assert torch.isnan(one[1]).all()  # no (b, a) registration
    with pytest.raises(ValueError, match="unknown case"):
        AffineCorrespondences(["a"], {("a", "q"): T_AB})
    with pytest.raises(ValueError, match="4x4"):
        AffineCorrespondences(["a", "b"], {("a", "b"): np.eye(3)})


def test_reps_fetches_exactly_the_corresponding_pixel_through_the_affine():
    reps = reps_ab()
    p, q = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    p, q = p.flatten(), q.flatten()
    feats, found = reps.lookup(reps.case_index(["a"] * 16), a_world(p, q))
    assert found.all()
    i, j = q.float(), 3 - p.float()  # A (p, q) <-> B (q, 3 - p), worked out by hand above
    assert torch.equal(feats, torch.stack([i, j, i**2 + j**2], dim=1))


def test_reps_interpolates_bilinearly_between_pixels():
    reps = reps_ab()
    # half a feature pixel along A's first axis = half a pixel along B's second axis (j)
    feats, found = reps.lookup(reps.case_index(["a", "a"]), a_world([0.5, 1.5], [1, 2]))
    assert found.all()
    # A (0.5, 1) -> B (1, 2.5); A (1.5, 2) -> B (2, 1.5): (i, j, mean of i^2 + j^2 at the two neighbours)
    expected = torch.tensor([[1, 2.5, 1 + (4 + 9) / 2], [2, 1.5, 4 + (1 + 4) / 2]])
    assert torch.allclose(feats, expected, atol=1e-6)
    # half a pixel on both axes: the mean of the four neighbours
    feats, _ = reps.lookup(reps.case_index(["a"]), a_world([0.5], [0.5]))
    corners = b_features()[0][:, 0:2, 2:4].reshape(3, 4).mean(dim=1)  # B pixels i in {0, 1}, j in {2, 3}
    assert torch.allclose(feats[0], corners, atol=1e-6)
    # outside B's map: A (0, -1) -> B (-1, 3)
    _, found = reps.lookup(reps.case_index(["a"]), a_world([0], [-1]))
    assert not found.any()


def test_reps_reads_only_slices_within_half_a_slice_spacing():
    reps = reps_ab()
    src = reps.case_index(["a"] * 4)
    # B's slices are 4 mm apart: 1.9 mm off the plane is found, 2.1 mm (either side) is not
    _, found = reps.lookup(
        src, a_world([1, 1, 1, 1], [2, 2, 2, 2]) + torch.tensor([[0, 0, d] for d in (1.9, -1.9, 2.1, -2.1)])
    )
    assert found.tolist() == [True, True, False, False]
    # a second stored slice of B (index 4, 4 mm further): a point half way between reads both and averages
    m4 = M_B.copy()
    m4[2, 3] += 4
    reps.update(b_features(100.0), torch.tensor(m4)[None], ["b"], [4], stride=STRIDE)
    feats, found = reps.lookup(reps.case_index(["a"]), a_world([1], [2], dk=2.0))
    i, j = 2.0, 2.0
    assert found.all() and torch.allclose(feats[0], torch.tensor([i, j, i * i + j * j]) + 50.0)


def test_reps_ignores_the_anchor_volume_and_volumes_without_registration():
    reps = reps_ab()
    # a slice of A itself in the bank, placed exactly where A's points are: never used for A's anchors
    reps.update(b_features(), torch.tensor(M_A)[None], ["a"], [0], stride=STRIDE)
    reps.update(b_features(), torch.tensor(M_A)[None], ["c"], [0], stride=STRIDE)  # no (a, c) pair
    feats, found = reps.lookup(reps.case_index(["a", "c", "b"]), a_world([1, 1, 1], [1, 1, 1]))
    assert found.tolist() == [True, False, False]  # c and b have no outgoing registrations
    assert torch.equal(feats[0], torch.tensor([1.0, 2.0, 5.0]))  # B's pixel (1, 2) alone, not averaged with A's


def test_registration_positive_blends_and_renormalises():
    reps = reps_ab()
    label_pos = F.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]), dim=1)
    world = torch.cat([a_world([0], [0]), a_world([0], [0], dk=50.0)])  # the second is far from every slice
    pos, found = reps.positives(label_pos, reps.case_index(["a", "a"]), world)
    assert found.tolist() == [True, False]
    reg = np.array([0.0, 3.0, 9.0]) / np.sqrt(90.0)  # A (0, 0) -> B (0, 3): (0, 3, 9)
    blend = 0.5 * np.array([1.0, 0, 0]) + 0.5 * reg
    assert np.allclose(pos[0].numpy(), blend / np.linalg.norm(blend), atol=1e-6)
    assert torch.equal(pos[1], label_pos[1])


def test_reps_reads_the_registration_store(tmp_path, caplog):
    sitk = pytest.importorskip("SimpleITK")
    root = tmp_path / "affine"
    (root / "pairs").mkdir(parents=True)
    cases = [{"case_id": c, "group": "unlabeled", "image": f"{c}.nii.gz"} for c in ("a", "b", "c")]
    (root / "cases.json").write_text(json.dumps({"cases": cases}))
    tr = sitk.AffineTransform(3)
    tr.SetMatrix([0.9, -0.2, 0.0, 0.1, 1.1, 0.05, 0.0, 0.1, 1.0])
    tr.SetTranslation([4.0, -2.0, 1.5])
    tr.SetCenter([10.0, 5.0, -3.0])
    sitk.WriteTransform(tr, str(root / "pairs" / "a__b.h5"))
    (root / "pairs" / "a__b.json").write_text(json.dumps({"status": "ok"}))
    with caplog.at_level(logging.WARNING):
        corr = AffineCorrespondences.from_registration(tmp_path, "affine")
    assert "5 of 6 ordered pairs" in caplog.text
    assert corr.case_ids == ["a", "b", "c"] and corr.valid.sum() == 1
    pts = np.array([[1.0, 2.0, 3.0], [-20.0, 7.0, 11.0]])
    got = corr.map(corr.index(["a", "a"]), torch.tensor(pts), corr.index(["b", "b"])).numpy()
    flip = np.array([-1.0, -1.0, 1.0])  # RAS <-> LPS
    expected = np.array([np.array(tr.TransformPoint((p * flip).tolist())) * flip for p in pts])
    assert np.allclose(got, expected, atol=1e-9)
    with pytest.raises(ValueError, match="no registration input"):
        AffineCorrespondences.from_registration(tmp_path, "affine", ["a", "zz"])


# ---- the slice bank ------------------------------------------------------------------------------------------
def _maps(values):
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 2, 2, 2).clone()


def test_slice_bank_capacity_update_in_place_and_oldest_first_eviction():
    bank = SliceFeatureBank(capacity=3)
    eye = torch.eye(4, dtype=torch.float64).expand(3, 4, 4)
    bank.update(_maps([1, 2, 3]), eye, ["a", "a", "b"], torch.tensor([0, 1, 0]))
    assert len(bank) == 3 and bank.keys() == [("a", 0), ("a", 1), ("b", 0)]
    # updating a stored slice replaces its map and makes it the newest entry
    bank.update(_maps([10]), eye[:1] * 2, ["a"], [0])
    assert len(bank) == 3 and bank.keys() == [("a", 1), ("b", 0), ("a", 0)]
    feats, m = bank.get("a", 0)
    assert torch.all(feats == 10) and torch.equal(m, eye[0] * 2)
    # a new slice evicts the oldest, ("a", 1)
    bank.update(_maps([4]), eye[:1], ["c"], [5])
    assert ("a", 1) not in bank and bank.keys() == [("b", 0), ("a", 0), ("c", 5)]
    assert torch.all(bank.get("c", 5)[0] == 4)
    # the same slice twice in one batch keeps the last copy and takes one slot
    bank.update(_maps([7, 8]), eye[:2], ["d", "d"], [1, 1])
    assert bank.keys() == [("a", 0), ("c", 5), ("d", 1)]
    assert torch.all(bank.get("d", 1)[0] == 8)
    with pytest.raises(ValueError, match="patches of one size"):
        bank.update(torch.zeros(1, 2, 3, 3), eye[:1], ["e"], [0])
    with pytest.raises(ValueError, match="capacity"):
        SliceFeatureBank(0)
