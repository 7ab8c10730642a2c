"""The embedded S3 stopped, frozen and restarted under live clients: faults a deployment must survive.

A restarted server comes back on the same endpoint, so a long-running worker's client keeps working; while it is
down or frozen, requests are retried a bounded number of times and then fail as one ArtifactError, the job is
retried later by the queue, and a worker finishes it once S3 is back.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from fixtures.bigbench_tree import write_bigbench_cache

from elmreg.api import Registry
from elmreg.jobs import Worker
from elmreg.registry.artifacts import S3ArtifactRepository
from elmreg.registry.errors import ArtifactError, CredentialsError
from elmreg.registry.store import schema
from elmreg.services import resolve_endpoints, services_down, services_up
from faults.conftest import embedded_s3

FAST = {"epochs": 1, "learning_rate": 1e-3, "batch_size": 8}


def _file(path: Path, size: int = 4096) -> Path:
    path.write_bytes(os.urandom(size))
    return path


def _one_line_outage(error: ArtifactError) -> None:
    assert not isinstance(error, CredentialsError)  # an outage is not the user's key: the job must be retried
    assert "\n" not in str(error) and "S3" in str(error)


def test_restart_keeps_the_endpoint_and_a_live_repository_works(own_context, tmp_path):
    settings, repository = own_context.settings, own_context.artifacts
    first = repository.put_file(_file(tmp_path / "a"))
    endpoint = own_context.endpoints.s3_endpoint_url
    assert services_down(settings) == ["s3"]
    started = time.monotonic()
    with pytest.raises(ArtifactError) as down:
        repository.put_file(_file(tmp_path / "b"))
    assert time.monotonic() - started < 60  # bounded retries, not a hang
    _one_line_outage(down.value)
    services_up(settings)
    assert resolve_endpoints(settings).s3_endpoint_url == endpoint
    # The same client object, created before the restart, uploads and downloads again.
    second = repository.put_file(tmp_path / "b")
    assert repository.download(first, tmp_path / "a.out").read_bytes() == (tmp_path / "a").read_bytes()
    assert repository.exists(second.uri)


def test_frozen_s3_fails_in_bounded_time_then_recovers(own_s3, tmp_path):
    endpoints = resolve_endpoints(own_s3)
    repository = S3ArtifactRepository(
        bucket=endpoints.s3_bucket,
        prefix=f"{tmp_path.name}/",
        endpoint_url=endpoints.s3_endpoint_url,
        access_key_id=endpoints.s3_access_key_id,
        secret_access_key=endpoints.s3_secret_access_key,
        connect_timeout=1,
        read_timeout=2,
        max_attempts=2,
    )
    repository.put_file(_file(tmp_path / "warm"))  # the bucket exists; connections are pooled
    pid = embedded_s3(own_s3).state().pid
    os.kill(pid, signal.SIGSTOP)  # a server that accepts connections and never answers: a slow S3
    try:
        started = time.monotonic()
        with pytest.raises(ArtifactError) as frozen:
            repository.put_file(_file(tmp_path / "slow"))
        assert time.monotonic() - started < 30
        _one_line_outage(frozen.value)
    finally:
        os.kill(pid, signal.SIGCONT)
    stored = repository.put_file(tmp_path / "slow")
    assert repository.exists(stored.uri)


def test_job_failing_on_a_stopped_s3_is_finished_by_a_worker_once_it_is_back(
    own_s3, scratch_database, tmp_path, tiny_backbones
):
    cache = tmp_path / "cache"
    write_bigbench_cache(cache)
    lab = Registry(
        own_s3.replace(
            database_url=scratch_database,
            s3_prefix=f"{tmp_path.name}/",
            cache_dir=cache,
            backbone=tiny_backbones["causal"],
            device="cpu",
        )
    )
    try:
        schema.upgrade(lab.context.engine)
        task = lab.add_task("bigbench:colours", max_examples=8, training=FAST)
        worker = Worker(lab.context, retry_delay_seconds=0)
        endpoint = lab.context.endpoints.s3_endpoint_url
        services_down(own_s3)
        try:
            failed = worker.run_once()
        finally:
            services_up(own_s3)
        assert failed.status == "queued" and "cannot reach S3" in failed.last_error
        assert lab.experts(task=task.name, status="ready") == []
        assert resolve_endpoints(own_s3).s3_endpoint_url == endpoint
        done = worker.run_once()  # the same worker and context as before the restart
        assert done.status == "succeeded"
        [expert] = lab.experts(task=task.name)
        assert expert.status == "ready" and lab.context.artifacts.exists(expert.artifact.uri)
    finally:
        lab.close()
