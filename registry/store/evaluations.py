"""Evaluation results and the benchmark runs that group them."""

from __future__ import annotations

import datetime as dt
from abc import ABC, abstractmethod
from typing import Any

from elmreg.registry.entities import BenchmarkCell, BenchmarkRun, Evaluation


class EvaluationStore(ABC):
    """Scores of routes and experts on tasks, and the nightly benchmark's runs."""

    @abstractmethod
    def record_evaluation(
        self,
        *,
        task_id: int,
        expert_id: int | None,
        route: str,
        split: str,
        metric: str,
        score: float,
        n_examples: int,
        library_version: int | None,
        details: dict[str, Any] | None = None,
        benchmark_run_id: int | None = None,
    ) -> int:
        """Store one evaluation result; returns its id."""

    @abstractmethod
    def list_evaluations(self, *, task_id: int | None = None) -> list[Evaluation]:
        """Evaluation results, oldest first."""

    @abstractmethod
    def start_benchmark_run(self, *, since: dt.datetime | None, suite: dict[str, Any]) -> BenchmarkRun:
        """Record that a benchmark run started (status 'running')."""

    @abstractmethod
    def finish_benchmark_run(
        self, run_id: int, *, status: str, summary: dict[str, Any], report_uri: str | None
    ) -> BenchmarkRun:
        """Close a benchmark run as 'succeeded' or 'failed', with its summary and report location."""

    @abstractmethod
    def last_benchmark_start(self) -> dt.datetime | None:
        """When the latest successful benchmark run started (None before the first)."""

    @abstractmethod
    def benchmark_expert_scores(self, task_id: int, *, split: str, limit: int) -> dict[int, float]:
        """Each expert's latest score on a task from successful runs with that split and sample size."""

    @abstractmethod
    def latest_benchmark_scores(self) -> tuple[BenchmarkRun, list[BenchmarkCell]] | None:
        """The latest successful run that scored experts, and its scores in the order they were recorded."""
