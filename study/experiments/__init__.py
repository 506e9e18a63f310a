"""Experiment grids of the study: TOML configs with presets, a resumable runner, reports.

``bin/study <experiment> --preset cpu|paper --out runs/<name>`` (see :mod:`study.experiments.cli`).
"""
from .config import (ConfigError, Experiment, available_experiments, experiment_path, load_experiment,
                     resolve)
from .report import write_report
from .runner import ExperimentError, Runner, Unit, plan_units

__all__ = ["ConfigError", "Experiment", "ExperimentError", "Runner", "Unit", "available_experiments",
           "experiment_path", "load_experiment", "plan_units", "resolve", "write_report"]
