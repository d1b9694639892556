"""Training handlers: resumable checkpoints (save every N iterations, resume from the newest), validation every N
iterations and at the run's end, and gradient averaging across processes for multi-GPU training."""

from __future__ import annotations

import logging
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.handlers import CheckpointLoader, CheckpointSaver, ValidationHandler

__all__ = [
    "ResumableCheckpointHandler",
    "GradientAllReduce",
    "FinalValidationHandler",
    "BestMetricState",
    "ModelLoader",
    "ProgressBar",
    "ValidationScalars",
    "close_summary_writers",
    "flag",
    "latest_checkpoint",
    "summary_writer",
]

logger = logging.getLogger(__name__)


def latest_checkpoint(ckpt_dir: str | os.PathLike, prefix: str = "checkpoint_iteration=") -> Path | None:
    """The checkpoint with the highest iteration number in ``ckpt_dir`` (``CheckpointSaver`` naming), or None."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return None
    found = []
    for path in ckpt_dir.glob(f"{prefix}*.pt"):
        match = re.fullmatch(re.escape(prefix) + r"(\d+)\.pt", path.name)
        if match:
            found.append((int(match.group(1)), path))
    return max(found)[1] if found else None


def flag(value: bool | str) -> bool:
    """Booleans from configs and command lines (``--resume false`` arrives as the string ``"false"``)."""
    if isinstance(value, str):
        if value.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if value.strip().lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {value!r}")
    return bool(value)


class ResumableCheckpointHandler:
    """Save resumable checkpoints every ``interval`` iterations, and resume from the newest one at start.

    The saved dict is ``save_dict`` (networks, loss terms, optimisers, schedulers and, in the bundle, the best
    validation score: :class:`BestMetricState`) plus what this handler adds when attached: the trainer (its
    iteration), the run's length, the AMP grad scaler and the global random states (torch, numpy, python: dropout,
    drop-path, random masks). Saving is MONAI's ``CheckpointSaver`` (atomic files), loading MONAI's
    ``CheckpointLoader``. Once a new checkpoint is safely written, every older ``checkpoint_iteration=*.pt`` in
    the folder is removed, including those of earlier, killed processes: one resumable checkpoint on disk. A
    killed run resumes by running the same command again, and with the training data drawn per iteration
    (:class:`~monai_ssl.data.slices.SemiSupervisedLoader`) a deterministic CPU run ends with the same weights as
    an uninterrupted one. With no checkpoint, or ``resume=False``, training starts from scratch.
    """

    def __init__(
        self,
        ckpt_dir: str | os.PathLike,
        save_dict: dict[str, Any],
        interval: int,
        resume: bool = True,
        n_saved: int = 1,
        save: bool = True,
    ):
        self.ckpt_dir, self.save_dict, self.interval = Path(ckpt_dir), dict(save_dict), int(interval)
        self.resume, self.n_saved, self.save = flag(resume), n_saved, flag(save)

    def attach(self, engine: Engine) -> None:
        self.save_dict["trainer"] = engine
        self.save_dict["run_length"] = _RunLength(engine)
        self.save_dict["grad_scaler"] = _ScalerState(engine)
        self.save_dict["random_state"] = _RandomState()
        if self.save:  # in multi-GPU runs only rank 0 saves; every rank resumes
            CheckpointSaver(
                str(self.ckpt_dir), self.save_dict, save_interval=self.interval, epoch_level=False, n_saved=self.n_saved
            ).attach(engine)
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.interval), self.remove_older)
        engine.add_event_handler(Events.STARTED, self.load_latest)

    def remove_older(self, engine: Engine) -> None:
        """Remove resumable checkpoints older than the one just written (runs after the saver's handler)."""
        newest = latest_checkpoint(self.ckpt_dir)
        if newest is None:
            return
        for path in self.ckpt_dir.glob("checkpoint_iteration=*.pt"):
            if path != newest:
                path.unlink(missing_ok=True)
                logger.info("removed the older checkpoint %s", path)

    def load_latest(self, engine: Engine) -> None:
        path = latest_checkpoint(self.ckpt_dir) if self.resume else None
        if path is None:
            logger.info("no checkpoint to resume from in %s: training from scratch", self.ckpt_dir)
            return
        logger.info("resuming from %s", path)
        self._check_length(path, engine)
        saved = set(torch.load(path, map_location="cpu", weights_only=True))
        optional = {"grad_scaler", "random_state", "best"}
        load = {k: v for k, v in self.save_dict.items() if k in saved or k not in optional}
        absent = sorted(set(self.save_dict) - set(load))
        if absent:  # a checkpoint of an earlier version: resumable, less exactly
            logger.warning("%s has no %s: resuming without them", path, ", ".join(absent))
        try:
            CheckpointLoader(load_path=str(path), load_dict=load, map_location=engine.state.device)(engine)
        except (RuntimeError, ValueError, KeyError) as e:  # an entry missing, or saved in another format
            raise RuntimeError(
                f"{path}: cannot resume from this checkpoint, it was written by a different configuration "
                f"({str(e).splitlines()[0]}). Use another output folder or pass --resume False to start afresh."
            ) from e

    @staticmethod
    def _check_length(path: Path, engine: Engine) -> None:
        """Refuse a checkpoint of a run with another length: its schedules (learning rate, loss weights) would
        not continue this run's, e.g. a 200-iteration run's learning rate is already 0 at iteration 200."""
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        saved = checkpoint.get("trainer")
        if not saved or "max_epochs" not in saved or "epoch_length" not in saved:
            return
        recorded = checkpoint.get("run_length", {}).get("max_iterations")
        before = int(recorded or int(saved["max_epochs"]) * int(saved["epoch_length"]))
        now = int(getattr(engine, "max_iterations", engine.state.max_epochs * engine.state.epoch_length))
        if before != now:
            raise RuntimeError(
                f"{path}: cannot resume, this checkpoint belongs to a run of {before} iterations and this run asks "
                f"for {now}; the learning-rate and loss-weight schedules depend on the run's length. Use another "
                "output folder or pass --resume False to start afresh."
            )


class _RunLength:
    """The run's exact length in its checkpoints (ignite's own state has only ``max_epochs * epoch_length``)."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def state_dict(self) -> dict[str, int]:
        return {"max_iterations": int(getattr(self.engine, "max_iterations", 0))}

    def load_state_dict(self, state: dict[str, int]) -> None:  # checked before loading, see _check_length
        pass


def _modules_of(keys) -> str:
    """``networks.0.encoder...`` keys -> ``student 0: encoder, decoder; student 1: patch_embed, layers``."""
    parts: dict[str, list[str]] = {}
    for key in keys:
        bits = key.split(".")
        if bits[0] == "networks" and len(bits) > 2:
            names = parts.setdefault(f"student {bits[1]}", [])
            if bits[2] not in names:
                names.append(bits[2])
    return "; ".join(f"{who}: {', '.join(names[:4])}" for who, names in parts.items()) or "no students"


class ModelLoader:
    """Load ``model`` weights from ``load_path`` when the engine starts (evaluation, inference), with errors that
    name the file and say what is wrong: missing, corrupt or truncated, or written by another method or network
    (which modules each student has there and here). Never suggests ``weights_only=False``: checkpoints hold
    tensors only."""

    def __init__(self, load_path: str | os.PathLike, network: torch.nn.Module, map_location: Any = "cpu"):
        self.load_path, self.network, self.map_location = Path(load_path), network, map_location

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda _e: self.load())

    def load(self) -> None:
        from monai_ssl.data.validation import InputError

        path = self.load_path
        if not path.is_file():
            raise InputError(f"{path}: checkpoint not found (train first, or pass the model's folder: --output_root)")
        try:
            state = torch.load(path, map_location=self.map_location, weights_only=True)
        except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError... for broken files
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            if "weights_only" in reason or "Unpickl" in type(e).__name__:
                reason = "it holds more than tensors (not a monai-ssl checkpoint)"
            raise InputError(f"{path}: not a readable checkpoint, corrupt or truncated ({reason})") from None
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]  # a resumable checkpoint
        if not isinstance(state, dict):
            raise InputError(f"{path}: not a model checkpoint (holds a {type(state).__name__})")
        expected = self.network.state_dict()
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
        if missing or unexpected or wrong:
            detail = f"{len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} of other shapes"
            if wrong and not (missing or unexpected):
                k = wrong[0]
                detail += f" (e.g. {k}: {tuple(state[k].shape)} there, {tuple(expected[k].shape)} here)"
            raise InputError(
                f"{path}: this checkpoint belongs to another method or network ({detail}); it holds "
                f"[{_modules_of(state)}], this configuration builds [{_modules_of(expected)}]. Use the method file "
                "(and num_classes, context) it was trained with."
            )
        self.network.load_state_dict(state)


class _ScalerState:
    """The trainer's AMP grad scaler (created when the run starts, so looked up late); empty without AMP."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def state_dict(self) -> dict[str, Any]:
        scaler = getattr(self.engine, "scaler", None)
        return scaler.state_dict() if scaler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        scaler = getattr(self.engine, "scaler", None)
        if scaler is not None and state:
            scaler.load_state_dict(state)


class _RandomState:
    """Global random states of torch (CPU and CUDA), numpy and python, as plain tensors and lists (loadable with
    ``weights_only=True``)."""

    def state_dict(self) -> dict[str, Any]:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()  # noqa: NPY002 (the legacy global state itself)
        version, internal, gauss_next = random.getstate()
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [kind, torch.as_tensor(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
            "python": [version, list(internal), gauss_next],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"].cpu())
        if state.get("cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))  # noqa: NPY002
        version, internal, gauss_next = state["python"]
        random.setstate((version, tuple(internal), gauss_next))


class BestMetricState:
    """The best validation score so far, in the resumable checkpoint: the evaluator's ``best_metric`` and the
    record of MONAI's key-metric ``CheckpointSaver`` (``model.pt``), so a resumed run replaces ``model.pt`` only
    with a better model."""

    def __init__(self, evaluator: Engine, saver: CheckpointSaver):
        if getattr(saver, "_key_metric_checkpoint", None) is None:
            raise ValueError("BestMetricState needs a CheckpointSaver with save_key_metric=True")
        self.evaluator, self.saver = evaluator, saver

    def state_dict(self) -> dict[str, Any]:
        saved = self.saver._key_metric_checkpoint.state_dict()["_saved"]
        return {
            "best_metric": float(self.evaluator.state.best_metric),
            "best_metric_epoch": int(self.evaluator.state.best_metric_epoch),
            "saved": [[float(priority), str(name)] for priority, name in saved],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.evaluator.state.best_metric = state["best_metric"]
        self.evaluator.state.best_metric_epoch = state["best_metric_epoch"]
        self.saver._key_metric_checkpoint.load_state_dict({"_saved": [tuple(item) for item in state["saved"]]})


class FinalValidationHandler(ValidationHandler):
    """MONAI's ``ValidationHandler`` every ``interval`` iterations, plus once at the end of a run whose length is
    not a multiple of the interval, so the final model is always validated (and can become ``model.pt``).

    The evaluator runs as "epoch" = the trainer's **iteration**, so every epoch-level log of the evaluator (MONAI's
    ``StatsHandler`` / ``TensorBoardStatsHandler``, ``best_metric_epoch``) is at the true training iteration and
    lines up with the training curves."""

    def attach(self, engine: Engine) -> None:
        super().attach(engine)
        engine.add_event_handler(Events.COMPLETED, self._final)

    def __call__(self, engine: Engine) -> None:
        if self.validator is None:
            raise RuntimeError("FinalValidationHandler has no validator")
        self.validator.run(engine.state.iteration)

    def _final(self, engine: Engine) -> None:
        if engine.state.iteration % self.interval:
            self(engine)


class ProgressBar:
    """A tqdm bar over a whole run with rate and ETA: training iterations (resumed runs start where they left
    off; the loss in the postfix) or an evaluator's cases. Chunked ignite epochs make ignite's own bar restart
    at every validation interval, hence this one."""

    def __init__(self, desc: str = "training", unit: str = "it", enabled: bool | str = True):
        self.desc, self.unit, self.enabled = desc, unit, flag(enabled)
        self.bar = None

    def attach(self, engine: Engine) -> None:
        if not self.enabled:
            return
        engine.add_event_handler(Events.STARTED, self._open)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._step)
        engine.add_event_handler(Events.COMPLETED, self._close)

    def _open(self, engine: Engine) -> None:
        from tqdm.auto import tqdm

        total = getattr(engine, "max_iterations", None) or engine.state.epoch_length
        start = engine.state.iteration if hasattr(engine, "max_iterations") else 0
        self.bar = tqdm(total=total, initial=start, desc=self.desc, unit=self.unit, dynamic_ncols=True)

    def _step(self, engine: Engine) -> None:
        if self.bar is None:
            return
        self.bar.update()
        output = engine.state.output
        if isinstance(output, dict) and "loss" in output:
            self.bar.set_postfix(loss=f"{float(output['loss']):.4f}", refresh=False)

    def _close(self, engine: Engine) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class _NoWriter:
    """Stands in for a ``SummaryWriter`` on processes other than rank 0: logs nothing, writes no file."""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


_WRITERS: dict[str, Any] = {}


def summary_writer(log_dir: str | os.PathLike) -> Any:
    """One TensorBoard ``SummaryWriter`` per folder, shared by all of a run's handlers (one events file); on
    processes other than rank 0 of a distributed run a writer that writes nothing (no empty files in rank 0's
    folder). :func:`close_summary_writers` flushes and closes them (the bundles' ``finalize``)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_rank() > 0:
        return _NoWriter()
    key = str(Path(log_dir).resolve())
    if key not in _WRITERS:
        from torch.utils.tensorboard import SummaryWriter

        _WRITERS[key] = SummaryWriter(log_dir=key, flush_secs=10)
    return _WRITERS[key]


def close_summary_writers() -> None:
    """Flush and close every writer :func:`summary_writer` opened (the bundles' ``finalize`` step)."""
    while _WRITERS:
        _WRITERS.popitem()[1].close()


class ValidationScalars:
    """Per-class validation Dice and the validation's wall seconds, to TensorBoard at the training iteration
    (the evaluator's epoch, see :class:`FinalValidationHandler`) and to the log: ``val_dice/<class>``,
    ``val_seconds``. ``metric`` is a per-class metric of the evaluator (MONAI ``MeanDice(reduction="mean_batch")``).
    """

    def __init__(self, summary_writer: Any, class_names: list[str], metric: str = "val_class_dice"):
        self.writer, self.class_names, self.metric = summary_writer, list(class_names), metric

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        step = engine.state.epoch
        values = engine.state.metrics.get(self.metric)
        seconds = float(engine.state.times.get(Events.EPOCH_COMPLETED.name) or 0.0)
        self.writer.add_scalar("val_seconds", seconds, step)
        parts = []
        if values is not None:
            values = torch.as_tensor(values).flatten().tolist()
            names = self.class_names[-len(values) :]  # the foreground classes when background is excluded
            for name, value in zip(names, values, strict=True):
                self.writer.add_scalar(f"val_dice/{name}", value, step)
                parts.append(f"{name} {value:.3f}")
        self.writer.flush()
        logger.info("validation at iteration %d took %.1f s; Dice per class: %s", step, seconds, ", ".join(parts))


class GradientAllReduce:
    """Keep every trainable module identical across processes (multi-GPU training): the students and the loss
    terms' own modules (projectors, InfoNCE heads, denoisers).

    The trainer calls ``forward_features`` as well as ``forward``, which ``DistributedDataParallel`` does not see,
    so gradients are synchronised here, at ``BACKWARD_COMPLETED`` and before the optimiser steps, in one bucketed
    all-reduce over all parameters that require gradients (a missing gradient counts as zero, so every process
    joins the same collective). Parameters shared by reference (a term holding the students) are reduced once.
    Rank 0's parameters and buffers are broadcast at ``STARTED``, and the students' buffers (batch-norm
    statistics) after every step, as ``DistributedDataParallel`` does; loss terms' buffers (memory banks) stay
    per process.
    """

    def __init__(self, modules: Any, students: Any = ()):
        self.modules, self.students = list(modules), list(students)

    def attach(self, engine: Engine) -> None:
        from monai.engines.utils import IterationEvents

        engine.add_event_handler(Events.STARTED, self.broadcast)
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self.all_reduce)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.broadcast_buffers)

    @staticmethod
    def _unique(tensors) -> list[torch.Tensor]:
        seen, out = set(), []
        for t in tensors:
            if id(t) not in seen:
                seen.add(id(t))
                out.append(t)
        return out

    def parameters(self) -> list[torch.Tensor]:
        return self._unique(p for m in self.modules for p in m.parameters() if p.requires_grad)

    def broadcast(self, engine: Engine) -> None:
        import torch.distributed as dist

        for t in self._unique([*(p for m in self.modules for p in m.parameters()), *self._buffers(self.modules)]):
            dist.broadcast(t.data, src=0)

    @staticmethod
    def _buffers(modules) -> list[torch.Tensor]:
        return [b for m in modules for b in m.buffers() if b.is_floating_point() or b.dtype == torch.long]

    def broadcast_buffers(self, engine: Engine) -> None:
        import torch.distributed as dist

        for b in self._unique(self._buffers(self.students)):
            dist.broadcast(b.data, src=0)

    def all_reduce(self, engine: Engine) -> None:
        import torch.distributed as dist

        params = self.parameters()
        if not params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        offset = 0
        for p, g in zip(params, grads, strict=True):
            n = g.numel()
            p.grad = flat[offset : offset + n].view_as(p).clone()
            offset += n
