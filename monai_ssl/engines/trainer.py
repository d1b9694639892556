"""One MONAI/ignite trainer for every semi-supervised method: one or two students, pluggable loss terms.

Each iteration takes a mixed batch ``{"labeled": ..., "unlabeled": ...}`` (see
:class:`monai_ssl.data.slices.SemiSupervisedLoader`), runs every student once on the concatenated slices,
evaluates the loss terms on a shared :class:`~monai_ssl.losses.terms.StepContext`, and steps every
optimiser. Training is counted in iterations; an ignite "epoch" is just ``epoch_length`` of them (the
validation / checkpoint interval), and the run stops after exactly ``max_iterations`` (default
``max_epochs * epoch_length``), also when that is not a multiple of the interval.

Mixed precision (``amp=True``): CUDA autocast (float16 with a grad scaler) on a GPU; on a CPU with native
bfloat16 (AMX or AVX512-BF16) ``torch.autocast("cpu", dtype=torch.bfloat16)`` with channels-last 2D students;
off elsewhere and when ``amp=False``. Autocast covers the students' forward passes only: their outputs are cast
to float32 and the loss terms (memory banks, projectors, teachers) run in float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from functools import cache
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from ignite.engine import Events
from monai.engines import Trainer
from monai.engines.utils import IterationEvents
from monai.utils.enums import CommonKeys as Keys
from torch.optim import Optimizer

from monai_ssl.losses.terms import LossTerm, StepContext, bind_terms

__all__ = ["SemiSupervisedTrainer", "prepare_mixed_batch", "loss_summary", "cpu_supports_bf16", "autocast_mode"]

TERMS_KEY = "terms"
WEIGHTS_KEY = "weights"
LR_KEY = "learning_rates"
DIAGNOSTICS_KEY = "diagnostics"


def _to_device(value: Any, device: torch.device | str, non_blocking: bool) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=non_blocking)
    if isinstance(value, Mapping):
        return {k: _to_device(v, device, non_blocking) for k, v in value.items()}
    return value


def prepare_mixed_batch(
    batchdata: Mapping[str, Any], device: torch.device | str | None = None, non_blocking: bool = False, **kwargs
) -> dict[str, Any]:
    """Move every tensor of a mixed batch to ``device``; keep strings and lists as they are."""
    if not isinstance(batchdata, Mapping) or "labeled" not in batchdata:
        raise ValueError('a semi-supervised batch must be a dict with a "labeled" entry (and optionally "unlabeled")')
    return _to_device(batchdata, device or "cpu", non_blocking)


@cache
def cpu_supports_bf16() -> bool:
    """True when this CPU computes bfloat16 natively (AMX tiles or AVX512-BF16), where bf16 autocast pays off;
    emulated bf16 on other CPUs is slower than float32. Uses torch's CPU feature probes, else ``/proc/cpuinfo``."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    if any(callable(p) for p in probes):
        return any(bool(p()) for p in probes if callable(p))
    info = Path("/proc/cpuinfo")
    flags = info.read_text() if info.exists() else ""
    return "amx_bf16" in flags or "avx512_bf16" in flags


def autocast_mode(amp: bool | str, device: torch.device | str) -> str | None:
    """Which mixed precision ``amp`` means on ``device``: ``"cuda"`` (float16 + grad scaler), ``"cpu_bf16"``, or
    None (float32): the one rule shared by training and the speed benchmark. ``amp="bf16"`` forces bfloat16 on a
    CPU even without native support (to measure it)."""
    if isinstance(amp, str) and amp.lower() == "bf16" and torch.device(device).type == "cpu":
        return "cpu_bf16"
    if not amp or (isinstance(amp, str) and amp.lower() in ("0", "false", "no", "off")):
        return None
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        return "cuda"
    if torch.device(device).type == "cpu" and cpu_supports_bf16():
        return "cpu_bf16"
    return None


def loss_summary(output: Mapping[str, Any]) -> dict[str, float]:
    """Flatten the trainer output for ``StatsHandler`` / ``TensorBoardStatsHandler``: total loss, every term
    (unweighted), every term's current weight (``w_<name>``), the learning rate of every optimiser
    (``lr_<i>``, in the order of the trainer's optimisers) and the terms' diagnostics (``<term>/<stat>``,
    :meth:`~monai_ssl.losses.terms.LossTerm.report`)."""
    out = {"loss": float(output[Keys.LOSS])}
    out.update({k: float(v) for k, v in output.get(TERMS_KEY, {}).items()})
    out.update({f"w_{k}": float(v) for k, v in output.get(WEIGHTS_KEY, {}).items()})
    out.update({k: float(v) for k, v in output.get(LR_KEY, {}).items()})
    out.update({k: float(v) for k, v in output.get(DIAGNOSTICS_KEY, {}).items()})
    return out


