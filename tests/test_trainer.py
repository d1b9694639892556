"""The semi-supervised trainer: handler wiring, reproducibility, kill-and-resume, 2D and 3D runs."""

import copy
import glob
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.engines import SupervisedEvaluator
from monai.handlers import (
    CheckpointLoader,
    CheckpointSaver,
    LrScheduleHandler,
    MeanDice,
    StatsHandler,
    TensorBoardStatsHandler,
    ValidationHandler,
    from_engine,
)
from monai.inferers import SliceInferer, SlidingWindowInferer
from monai.transforms import AsDiscreted
from monai.utils import set_determinism

from monai_ssl.data.datalist import write_datalist
from monai_ssl.data.pipeline import evaluation_dataset, training_datasets
from monai_ssl.data.slices import SemiSupervisedLoader
from monai_ssl.engines.trainer import SemiSupervisedTrainer, loss_summary
from monai_ssl.losses.terms import CrossPseudoTerm, SupervisedTerm
from monai_ssl.networks.ensemble import StudentEnsemble
from monai_ssl.networks.unet import FeatureUNet

REPO = Path(__file__).resolve().parents[1]
LR = 5e-3


def tiny_dataset(root: Path, n_unlabeled: int = 2, shape=(20, 20, 6)) -> Path:
    """Bright blob = class 1, dark ring = class 2 on noise; one labelled, some unlabelled, one validation case."""
    sys.path.insert(0, str(REPO))
    from tests.conftest import write_nifti

    rng = np.random.default_rng(0)
    aff = np.diag([1.5, 1.5, 3.0, 1.0])
    cases = {}
    for name in ["lab", "val"] + [f"u{i}" for i in range(n_unlabeled)]:
        c = np.array(shape) / 2 + rng.uniform(-2, 2, 3)
        grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
        r = np.linalg.norm((grid - c) * [1, 1, 2], axis=-1)
        label = np.where(r < 4, 1, np.where(r < 6.5, 2, 0)).astype(np.uint8)
        image = np.choose(label, [0.2, 1.0, 0.5]) + rng.normal(0, 0.05, shape)
        cases[name] = {
            "case_id": name,
            "image": write_nifti(root / f"{name}.nii.gz", image, aff, np.float32),
            "label": write_nifti(root / f"{name}_seg.nii.gz", label, aff, np.uint8),
        }
    dl = {
        "name": "tiny",
        "modality": "MR",
        "labels": {"0": "background", "1": "blob", "2": "ring"},
        "labeled": [cases["lab"]],
        "unlabeled": [cases[f"u{i}"] for i in range(n_unlabeled)],
        "validation": [cases["val"]],
    }
    return write_datalist(dl, root / "datalist.json")


