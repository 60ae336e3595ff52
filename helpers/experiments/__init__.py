"""What the notebooks call: one feature experiment end to end (``run_experiment``), its settings as notebooks and
papermill deliver them, result files, figures, the papermill sweep and the widget explorer.

    from helpers.experiments import run_experiment, save_experiment
    exp = run_experiment("embedded", 1, "DEFTABLENAME")   # exp.mean(): [layer, head, pos]; exp.summary()
    save_experiment(exp, "outputs/mine")                   # JSON + heatmaps

Modules: ``experiment`` (settings, validation, ``run_experiment``, ``ExperimentResult``), ``result_json`` (the JSON
format), ``results`` (file names, saving), ``atomic_files``, ``plotting``, ``sweep_cells`` / ``sweep`` /
``sweep_index`` (the sweep file and its cells, running them, the index), ``explorer`` (widgets).
"""
from helpers.experiments.experiment import ExperimentResult, ExperimentSettings, run_experiment, validate
from helpers.experiments.result_json import load_results
from helpers.experiments.results import save_experiment

__all__ = ["run_experiment", "ExperimentSettings", "ExperimentResult", "validate", "save_experiment", "load_results"]
