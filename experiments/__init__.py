"""Experiments that check the seed paper's claims on a registry (``elmreg experiment run``).

The harness uses the public ``Registry`` API only; presets live in ``benchmarks/paper/``.
"""

from elmreg.experiments.config import ExperimentConfig, TaskSpec, list_presets, load_config
from elmreg.experiments.continual import PredictionCheck, compare_predictions
from elmreg.experiments.harness import ExperimentResult, run_experiment

__all__ = [
    "ExperimentConfig",
    "ExperimentResult",
    "PredictionCheck",
    "TaskSpec",
    "compare_predictions",
    "list_presets",
    "load_config",
    "run_experiment",
]