def build(
    datalist,
    max_iterations=8,
    interval=2,
    seed=0,
    spatial_dims=2,
    ckpt_dir=None,
    resume=None,
    kill_at=None,
    validate=False,
):
    """A CPS run on the tiny data set, with the handlers a bundle would use."""
    set_determinism(seed)
    patch = (16, 16) if spatial_dims == 2 else (16, 16, 4)
    lab, unl = training_datasets(datalist, patch, spatial_dims=spatial_dims, pixdim=(-1, -1, -1))
    loader = SemiSupervisedLoader(lab, unl, batch_size=4, labeled_ratio=0.5, seed=seed)
    nets = [FeatureUNet(spatial_dims, 1, 3, channels=(4, 8, 16), num_res_units=1) for _ in range(2)]
    opts = [torch.optim.AdamW(n.parameters(), lr=LR, weight_decay=5e-4) for n in nets]
    scheds = [torch.optim.lr_scheduler.PolynomialLR(o, total_iters=max_iterations, power=0.9) for o in opts]
    handlers = [LrScheduleHandler(s, epoch_level=False, print_lr=False) for s in scheds]
    save_dict = {
        "net0": nets[0],
        "net1": nets[1],
        "opt0": opts[0],
        "opt1": opts[1],
        "sch0": scheds[0],
        "sch1": scheds[1],
    }
    evaluator = None
    if validate:
        inferer = SliceInferer(roi_size=patch, spatial_dim=2) if spatial_dims == 2 else SlidingWindowInferer(patch)
        evaluator = SupervisedEvaluator(
            device="cpu",
            val_data_loader=torch.utils.data.DataLoader(
                evaluation_dataset(datalist, pixdim=(-1, -1, -1)), batch_size=1
            ),
            network=StudentEnsemble(nets),
            inferer=inferer,
            postprocessing=AsDiscreted(keys=["pred", "label"], argmax=[True, False], to_onehot=3),
            key_val_metric={
                "val_dice": MeanDice(include_background=False, output_transform=from_engine(["pred", "label"]))
            },
        )
        handlers.append(ValidationHandler(validator=evaluator, interval=1, epoch_level=True))
    trainer = SemiSupervisedTrainer(
        device="cpu",
        max_epochs=max_iterations // interval,
        train_data_loader=loader,
        networks=nets,
        optimizers=opts,
        loss_terms=[SupervisedTerm(), CrossPseudoTerm()],
        epoch_length=interval,
        train_handlers=handlers,
    )
    save_dict["trainer"] = trainer
    if ckpt_dir is not None:
        CheckpointSaver(str(ckpt_dir), save_dict, save_interval=interval, epoch_level=False).attach(trainer)
    if resume is not None:
        CheckpointLoader(load_path=str(resume), load_dict=save_dict, map_location="cpu").attach(trainer)
    if kill_at is not None:
        trainer.add_event_handler(
            Events.ITERATION_COMPLETED(once=kill_at), lambda e: os.kill(os.getpid(), signal.SIGKILL)
        )
    log = {"iteration": [], "lr": [], "loss": [], "sup": [], "cps": [], "w_cps": []}

    @trainer.on(Events.ITERATION_COMPLETED)
    def record(engine):
        out = loss_summary(engine.state.output)
        log["iteration"].append(engine.state.iteration)
        log["lr"].append(opts[1].param_groups[0]["lr"])
        for k in ("loss", "sup", "cps", "w_cps"):
            log[k].append(out[k])

    return trainer, log, save_dict, evaluator


def test_trainer_wires_monai_handlers_and_logs_every_term(tmp_path, capsys):
    dl = tiny_dataset(tmp_path)
    trainer, log, _, evaluator = build(dl, max_iterations=6, interval=3, validate=True)
    StatsHandler(name="t", output_transform=loss_summary, iteration_log=True).attach(trainer)
    TensorBoardStatsHandler(log_dir=str(tmp_path / "tb"), output_transform=loss_summary).attach(trainer)
    trainer.run()
    assert log["iteration"] == [1, 2, 3, 4, 5, 6]
    # the Gaussian warm-up weight reaches the trainer: w(i) = 0.1 exp(-5 (1 - i/T)^2), i counted from 0
    assert np.allclose(log["w_cps"], [0.1 * np.exp(-5 * (1 - i / 6) ** 2) for i in range(6)])
    assert all(
        np.isclose(lo, s + w * c, rtol=1e-5)
        for lo, s, w, c in zip(log["loss"], log["sup"], log["w_cps"], log["cps"], strict=True)
    )
    # poly decay per iteration, stepped by LrScheduleHandler
    assert np.allclose(log["lr"], [LR * (1 - i / 6) ** 0.9 for i in range(1, 7)])
    text = capsys.readouterr().out + capsys.readouterr().err
    assert "sup: " in text and "cps: " in text and "w_cps: " in text
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(glob.glob(str(tmp_path / "tb" / "events*"))[0])
    acc.Reload()
    assert {"loss", "sup", "cps", "w_cps"} <= set(acc.Tags()["scalars"])
    assert evaluator.state.epoch == 2  # validated after each of the 2 ignite epochs
    assert 0.0 <= evaluator.state.metrics["val_dice"] <= 1.0


