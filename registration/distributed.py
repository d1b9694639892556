"""Run the pair tasks on a Dask cluster (the ``dask`` extra) instead of the local process pool.

Each task is :func:`registration.elastix.run_task`: it writes its files atomically and is idempotent, so
Dask's retries and a rerun of the whole job are safe. Dask workers import elastix once, at their first pair,
after the task has pinned the ITK threads. The output folder must be on storage shared by all workers.
Differences from the local pool: the per-pair timeout is not enforced (Dask cannot stop a running task); a
worker that crashes is restarted by Dask and, after Dask's own retries, the pair is recorded as failed
(``KilledWorker``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from registration.elastix import run_task
from registration.pairs import PairTask

__all__ = ["run_on_dask"]

log = logging.getLogger("registration")


def run_on_dask(
    tasks: list[PairTask],
    on_result: Callable[[PairTask, dict[str, Any]], PairTask | None],
    scheduler: Any = None,
    local_workers: int | None = None,
    threads: int = 1,
) -> None:
    """Submit every task; ``on_result`` is called per attempt and may return a retry task to submit."""
    try:
        from distributed import Client, LocalCluster, as_completed
    except ImportError as e:
        raise RuntimeError("Dask scheduling needs the 'dask' extra: pip install 'monai-ssl[dask]'") from e
    if not tasks:
        return
    own = None
    if isinstance(scheduler, Client):
        client = scheduler
    elif scheduler:
        client = own = Client(scheduler)
    else:
        cluster = LocalCluster(n_workers=int(local_workers or 1), threads_per_worker=1, processes=True)
        client = own = Client(cluster)
    log.info("dask: %s", client)
    try:

        def submit(task: PairTask):
            return client.submit(run_task, task, threads, key=f"pair-{task.stem}-{task.attempt}", pure=False)

        futures = {submit(t): t for t in tasks}
        pending = as_completed(list(futures))
        for fut in pending:
            task = futures.pop(fut)
            try:
                result = fut.result()
            except Exception as e:  # KilledWorker, lost connection, ...
                result = {"status": "failed", "error": f"dask: {type(e).__name__}: {e}"}
            retry = on_result(task, result)
            if retry is not None:
                new = submit(retry)
                futures[new] = retry
                pending.add(new)
    finally:
        if own is not None:
            cluster = own.cluster
            own.close()
            if cluster is not None:
                cluster.close()
