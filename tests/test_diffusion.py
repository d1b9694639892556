"""The refiner's training term (monai_ssl.losses.diffusion), refinement under inference and in the bundle."""

import nibabel as nib
import numpy as np
import torch
import torch.nn as nn
from monai.bundle import run as bundle_run

from monai_ssl.inference.volume import inference_cases
from monai_ssl.losses.diffusion import DiffusionRefinementTerm
from monai_ssl.losses.terms import StepContext
from monai_ssl.networks.denoiser import ConditionalDenoiser
from monai_ssl.networks.ensemble import StudentEnsemble
from monai_ssl.networks.refiner import DiffusionRefiner, LinearNoiseSchedule
from tests.test_bundle import TINY, configs
from tests.test_inference import Threshold, blob_case
from tests.test_inference import run as run_inference
from tests.test_refiner import ScaleDenoiser, onehot_mask
from tests.test_trainer import tiny_dataset


def _ctx(students, image, label):
    logits = [net(image) for net in students]
    return StepContext(0, 10, {"image": image, "label": label}, None, logits, [])


def test_term_loss_is_the_hand_computed_mse_and_students_get_no_gradient():
    s = LinearNoiseSchedule(50)
    stub = ScaleDenoiser()
    term = DiffusionRefinementTerm(DiffusionRefiner(stub, s))
    students = [nn.Conv2d(1, 3, 3, padding=1), nn.Conv2d(1, 3, 1)]
    label, onehot = onehot_mask(b=3)
    image = torch.rand(3, 1, 6, 5)
    torch.manual_seed(7)
    loss = term(_ctx(students, image, label.float()))
    torch.manual_seed(7)  # the term draws one step per slice, then the noise
    t = torch.randint(1, 51, (3,))
    eps = torch.randn(3, 3, 6, 5)
    ab = s.alphabar[t].float().view(3, 1, 1, 1)
    x_t = ab.sqrt() * (2 * onehot - 1) + (1 - ab).sqrt() * eps
    assert torch.allclose(loss, ((0.5 * x_t - eps) ** 2).mean())
    loss.backward()
    assert all(p.grad is None for net in students for p in net.parameters())
    assert stub.w.grad is not None and stub.w.grad != 0


def test_term_conditions_on_the_students_detached_mean_softmax():
    seen = {}

    class Spy(ScaleDenoiser):
        def forward(self, x_t, image, coarse_probs, t):
            seen["image"], seen["probs"] = image, coarse_probs
            return super().forward(x_t, image, coarse_probs, t)

    students = [nn.Conv2d(1, 3, 3, padding=1), nn.Conv2d(1, 3, 1)]
    label, _ = onehot_mask(b=2)
    image = torch.rand(2, 1, 6, 5)
    ctx = _ctx(students, image, label)
    DiffusionRefinementTerm(DiffusionRefiner(Spy(), LinearNoiseSchedule(30)))(ctx)
    expected = (ctx.logits_l[0].softmax(1) + ctx.logits_l[1].softmax(1)) / 2
    assert seen["image"] is image and not seen["probs"].requires_grad
    assert torch.allclose(seen["probs"], expected)


def test_a_few_training_steps_lower_the_term_loss():
    torch.manual_seed(0)
    refiner = DiffusionRefiner(
        ConditionalDenoiser(2, 1, 3, channels=(8, 16), norm_num_groups=4), LinearNoiseSchedule(30)
    )
    term = DiffusionRefinementTerm(refiner)
    students = [nn.Conv2d(1, 3, 1)]
    label, _ = onehot_mask(b=2, h=16, w=16)
    image = label.float() / 2 + 0.1 * torch.rand(2, 1, 16, 16)
    opt = torch.optim.Adam(term.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        torch.manual_seed(1)  # the same steps and noise every time: a fixed example
        loss = term(_ctx(students, image, label))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_refining_ensemble_under_slice_inferer_writes_variance_on_the_input_grid(tmp_path):
    img_path, _, label = blob_case(tmp_path)
    torch.manual_seed(0)
    refiner = DiffusionRefiner(
        ConditionalDenoiser(2, 1, 2, channels=(8, 16), norm_num_groups=4), LinearNoiseSchedule(30)
    )
    net = StudentEnsemble([Threshold(), Threshold()], refiner, refine_steps=3, refine_samples=2, refine_variance=True)
    run_inference(inference_cases(tmp_path / "in"), tmp_path / "out", uncertainty=True, network=net, variance=True)
    src = nib.load(img_path)
    var = nib.load(tmp_path / "out" / "case_a_variance.nii.gz")
    v = np.asarray(var.dataobj)
    assert var.shape == src.shape and np.allclose(var.affine, src.affine)
    assert v.min() >= -1e-6 and 0 < v.max() <= 0.5 + 1e-5  # summed over 2 classes: at most 1 - 1/2
    seg = np.asarray(nib.load(tmp_path / "out" / "case_a_seg.nii.gz").dataobj)
    assert seg.shape == label.shape and set(np.unique(seg)) <= {0, 1}


def test_bundle_trains_the_refiner_and_inference_refines_from_model_final(tmp_path):
    """The composable pieces a method file uses: ``network_def#refiner`` and the term over ``@network.refiner``."""
    data = tmp_path / "data"
    tiny_dataset(data)
    out = tmp_path / "runs"
    refiner = {
        "_target_": "monai_ssl.networks.refiner.DiffusionRefiner",
        "denoiser": {
            "_target_": "monai_ssl.networks.denoiser.ConditionalDenoiser",
            "spatial_dims": "@spatial_dims",
            "in_channels": "@in_channels",
            "num_classes": "@num_classes",
            "channels": [8, 16],
            "norm_num_groups": 4,
        },
        "schedule": {"_target_": "monai_ssl.networks.refiner.LinearNoiseSchedule", "num_timesteps": 30},
    }
    terms = [
        {"_target_": "monai_ssl.losses.terms.SupervisedTerm", "name": "sup"},
        {"_target_": "monai_ssl.losses.diffusion.DiffusionRefinementTerm", "refiner": "$@network.refiner"},
    ]
    common = dict(TINY, dataset_dir=str(data), output_root=str(out), **{"network_def#refiner": refiner})
    bundle_run("training", config_file=configs("train.json", "methods/unet_ls.json"), max_iterations=2,
               val_interval=2, loss_terms=terms, **common)  # fmt: skip
    final = torch.load(out / "unet_ls" / "models" / "model_final.pt", map_location="cpu")
    assert any(k.startswith("refiner.denoiser.") for k in final)
    ckpt = torch.load(out / "unet_ls" / "models" / "checkpoint_iteration=2.pt", map_location="cpu", weights_only=False)
    assert len(ckpt["optimizer"]["param_groups"]) == 2  # the student's and the refinement term's
    infer = {k: v for k, v in common.items() if k != "batch_size"}
    infer.update(input_dir=str(data / "val.nii.gz"), output_dir=str(tmp_path / "pred"), uncertainty=True)
    bundle_run("run", config_file=configs("inference.json", "methods/unet_ls.json"), refine_steps=2, refine_samples=2,
               **infer)  # fmt: skip
    ref = nib.load(data / "val.nii.gz")
    for suffix in ("seg", "entropy", "variance"):
        assert nib.load(tmp_path / "pred" / f"val_{suffix}.nii.gz").shape == ref.shape
    assert np.asarray(nib.load(tmp_path / "pred" / "val_variance.nii.gz").dataobj).max() > 0  # it did refine