def test_training_reduces_loss_and_is_reproducible_by_seed(tmp_path):
    dl = tiny_dataset(tmp_path)
    trainer_a, log_a, *_ = build(dl, max_iterations=12, interval=12)
    trainer_a.run()
    trainer_b, log_b, *_ = build(dl, max_iterations=12, interval=12)
    trainer_b.run()
    assert log_a["loss"] == log_b["loss"]
    assert np.mean(log_a["sup"][-3:]) < np.mean(log_a["sup"][:3])
    trainer_c, log_c, *_ = build(dl, max_iterations=4, interval=4, seed=1)
    trainer_c.run()
    assert log_c["loss"][:4] != log_a["loss"][:4]


def _run_script(args: str, cwd: Path) -> subprocess.CompletedProcess:
    code = f"import sys; sys.path.insert(0, {str(REPO)!r}); from tests.test_trainer import _script; _script({args})"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _script(datalist, ckpt_dir, kill_at=None, resume=None, out=None):
    trainer, log, save_dict, _ = build(
        datalist, max_iterations=8, interval=2, ckpt_dir=ckpt_dir, resume=resume, kill_at=kill_at
    )
    state_at_start = {}

    @trainer.on(Events.STARTED)
    def snapshot(engine):  # runs after CheckpointLoader, which is attached before
        state_at_start.update(iteration=engine.state.iteration, opt1=copy.deepcopy(save_dict["opt1"].state_dict()))

    trainer.run()
    if out:
        torch.save({"log": log, "start": state_at_start}, out)


