"""Worker processes that die or are told to stop, on real embedded services and a tiny backbone.

Each test drives a real ``elmreg worker`` subprocess and injects the fault from outside: ``kill -9`` (an OOM
killer, an orchestrator) or ``SIGTERM`` (``docker stop``, Kubernetes).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import lab_environ

ELMREG = str(Path(sys.executable).parent / "elmreg")
# Enough epochs that training is still running when the fault arrives.
LONG = {"epochs": 400, "batch_size": 4}


def _start_worker(lab, name: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [ELMREG, "worker", "--quiet", "--name", name, *args],
        env=lab_environ(lab),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _wait_until_training(lab, task: str, runs_before: int, worker: subprocess.Popen) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and len(lab.training_runs(task)) <= runs_before:
        assert worker.poll() is None, worker.communicate()
        time.sleep(0.2)
    assert len(lab.training_runs(task)) > runs_before, "the worker never started training"


def test_sigterm_hands_the_job_back_at_once_and_exits_0(lab):
    task = lab.add_task("bigbench:colours", max_examples=64, training=LONG)
    worker = _start_worker(lab, "stopping")  # run_forever, as in a container
    _wait_until_training(lab, task.name, 0, worker)
    os.kill(worker.pid, signal.SIGTERM)
    out, err = worker.communicate(timeout=60)
    assert worker.returncode == 0, err
    [job] = lab.jobs()
    # Back in the queue now, not after its 300 s lease; the interrupted attempt does not count.
    assert job.status == "queued" and job.lease_owner is None and job.lease_expires_at is None
    assert job.attempts == 0 and "stopping" in job.last_error
    assert [e.status for e in lab.experts(task=task.name)] == ["failed"]  # nothing published
    assert [r.status for r in lab.training_runs(task.name)] == ["failed"]


def test_a_job_that_kills_its_worker_every_time_ends_failed(lab):
    task = lab.add_task("bigbench:colours", max_examples=64, training=LONG)
    [job] = lab.jobs()
    for attempt in range(1, job.max_attempts + 1):
        victim = _start_worker(lab, f"victim-{attempt}", "--once", "--lease", "2")
        _wait_until_training(lab, task.name, attempt - 1, victim)
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait()
        time.sleep(2.5)  # the lease runs out: nobody heartbeats it any more
    rescuer = _start_worker(lab, "rescuer", "--once")
    out, err = rescuer.communicate(timeout=120)
    assert rescuer.returncode == 0, err
    assert "no queued jobs" in out  # nothing to run: the poison job is not claimed a fourth time
    [job] = lab.jobs()
    assert job.status == "failed" and job.attempts == job.max_attempts
    assert f"lost {job.max_attempts} times" in job.last_error
    assert [r.status for r in lab.training_runs(task.name)] == ["failed"] * job.max_attempts
    assert not lab.experts(status="ready")