class SemiSupervisedTrainer(Trainer):
    """Semi-supervised trainer over one or two students (UNet-LS, CPS, CTS, CCT-R... as configurations).

    Args:
        device: torch device.
        max_epochs: number of ignite epochs; training runs ``max_epochs * epoch_length`` iterations.
        train_data_loader: iterable of mixed batches (endless is fine).
        networks: the students; each needs ``forward`` and, for feature terms, ``forward_features``.
        optimizers: the optimiser(s) stepped every iteration (the bundles: one AdamW with a parameter group per
            student plus one for the loss terms' own parameters such as contrastive projectors; see
            :func:`~monai_ssl.engines.optim.student_optimizer`).
        loss_terms: the :class:`LossTerm` list that defines the method. Terms not yet bound are bound to
            ``networks`` here (:func:`~monai_ssl.losses.terms.bind_terms`); a term whose binding creates trainable
            parameters must be bound before the optimiser is built, or the trainer refuses it.
        epoch_length: iterations per ignite epoch (the validation / checkpoint interval).
        max_iterations: the run's exact length (default ``max_epochs * epoch_length``); with it, ``max_epochs``
            becomes ``ceil(max_iterations / epoch_length)`` and the run stops at ``max_iterations``.
        prepare_batch: moves a batch to the device.
        train_handlers: MONAI/ignite handlers (StatsHandler, ValidationHandler, CheckpointSaver, ...).
        amp: mixed precision: CUDA autocast on a GPU, bfloat16 autocast on a CPU that supports it natively,
            otherwise off (see :func:`autocast_mode`).
        grad_clip: optional max gradient norm per student.
        key_train_metric, additional_metrics, postprocessing, decollate, event_names, to_kwargs, amp_kwargs:
            as in :class:`monai.engines.Trainer`. ``decollate`` defaults to False because outputs are scalars.

    ``engine.state.output`` holds ``image``/``label``/``pred`` (labelled slices; ``pred`` is the students'
    mean logits), ``loss`` (weighted total), ``terms`` (each term, unweighted) and ``weights``.
    """

    def __init__(
        self,
        device: torch.device | str,
        max_epochs: int,
        train_data_loader: Any,
        networks: Sequence[nn.Module],
        optimizers: Sequence[Optimizer] | Optimizer,
        loss_terms: Sequence[LossTerm],
        epoch_length: int = 1,
        prepare_batch: Callable = prepare_mixed_batch,
        train_handlers: Sequence | None = None,
        amp: bool | str = False,
        grad_clip: float | None = None,
        key_train_metric: dict | None = None,
        additional_metrics: dict | None = None,
        postprocessing: Callable | None = None,
        decollate: bool = False,
        event_names: list | None = None,
        to_kwargs: dict | None = None,
        amp_kwargs: dict | None = None,
        optim_set_to_none: bool = True,
        max_iterations: int | None = None,
    ):
        networks = list(networks) if isinstance(networks, (Sequence, nn.ModuleList)) else [networks]
        optimizers = [optimizers] if isinstance(optimizers, Optimizer) else list(optimizers)
        if max_epochs < 1 or epoch_length < 1:
            raise ValueError(f"max_epochs ({max_epochs}) and epoch_length ({epoch_length}) must be positive")
        if max_iterations is not None:
            if int(max_iterations) < 1:
                raise ValueError(f"max_iterations must be positive, got {max_iterations}")
            max_epochs = math.ceil(int(max_iterations) / epoch_length)
        self.precision = autocast_mode(amp, device)
        if not networks:
            raise ValueError("at least one network is needed")
        if not optimizers:
            raise ValueError("at least one optimiser is needed")
        loss_terms = bind_terms(loss_terms, networks)
        names = [t.name for t in loss_terms]
        if len(set(names)) != len(names):
            raise ValueError(f"loss term names must be unique, got {names}")
        stepped = {id(p) for opt in optimizers for group in opt.param_groups for p in group["params"]}
        for term in loss_terms:
            if any(p.requires_grad and id(p) not in stepped for p in term.parameters()):
                raise ValueError(
                    f"loss term {term.name!r} has trainable parameters no optimiser steps: build the optimiser after "
                    "monai_ssl.losses.terms.bind_terms(loss_terms, networks), from the bound terms"
                )
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            prepare_batch=prepare_batch,
            key_metric=key_train_metric,
            additional_metrics=additional_metrics,
            handlers=train_handlers,
            postprocessing=postprocessing,
            amp=self.precision == "cuda",
            event_names=event_names,
            decollate=decollate,
            to_kwargs=to_kwargs,
            amp_kwargs=amp_kwargs,
        )
        self.networks = nn.ModuleList(networks)
        self.optimizers = optimizers
        # terms may own parameters and buffers (projectors, correspondence matrices): keep them with the students
        self.loss_terms = nn.ModuleList(loss_terms).to(self.state.device)
        self.max_iterations = int(max_iterations) if max_iterations is not None else max_epochs * epoch_length
        if self.max_iterations % epoch_length:
            self.add_event_handler(Events.ITERATION_COMPLETED(once=self.max_iterations), lambda e: e.terminate())
        if self.precision == "cpu_bf16":
            for net in self.networks:
                net.to(memory_format=torch.channels_last)
        self.grad_clip = grad_clip
        self.optim_set_to_none = optim_set_to_none
        self.needs_features = any(t.needs_features for t in loss_terms)
        # after the handlers' STARTED (a resumed checkpoint has set the iteration): the data continue from there
        self.add_event_handler(Events.STARTED, self._start_data)

    def _start_data(self, _engine=None) -> None:
        """A loader with ``start_at`` (:class:`~monai_ssl.data.slices.SemiSupervisedLoader`) resumes its stream
        at the current iteration, so a resumed run sees the batches an uninterrupted run would have seen."""
        if hasattr(self.data_loader, "start_at"):
            self.data_loader.start_at(self.state.iteration)

    def run(self) -> None:  # type: ignore[override]
        """Train; the AMP grad scaler is created with the non-deprecated ``torch.amp`` API."""
        self.scaler = torch.amp.GradScaler("cuda") if self.amp else None
        super(Trainer, self).run()

    def _forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[list[torch.Tensor]] | None]:
        logits, features = [], []
        for net in self.networks:
            if self.needs_features:
                out, feats = net.forward_features(x)
                features.append(feats)
            else:
                out = net(x)
            logits.append(out)
        return logits, (features if self.needs_features else None)

    def _iteration(self, engine: SemiSupervisedTrainer, batchdata: Mapping[str, Any]) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        labeled, unlabeled = batch["labeled"], batch.get("unlabeled")
        n_l = labeled[Keys.IMAGE].shape[0]
        x = labeled[Keys.IMAGE] if unlabeled is None else torch.cat([labeled[Keys.IMAGE], unlabeled[Keys.IMAGE]])
        engine.state.output = {Keys.IMAGE: labeled[Keys.IMAGE], Keys.LABEL: labeled.get(Keys.LABEL)}
        engine.networks.train()
        iteration = engine.state.iteration - 1
        if engine.precision == "cuda":
            autocast = torch.autocast("cuda", **engine.amp_kwargs)
        elif engine.precision == "cpu_bf16":
            autocast = torch.autocast("cpu", dtype=torch.bfloat16)
            x = x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x
        else:
            autocast = nullcontext()
        with autocast:  # the students' forward passes only: loss terms (and their own modules) run in float32
            logits, features = engine._forward(x)
        if engine.precision is not None:
            logits = [o.float() for o in logits]
            features = None if features is None else [[f.float() for f in fs] for fs in features]
        ctx = StepContext(
            iteration=iteration,
            max_iterations=engine.max_iterations,
            labeled=labeled,
            unlabeled=unlabeled,
            logits_l=[o[:n_l] for o in logits],
            logits_u=[o[n_l:] for o in logits],
            features_l=None if features is None else [[f[:n_l] for f in fs] for fs in features],
            features_u=None if features is None else [[f[n_l:] for f in fs] for fs in features],
            networks=list(engine.networks),
        )
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        total = x.new_zeros((), dtype=torch.float32)
        values, weights = {}, {}
        for term in engine.loss_terms:
            if term.needs_unlabeled and (unlabeled is None or unlabeled[Keys.IMAGE].shape[0] == 0):
                continue
            weight = float(term.weight(iteration, engine.max_iterations))
            if weight == 0.0:
                continue
            value = term(ctx)
            total = total + weight * value
            values[term.name], weights[term.name] = value.detach(), weight
        engine.state.output.update({Keys.LOSS: total.detach(), TERMS_KEY: values, WEIGHTS_KEY: weights})
        engine.state.output[DIAGNOSTICS_KEY] = dict(ctx.scalars)
        engine.state.output[LR_KEY] = engine.learning_rates()
        engine.state.output[Keys.PRED] = torch.stack([o.detach() for o in ctx.logits_l]).mean(0)
        engine.fire_event(IterationEvents.LOSS_COMPLETED)

        for opt in engine.optimizers:
            opt.zero_grad(set_to_none=engine.optim_set_to_none)
        if engine.scaler is not None:
            engine.scaler.scale(total).backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            for opt in engine.optimizers:
                engine.scaler.unscale_(opt)
            engine._clip()
            for opt in engine.optimizers:
                engine.scaler.step(opt)
            engine.scaler.update()
        else:
            total.backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine._clip()
            for opt in engine.optimizers:
                opt.step()
        for term in engine.loss_terms:
            term.step_completed(iteration)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output

    def learning_rates(self) -> dict[str, float]:
        """``lr_<i>``: the learning rate of every parameter group of every optimiser, in order (with
        :func:`~monai_ssl.engines.optim.student_optimizer`: ``lr_k`` is student ``k``'s, then the terms' group)."""
        groups = [g for o in self.optimizers for g in o.param_groups]
        return {f"lr_{i}": float(g["lr"]) for i, g in enumerate(groups)}

    def _clip(self) -> None:
        if self.grad_clip is not None:
            for module in (*self.networks, *self.loss_terms):
                torch.nn.utils.clip_grad_norm_(module.parameters(), self.grad_clip)