def test_kill_and_resume_continues_iteration_optimiser_and_scheduler(tmp_path):
    dl = tiny_dataset(tmp_path)
    ckpt = tmp_path / "ckpt"
    killed = _run_script(f"{str(dl)!r}, {str(ckpt)!r}, kill_at=5", tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    files = sorted(os.listdir(ckpt))
    assert [f for f in files if f.endswith(".pt")] == ["checkpoint_iteration=2.pt", "checkpoint_iteration=4.pt"]
    last = ckpt / "checkpoint_iteration=4.pt"
    resumed = _run_script(
        f"{str(dl)!r}, {str(tmp_path / 'ckpt2')!r}, resume={str(last)!r}, out={str(tmp_path / 'r.pt')!r}", tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    res = torch.load(tmp_path / "r.pt", weights_only=False)
    assert res["start"]["iteration"] == 4
    assert res["log"]["iteration"] == [5, 6, 7, 8]
    # the scheduler continued: the same learning rates as an uninterrupted poly schedule
    assert np.allclose(res["log"]["lr"], [LR * (1 - i / 8) ** 0.9 for i in range(5, 9)])
    # the optimiser state (Adam moments, step counts) is the one saved at iteration 4
    saved = torch.load(last, weights_only=False)["opt1"]["state"]
    loaded = res["start"]["opt1"]["state"]
    assert saved.keys() == loaded.keys() and len(saved) > 0
    for k in saved:
        assert torch.equal(saved[k]["exp_avg"], loaded[k]["exp_avg"])
        assert float(saved[k]["step"]) == float(loaded[k]["step"]) == 4.0


def test_tiny_3d_run_with_sliding_window_validation(tmp_path):
    dl = tiny_dataset(tmp_path, n_unlabeled=1, shape=(20, 20, 8))
    trainer, log, _, evaluator = build(dl, max_iterations=2, interval=2, spatial_dims=3, validate=True)
    trainer.run()
    assert log["iteration"] == [1, 2] and all(np.isfinite(log["loss"]))
    assert evaluator.state.epoch == 1 and 0.0 <= evaluator.state.metrics["val_dice"] <= 1.0


def test_trainer_rejects_inconsistent_setups(tmp_path):
    net = FeatureUNet(2, 1, 2, channels=(4, 8))
    opt = torch.optim.AdamW(net.parameters())
    with pytest.raises(ValueError, match="needs 2 students"):
        SemiSupervisedTrainer("cpu", 4, [], [net], [opt], [SupervisedTerm(), CrossPseudoTerm()])
    with pytest.raises(ValueError, match="must be positive"):
        SemiSupervisedTrainer("cpu", 5, [], [net], [opt], [SupervisedTerm()], epoch_length=0)
    with pytest.raises(ValueError, match="unique"):
        SemiSupervisedTrainer("cpu", 4, [], [net], [opt], [SupervisedTerm(), SupervisedTerm()])


def test_student_optimizer_has_a_group_per_student_and_steps_like_one_adamw_each():
    from torch.optim.lr_scheduler import PolynomialLR

    from monai_ssl.engines.optim import student_optimizer

    torch.manual_seed(0)
    nets = [FeatureUNet(2, 1, 2, channels=(4, 8)), FeatureUNet(2, 1, 2, channels=(4, 8))]
    head = torch.nn.Linear(3, 2)
    head.bias.requires_grad_(False)  # frozen parameters are not optimised
    opt = student_optimizer(nets, extra_modules=[head])
    assert [g["lr"] for g in opt.param_groups] == [5e-4, 1e-4, 5e-4]
    assert [len(g["params"]) for g in opt.param_groups[:2]] == [len(list(n.parameters())) for n in nets]
    assert opt.param_groups[2]["params"] == [head.weight] and opt.param_groups[0]["weight_decay"] == 5e-4
    # the same updates as one AdamW per student, under the same poly decay of every group
    twins = [copy.deepcopy(n) for n in nets]
    lrs = (5e-4, 1e-4)
    separate = [torch.optim.AdamW(t.parameters(), lr=lr, weight_decay=5e-4) for t, lr in zip(twins, lrs, strict=True)]
    sched = PolynomialLR(opt, total_iters=10, power=0.9)
    separate_sched = [PolynomialLR(o, total_iters=10, power=0.9) for o in separate]
    x = torch.randn(2, 1, 16, 16)
    for _ in range(3):
        for o in (opt, *separate):
            o.zero_grad()
        (sum(n(x).square().mean() for n in nets) + sum(t(x).square().mean() for t in twins)).backward()
        for o, s in ((opt, sched), *zip(separate, separate_sched, strict=True)):
            o.step()
            s.step()
    for net, twin in zip(nets, twins, strict=True):
        for p, q in zip(net.parameters(), twin.parameters(), strict=True):
            assert torch.equal(p, q)
    assert np.allclose(sched.get_last_lr(), [5e-4 * 0.7**0.9, 1e-4 * 0.7**0.9, 5e-4 * 0.7**0.9])
    with pytest.raises(ValueError, match="learning rates"):
        student_optimizer(nets, lrs=[1e-3])


def test_resumable_checkpoint_handler_flags_and_incompatible_checkpoint(tmp_path):
    from monai_ssl.engines.handlers import ResumableCheckpointHandler, latest_checkpoint

    assert ResumableCheckpointHandler(tmp_path, {}, 2, resume="false").resume is False
    assert ResumableCheckpointHandler(tmp_path, {}, 2, resume="True").resume is True
    with pytest.raises(ValueError, match="boolean"):
        ResumableCheckpointHandler(tmp_path, {}, 2, resume="maybe")
    for it in (2, 10, 4):
        torch.save(
            {"net": FeatureUNet(2, 1, 2, channels=(4, 8)).state_dict()}, tmp_path / f"checkpoint_iteration={it}.pt"
        )
    (tmp_path / "checkpoint_iteration=x.pt").write_text("not ours")
    assert latest_checkpoint(tmp_path).name == "checkpoint_iteration=10.pt"
    trainer = SemiSupervisedTrainer(
        "cpu",
        1,
        [],
        [FeatureUNet(2, 1, 2, channels=(4, 8, 16))],
        [torch.optim.SGD([torch.zeros(1, requires_grad=True)], 0.1)],
        [SupervisedTerm()],
    )
    handler = ResumableCheckpointHandler(tmp_path, {"net": trainer.networks[0]}, 2)
    handler.save_dict["trainer"] = trainer
    with pytest.raises(RuntimeError, match="different configuration"):
        handler.load_latest(trainer)
    # the optimiser state of the earlier one-AdamW-per-student format: refused with the file named, not a KeyError
    net = FeatureUNet(2, 1, 2, channels=(4, 8))
    opt = torch.optim.AdamW(net.parameters())
    old = tmp_path / "old"
    old.mkdir()
    torch.save({"net": net.state_dict(), "optimizer": {"items": [opt.state_dict()]}}, old / "checkpoint_iteration=2.pt")
    handler = ResumableCheckpointHandler(old, {"net": net, "optimizer": opt}, 2)
    with pytest.raises(RuntimeError, match=r"checkpoint_iteration=2\.pt: cannot resume .*different configuration"):
        handler.load_latest(trainer)


def test_resume_refuses_a_checkpoint_of_a_run_with_another_length(tmp_path):
    from monai_ssl.engines.handlers import ResumableCheckpointHandler

    def trainer_of(max_epochs):
        net = FeatureUNet(2, 1, 2, channels=(4, 8))
        opt = torch.optim.SGD(net.parameters(), 0.1)
        return SemiSupervisedTrainer("cpu", max_epochs, [], [net], [opt], [SupervisedTerm()], epoch_length=100)

    old = trainer_of(2)  # a 200-iteration run stopped at iteration 200
    old.state.iteration, old.state.epoch = 200, 2
    torch.save(
        {"net": old.networks[0].state_dict(), "trainer": old.state_dict()}, tmp_path / "checkpoint_iteration=200.pt"
    )
    longer = trainer_of(5)
    handler = ResumableCheckpointHandler(tmp_path, {"net": longer.networks[0]}, 100)
    handler.save_dict["trainer"] = longer
    with pytest.raises(RuntimeError, match="run of 200 iterations and this run asks for 500"):
        handler.load_latest(longer)
    same = trainer_of(2)
    handler = ResumableCheckpointHandler(tmp_path, {"net": same.networks[0]}, 100)
    handler.save_dict["trainer"] = same
    handler.load_latest(same)
    assert same.state.iteration == 200


def test_run_length_is_exactly_max_iterations_with_final_validation(tmp_path):
    """500 iterations with validation every 200 train 500 (not 400 or 600) and validate at 200, 400 and 500."""
    from monai_ssl.engines.handlers import FinalValidationHandler

    dl = tiny_dataset(tmp_path)
    trainer, log, _, _ = build(dl, max_iterations=5, interval=2)
    # build() passes max_epochs=5 // 2 = 2; the exact length comes from max_iterations
    trainer = SemiSupervisedTrainer(
        "cpu",
        max_epochs=1,
        train_data_loader=trainer.data_loader,
        networks=trainer.networks,
        optimizers=trainer.optimizers,
        loss_terms=list(trainer.loss_terms),
        epoch_length=2,
        max_iterations=5,
    )
    validated = []
    handler = FinalValidationHandler(interval=2, epoch_level=False)
    handler.validator = type(
        "Recorder", (), {"run": lambda self, epoch=None: validated.append(trainer.state.iteration)}
    )()
    handler.attach(trainer)
    iterations = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: iterations.append(e.state.iteration))
    trainer.run()
    assert iterations == [1, 2, 3, 4, 5] and trainer.max_iterations == 5
    assert validated == [2, 4, 5]
    with pytest.raises(ValueError, match="max_iterations"):
        SemiSupervisedTrainer("cpu", 1, [], list(trainer.networks), trainer.optimizers, [SupervisedTerm()],
                              max_iterations=0)  # fmt: skip


def test_resume_compares_the_exact_run_length(tmp_path):
    """A 500-iteration run's checkpoint (3 epochs of 200) is refused by a 600-iteration run (also 3 x 200)."""
    from monai_ssl.engines.handlers import ResumableCheckpointHandler

    def trainer_of(n):
        net = FeatureUNet(2, 1, 2, channels=(4, 8))
        opt = torch.optim.SGD(net.parameters(), 0.1)
        return SemiSupervisedTrainer("cpu", 1, [], [net], [opt], [SupervisedTerm()], epoch_length=200, max_iterations=n)

    old = trainer_of(500)
    old.state.iteration, old.state.epoch = 200, 1
    saver = ResumableCheckpointHandler(tmp_path, {"net": old.networks[0]}, 200)
    saver.attach(old)
    torch.save({k: v.state_dict() for k, v in saver.save_dict.items()}, tmp_path / "checkpoint_iteration=200.pt")
    longer = trainer_of(600)
    handler = ResumableCheckpointHandler(tmp_path, {"net": longer.networks[0]}, 200, save=False)
    handler.attach(longer)
    with pytest.raises(RuntimeError, match="run of 500 iterations and this run asks for 600"):
        handler.load_latest(longer)
    same = trainer_of(500)
    handler = ResumableCheckpointHandler(tmp_path, {"net": same.networks[0]}, 200, save=False)
    handler.attach(same)
    handler.load_latest(same)
    assert same.state.iteration == 200


def test_amp_means_bf16_autocast_only_on_a_cpu_with_native_bf16(tmp_path, monkeypatch):
    import monai_ssl.engines.trainer as trainer_module
    from monai_ssl.losses.terms import LossTerm

    monkeypatch.setattr(trainer_module, "cpu_supports_bf16", lambda: False)
    assert trainer_module.autocast_mode(True, "cpu") is None
    assert trainer_module.autocast_mode(False, "cpu") is None
    monkeypatch.setattr(trainer_module, "cpu_supports_bf16", lambda: True)
    assert trainer_module.autocast_mode(True, "cpu") == "cpu_bf16"
    assert trainer_module.autocast_mode(False, "cpu") is None

    class DtypeProbe(LossTerm):
        """Records the dtype the students' logits reach the loss terms with, and of the first conv's output."""

        seen: list = []

        def forward(self, ctx):
            self.seen.append(ctx.logits_l[0].dtype)
            return ctx.logits_l[0].float().mean() * 0

    dl = tiny_dataset(tmp_path)
    lab, _ = training_datasets(dl, (16, 16), pixdim=(-1, -1, -1))
    net = FeatureUNet(2, 1, 3, channels=(4, 8, 16), num_res_units=1)
    conv_dtypes = []
    first_conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    first_conv.register_forward_hook(lambda m, i, o: conv_dtypes.append(o.dtype))
    trainer = SemiSupervisedTrainer(
        "cpu", 1, SemiSupervisedLoader(lab, None, batch_size=2), [net], [torch.optim.AdamW(net.parameters())],
        [SupervisedTerm(), DtypeProbe(name="probe")], epoch_length=2, amp=True,
    )  # fmt: skip
    assert trainer.precision == "cpu_bf16" and not trainer.amp  # no CUDA grad scaler
    trainer.run()
    assert conv_dtypes == [torch.bfloat16] * 2 and DtypeProbe.seen == [torch.float32] * 2
    assert next(net.parameters()).dtype == torch.float32  # master weights stay float32


def test_terms_are_bound_once_and_unstepped_term_parameters_are_refused():
    from monai_ssl.losses.infonce import InfoNCETerm
    from monai_ssl.losses.teacher import MeanTeacherTerm
    from monai_ssl.losses.terms import bind_terms

    nets = [FeatureUNet(2, 1, 2, channels=(4, 8, 16), num_res_units=1)]
    mt = MeanTeacherTerm()
    assert mt.teacher is None
    bind_terms([mt], nets)
    teacher = mt.teacher
    assert torch.equal(next(teacher.model.parameters()), next(nets[0].parameters()))  # copied from its student
    bind_terms([mt], nets)
    assert mt.teacher is teacher  # a second binding keeps the teacher (and its EMA state)
    opt = torch.optim.AdamW(nets[0].parameters())
    trainer = SemiSupervisedTrainer("cpu", 1, [], nets, opt, [SupervisedTerm(), mt])
    assert trainer.loss_terms[1].teacher is teacher
    with pytest.raises(ValueError, match="'infonce' has trainable parameters no optimiser steps"):
        SemiSupervisedTrainer("cpu", 1, [], nets, opt, [SupervisedTerm(), InfoNCETerm(hidden=4, out=2)])
    with pytest.raises(ValueError, match="student 1 out of range for 1 students"):
        bind_terms([MeanTeacherTerm(student=1)], nets)
