"""Resume after ``kill -9``: the real CLI runs twice in subprocesses (each imports elastix once, ~10 s)."""

import json
import os
import signal
import time
from pathlib import Path

import pandas as pd
import pytest
import SimpleITK as sitk
from test_registration_job import cli, dataset

from tests.registration_faults import faults_env

pytestmark = pytest.mark.filterwarnings("ignore:builtin type:DeprecationWarning")


def _alive(pid: int) -> bool:
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def _start_precompute(tmp_path, hook: str, finished: int):
    """Start a 1-worker precompute of 3 cases with a test ``hook``; return once ``finished`` sidecars exist."""
    datalist = dataset(tmp_path, 3)
    out = tmp_path / "out"
    pairs = out / "affine" / "pairs"
    args = ["precompute", "--datalist", str(datalist), "--out", str(out), "--kind", "affine", "--workers", "1"]
    proc = cli(*args, env=faults_env(hook))
    deadline = time.monotonic() + 150
    while len(list(pairs.glob("*.json"))) < finished and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    return proc, args, out, pairs


def test_resume_after_kill_9(tmp_path):
    # the 4th pair hangs, so the job is certainly mid-way when it is killed
    proc, args, out, pairs = _start_precompute(tmp_path, "c1__c2=sleep:300", finished=3)
    time.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    done = {p.name: p.read_bytes() for p in pairs.glob("*.json")}
    assert sorted(done) == ["c0__c1.json", "c0__c2.json", "c1__c0.json"]
    for h5 in pairs.glob("*.h5"):  # every finished-name transform file is whole
        sitk.ReadTransform(str(h5))
    worker = json.loads(done["c0__c1.json"])["pid"]
    for _ in range(100):  # the orphaned worker notices its parent's death through the lifeline and exits
        if not _alive(worker):
            break
        time.sleep(0.05)
    assert not _alive(worker)
    # run again: only the three missing pairs are computed
    proc = cli(*args, "--no-progress")
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert "6 pairs: 3 already finished, 3 computed, 0 failed" in stdout
    for name, content in done.items():
        assert (pairs / name).read_bytes() == content
    manifest = pd.read_csv(out / "affine" / "manifest.csv")
    assert (manifest["status"] == "ok").all() and len(manifest) == 6
    assert not list(pairs.glob(".tmp-*"))


def test_kill_9_stops_a_worker_inside_a_gil_holding_call_and_select_waits_for_precompute(tmp_path):
    """A worker blocked in a call that holds the GIL (as elastix does) dies with the job, not when the call
    returns; and `select` refuses to read a folder whose precompute is still running."""
    proc, _, out, pairs = _start_precompute(tmp_path, "c0__c2=hold:120", finished=1)  # c0__c1 done, c0__c2 held
    worker = json.loads((pairs / "c0__c1.json").read_text())["pid"]
    select = cli("select", "--out", str(out), "--kind", "affine")
    _, err = select.communicate(timeout=120)
    assert select.returncode == 2 and "another registration job" in err.strip().splitlines()[-1]
    assert not (out / "affine" / "brs.json").exists()
    time.sleep(1.0)  # the worker is now inside the GIL-holding call
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    start = time.monotonic()
    while _alive(worker) and time.monotonic() - start < 10:
        time.sleep(0.05)
    assert not _alive(worker), "worker outlived the killed job"
    assert time.monotonic() - start < 10
