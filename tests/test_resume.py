"""Resume after ``kill -9``: the bundle's training killed at a random iteration and run again ends with exactly the
weights of an uninterrupted run, leaves one resumable checkpoint, and never replaces ``model.pt`` by a worse model."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.handlers import CheckpointSaver

from monai_ssl.engines.handlers import BestMetricState
from tests.test_bundle import CONFIGS, REPO, TINY
from tests.test_trainer import tiny_dataset

ITERATIONS, INTERVAL = 7, 2


def _train(out: Path, data: Path, extra: list[str] = ()) -> subprocess.CompletedProcess:
    files = [str(CONFIGS / "train.json"), str(CONFIGS / "methods" / "cts.json"), *extra]
    args = {**TINY, "dataset_dir": str(data), "output_root": str(out), "max_iterations": ITERATIONS}
    args["val_interval"] = INTERVAL
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", json.dumps(files)]
    for key, value in args.items():
        cmd += [f"--{key}", json.dumps(value) if not isinstance(value, str) else value]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_kill_9_then_rerun_gives_the_uninterrupted_weights(tmp_path):
    data = tmp_path / "data"
    tiny_dataset(data)
    kill_at = int(np.random.default_rng().integers(INTERVAL + 1, ITERATIONS))  # a random iteration past a checkpoint
    killer = tmp_path / "kill.json"
    hook = {"_target_": "tests.resume_hooks.KillAt", "iteration": kill_at}
    killer.write_text(json.dumps({"+train#handlers": [hook]}))

    first = _train(tmp_path / "killed", data, [str(killer)])
    assert first.returncode == -9, first.stderr[-2000:]
    models = tmp_path / "killed" / "cts" / "models"
    before = sorted(p.name for p in models.glob("checkpoint_iteration=*.pt"))
    assert before == [f"checkpoint_iteration={kill_at // INTERVAL * INTERVAL}.pt"]  # older ones already removed
    saved = torch.load(models / before[0], map_location="cpu", weights_only=True)
    assert {"random_state", "grad_scaler", "best", "run_length"} <= set(saved)
    (best,) = saved["best"]["saved"]  # the score model.pt was saved with, the best so far
    assert best[0] == saved["best"]["best_metric"] > 0

    again = _train(tmp_path / "killed", data)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming from" in again.stderr + again.stdout
    reference = _train(tmp_path / "straight", data)
    assert reference.returncode == 0, reference.stderr[-2000:]

    resumed = torch.load(models / "model_final.pt", map_location="cpu", weights_only=True)
    straight = torch.load(tmp_path / "straight" / "cts" / "models" / "model_final.pt", map_location="cpu",
                          weights_only=True)  # fmt: skip
    assert resumed.keys() == straight.keys()
    for key in straight:
        assert torch.equal(resumed[key], straight[key]), key
    last = (ITERATIONS // INTERVAL) * INTERVAL
    assert sorted(p.name for p in models.glob("checkpoint_iteration=*.pt")) == [f"checkpoint_iteration={last}.pt"]


def test_best_metric_state_keeps_a_better_model_pt_across_a_restart(tmp_path):
    """The key-metric saver of a resumed run overwrites model.pt only with a better score than before the kill."""
    net = torch.nn.Linear(2, 2)

    def evaluator_with(score: float):
        ev = Engine(lambda e, b: None)

        @ev.on(Events.EPOCH_COMPLETED)
        def _metric(engine):
            engine.state.metrics["val_mean_dice"] = score
            engine.state.best_metric = max(getattr(engine.state, "best_metric", -1), score)
            engine.state.best_metric_epoch = engine.state.epoch

        ev.state.best_metric, ev.state.best_metric_epoch = -1, -1
        saver = CheckpointSaver(
            str(tmp_path),
            {"model": net},
            save_key_metric=True,
            key_metric_name="val_mean_dice",
            key_metric_filename="model.pt",
        )
        saver.attach(ev)
        return ev, saver

    ev, saver = evaluator_with(0.8)
    net.weight.data.fill_(1.0)
    ev.run([0])
    state = BestMetricState(ev, saver).state_dict()
    assert state["best_metric"] == 0.8 and [p for p, _ in state["saved"]] == [0.8]
    for score, kept in ((0.5, 1.0), (0.9, 2.0)):  # a restarted process: fresh evaluator and saver, state loaded
        ev, saver = evaluator_with(score)
        BestMetricState(ev, saver).load_state_dict(state)
        net.weight.data.fill_(2.0)
        ev.run([0])
        assert torch.load(tmp_path / "model.pt", weights_only=True)["weight"][0, 0].item() == kept
