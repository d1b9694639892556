"""Training handlers: resumable checkpoints (save every N iterations, resume from the newest), validation every N
iterations and at the run's end, and gradient averaging across processes for multi-GPU training."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.handlers import CheckpointLoader, CheckpointSaver, ValidationHandler

__all__ = ["ResumableCheckpointHandler", "GradientAllReduce", "FinalValidationHandler", "latest_checkpoint"]

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


def _flag(value: bool | str) -> bool:
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

    The saved dict is ``save_dict`` plus the trainer itself (added when attached, so configs need no
    circular reference to the trainer). Saving is MONAI's ``CheckpointSaver`` (atomic files, ``n_saved``
    kept), loading MONAI's ``CheckpointLoader``. A killed run resumes by running the same command again:
    networks, optimisers, schedulers and the iteration counter come back. With no checkpoint, or
    ``resume=False``, training starts from scratch.
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
        self.resume, self.n_saved, self.save = _flag(resume), n_saved, _flag(save)

    def attach(self, engine: Engine) -> None:
        self.save_dict["trainer"] = engine
        self.save_dict["run_length"] = _RunLength(engine)
        if self.save:  # in multi-GPU runs only rank 0 saves; every rank resumes
            CheckpointSaver(
                str(self.ckpt_dir), self.save_dict, save_interval=self.interval, epoch_level=False, n_saved=self.n_saved
            ).attach(engine)
        engine.add_event_handler(Events.STARTED, self.load_latest)

    def load_latest(self, engine: Engine) -> None:
        path = latest_checkpoint(self.ckpt_dir) if self.resume else None
        if path is None:
            logger.info("no checkpoint to resume from in %s: training from scratch", self.ckpt_dir)
            return
        logger.info("resuming from %s", path)
        self._check_length(path, engine)
        try:
            CheckpointLoader(load_path=str(path), load_dict=self.save_dict, map_location=engine.state.device)(engine)
        except (RuntimeError, ValueError) as e:  # ValueError: an entry of this run is not in the checkpoint
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


class FinalValidationHandler(ValidationHandler):
    """MONAI's ``ValidationHandler`` every ``interval`` iterations, plus once at the end of a run whose length is
    not a multiple of the interval, so the final model is always validated (and can become ``model.pt``)."""

    def attach(self, engine: Engine) -> None:
        super().attach(engine)
        engine.add_event_handler(Events.COMPLETED, self._final)

    def _final(self, engine: Engine) -> None:
        if engine.state.iteration % self.interval:
            self(engine)


class GradientAllReduce:
    """Average the students' gradients over all processes after each backward pass (multi-GPU training).

    The trainer calls ``forward_features`` as well as ``forward``, which ``DistributedDataParallel`` does not
    see, so gradients are synchronised explicitly here, at ``BACKWARD_COMPLETED`` and before the optimiser
    steps. Every process holds identical weights as long as they start identical (rank 0's initial weights
    are broadcast at ``STARTED``).
    """

    def __init__(self, modules: Any):
        self.modules = list(modules)

    def attach(self, engine: Engine) -> None:
        from monai.engines.utils import IterationEvents

        engine.add_event_handler(Events.STARTED, self.broadcast)
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self.all_reduce)

    def _params(self):
        return [p for m in self.modules for p in m.parameters()]

    def broadcast(self, engine: Engine) -> None:
        import torch.distributed as dist

        for p in self._params():
            dist.broadcast(p.data, src=0)

    def all_reduce(self, engine: Engine) -> None:
        import torch.distributed as dist

        world = dist.get_world_size()
        for p in self._params():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= world
