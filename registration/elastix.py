"""The worker side: itk-elastix registration of one directed pair. This is the only module that imports ITK.

Threading is pinned: ITK's ``Pool`` threader, with the thread count set both as the global default (the
environment, before ITK is imported, and the ``MultiThreaderBase`` API after) and explicitly on the elastix
filter. Measured traps this avoids: the default TBB back-end with ``SetNumberOfThreads`` segfaulted in a
B-spline stage, the Pool back-end without an explicit count made affines fail, and
``ITK_GLOBAL_DEFAULT_THREADER=TBB`` breaks SimpleITK in the same process.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import asdict
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

import numpy as np

from monai_ssl.fileio import atomic_path
from registration.metrics import mutual_information, normalise_intensity, rmse
from registration.pairs import PairTask, write_sidecar
from registration.params import parameter_maps

__all__ = ["THREADER", "configure_threads", "warm_up", "register_pair", "run_task", "worker_main", "versions"]

THREADER = "Pool"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def configure_threads(threads: int) -> None:
    """Pin ITK's threader and thread count; call before ITK is imported (it also works after, via the API)."""
    os.environ["ITK_GLOBAL_DEFAULT_THREADER"] = THREADER
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(int(threads))
    if "itk" in sys.modules:
        import itk

        mt = itk.MultiThreaderBase
        mt.SetGlobalDefaultThreader(mt.ThreaderTypeFromString(THREADER))
        mt.SetGlobalDefaultNumberOfThreads(int(threads))


def warm_up(threads: int = 1) -> None:
    """Import ITK and load the elastix wrappers (7-12 s, once per process)."""
    configure_threads(threads)
    import itk

    itk.ParameterObject.New()


def versions() -> dict[str, str]:
    """Software versions recorded in every sidecar."""
    out = {"python": platform.python_version(), "numpy": np.__version__}
    for dist in ("itk", "itk-elastix", "SimpleITK"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "missing"
    return out


def _read(itk, path: str):
    image = itk.imread(path, itk.F)
    arr = itk.array_view_from_image(image)
    if not np.isfinite(arr).all():
        raise ValueError(f"{path}: image has NaN or infinite voxels")
    if float(arr.max()) <= float(arr.min()):
        raise ValueError(f"{path}: image is constant ({float(arr.min())}); nothing to register")
    return image


def register_pair(task: PairTask, threads: int = 1) -> dict[str, Any]:
    """Register ``task.moving`` to ``task.fixed``; write the transform, parameter texts and sidecar atomically.

    Returns the sidecar record. Raises on failure (the caller records it); nothing partial is left behind.
    """
    configure_threads(threads)
    import itk

    start, cpu_start = time.perf_counter(), time.process_time()
    fixed, moving = _read(itk, task.fixed_image), _read(itk, task.moving_image)
    maps = parameter_maps(task.settings, tuple(fixed.GetSpacing()), fallback=task.fallback)
    params = itk.ParameterObject.New()
    for m in maps:
        params.AddParameterMap(m)
    method = itk.ElastixRegistrationMethod[type(fixed), type(moving)].New(
        fixed_image=fixed, moving_image=moving, parameter_object=params, log_to_console=False
    )
    method.SetNumberOfThreads(int(threads))
    method.UpdateLargestPossibleRegion()
    transform = method.ConvertToItkTransform(method.GetCombinationTransform())
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start

    with atomic_path(task.transform_path) as tmp:
        itk.transformwrite([transform], str(tmp))
    result = method.GetTransformParameterObject()
    names = []
    for i in range(result.GetNumberOfParameterMaps()):
        pmap = result.GetParameterMap(i)
        previous = str(task.parameter_path(i - 1).name) if i else "NoInitialTransform"
        pmap["InitialTransformParameterFileName"] = [previous]
        with atomic_path(task.parameter_path(i), suffix=".txt") as tmp:
            itk.ParameterObject.WriteParameterFile(pmap, str(tmp))
        names.append(task.parameter_path(i).name)

    f = itk.array_view_from_image(fixed)
    identity = itk.resample_image_filter(moving, use_reference_image=True, reference_image=fixed)
    before, after = itk.array_view_from_image(identity), itk.array_view_from_image(method.GetOutput())
    fn = normalise_intensity(f)
    metrics = {
        "mi_before": mutual_information(fn, normalise_intensity(before, f)),
        "mi_after": mutual_information(fn, normalise_intensity(after, f)),
        "rmse_before": rmse(fn, normalise_intensity(before, f)),
        "rmse_after": rmse(fn, normalise_intensity(after, f)),
    }
    record = {
        "status": "ok",
        "error": None,
        "seconds": round(seconds, 4),
        "cpu_seconds": round(cpu_seconds, 4),  # all threads; ~ the wall time on an idle machine at 1 thread
        "attempts": task.attempt,
        "fallback": task.fallback,
        "previous_errors": task.errors,
        "threads": int(method.GetNumberOfThreads()),  # as ITK reports them, so tests check what is in effect
        "threader": itk.MultiThreaderBase.ThreaderTypeToString(itk.MultiThreaderBase.GetGlobalDefaultThreader()),
        "settings": asdict(task.settings),
        "transform": task.transform_path.name,
        "parameter_files": names,
        "metrics": metrics,
        "versions": versions(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_sidecar(task, record)
    return record


def run_task(task: PairTask, threads: int = 1) -> dict[str, Any]:
    """Run one pair and return ``{"status": "ok", ...}`` or ``{"status": "failed", "error": ...}`` (never raises
    for registration errors, so pools and Dask see a result)."""
    try:
        return register_pair(task, threads)
    except Exception as e:  # any ITK/elastix/IO error of this pair is recorded, the job goes on
        last = traceback.format_exception_only(type(e), e)[-1].strip()
        return {"status": "failed", "error": last[-2000:]}


def _start_guardian(lifeline) -> None:
    """Fork a guardian that SIGKILLs this worker as soon as the job dies (EOF on the lifeline pipe).

    A thread cannot do it: elastix holds the GIL for the whole registration, so a watcher thread would only run
    when the call returns, 15-45 s later. The guardian is a separate process, and the kernel kills it with the
    worker (``PR_SET_PDEATHSIG``). Where ``prctl`` does not exist, a thread is the fallback.
    """
    worker = os.getpid()
    if not sys.platform.startswith("linux"):
        threading.Thread(target=_kill_on_eof, args=(lifeline, worker), daemon=True).start()
        return
    if os.fork() == 0:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != worker:  # the worker died before the request took effect
            os._exit(0)
        _kill_on_eof(lifeline, worker)


def _kill_on_eof(lifeline, worker: int) -> None:
    """Block on the lifeline pipe; the job holds the other end, so EOF means the job died."""
    with contextlib.suppress(EOFError, OSError):
        lifeline.recv()
    os.kill(worker, signal.SIGKILL)
    os._exit(70)


def worker_main(conn, lifeline, threads: int) -> None:
    """Long-lived pool worker: warm up once, then run tasks from ``conn`` until told to stop."""
    _start_guardian(lifeline)
    warm_up(threads)
    conn.send(("ready", os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        conn.send(("done", run_task(msg, threads)))
