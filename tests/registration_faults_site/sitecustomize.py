"""Fault injection for the registration isolation tests (test-only; on ``PYTHONPATH`` via
``tests.registration_faults.faults_env``, never installed).

Python imports ``sitecustomize`` at start-up in every process of a job started with that environment, the pool's
fork server included, so each forked worker runs the pair through the wrapper below: ``crash`` kills the worker
with SIGSEGV, ``sleep:<s>`` hangs it for ``s`` seconds, ``hold:<s>`` hangs it holding the GIL as an elastix call
does (libc ``sleep`` through ``ctypes.PyDLL``). Pairs are named by their stem: ``FAULTS="F__M=crash,A__B=sleep:30"``.
"""

import os

FAULTS_ENV = "REGISTRATION_TEST_FAULTS"


def _install(spec: str) -> None:
    import ctypes
    import functools
    import signal
    import time

    import registration.elastix as elastix

    faults = dict(item.split("=", 1) for item in spec.split(",") if "=" in item)
    register_pair = elastix.register_pair

    @functools.wraps(register_pair)
    def faulty_register_pair(task, threads: int = 1):
        fault = faults.get(task.stem)
        if fault == "crash":
            os.kill(os.getpid(), signal.SIGSEGV)
        elif fault and fault.startswith("sleep:"):
            time.sleep(float(fault.split(":", 1)[1]))
        elif fault and fault.startswith("hold:"):
            ctypes.PyDLL(None).sleep(int(fault.split(":", 1)[1]))
        elif fault:
            raise ValueError(f"unknown test fault {fault!r}")
        return register_pair(task, threads)

    elastix.register_pair = faulty_register_pair  # the workers look it up in the module at every pair


if os.environ.get(FAULTS_ENV, "").strip():
    _install(os.environ[FAULTS_ENV])
