"""What the study hands over and reports: the values train gets (reports/best_params.yaml, and
why, in reports/tune.json), the parent run's summary metrics, trials table and Optuna's figures."""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import optuna
import yaml
from omegaconf import DictConfig
from optuna.trial import FrozenTrial, TrialState

from soundmood.fileio import write_json, write_text
from soundmood.tune.study import budget_used, printable_url, sqlite_file


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return study.best_trial if complete else None


def baseline_trial(study: optuna.Study) -> FrozenTrial | None:
    """The completed trial of the configured values (enqueued as trial 0), if there is one."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if trial.user_attrs.get("baseline"):
            return trial
    return None


def handed_over(
    best: FrozenTrial | None, baseline: FrozenTrial | None
) -> tuple[dict[str, Any], str]:
    """The values train should use, and why: the best trial's when it beats the baseline trial
    (the configured values, measured by the same trial on the same validation split) in the
    objective; otherwise the configured values."""
    if best is None:
        return {}, "no trial completed; train keeps the configured values"
    if baseline is None:
        return dict(best.params), f"best trial {best.number} (no baseline trial to compare with)"
    if best.number == baseline.number or best.value <= baseline.value:
        return dict(baseline.params), "the baseline trial (the configured values) is the best"
    gain = best.value - baseline.value
    return dict(best.params), (
        f"best trial {best.number} beats the baseline trial {baseline.number} by {gain:.4f}"
    )


def write_reports(
    cfg: DictConfig, study: optuna.Study, run_id: str, elapsed: float, interrupted: bool
) -> dict[str, Any]:
    best = best_trial(study)
    baseline = baseline_trial(study)
    values, reason = handed_over(best, baseline)
    _write_best_params(cfg, values)
    states = Counter(t.state.name for t in study.get_trials(deepcopy=False))
    report = {
        "enabled": True,
        "study_name": study.study_name,
        "storage": printable_url(cfg.tune.storage),
        "objective": cfg.tune.objective,
        "best_value": best.value if best else None,
        "best_trial": best.number if best else None,
        "baseline_value": baseline.value if baseline else None,
        "best_params": values,
        "handed_over": reason,
        "trials": {s.name: states.get(s.name, 0) for s in TrialState},
        "n_trials": cfg.tune.n_trials,
        "trials_counted": budget_used(study),
        "interrupted": interrupted,
        "workers": sorted(
            {
                str(t.user_attrs["worker"])
                for t in study.get_trials(deepcopy=False)
                if "worker" in t.user_attrs
            }
        ),
        "mlflow_run_id": run_id,
        "elapsed_seconds": round(elapsed, 1),
    }
    write_json(Path(cfg.evaluate.reports_dir) / "tune.json", report)
    return report


def _write_best_params(cfg: DictConfig, values: dict[str, Any]) -> None:
    text = yaml.safe_dump(values, sort_keys=True) if values else "{}\n"
    write_text(Path(cfg.tune.best_params_path), text)


def write_disabled(cfg: DictConfig) -> dict[str, Any]:
    """tune.enabled=false: hand train no values, and leave an (empty) SQLite study file for DVC."""
    _write_best_params(cfg, {})
    if path := sqlite_file(cfg.tune.storage):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    report = {"enabled": False, "best_params": {}, "mlflow_run_id": None}
    write_json(Path(cfg.evaluate.reports_dir) / "tune.json", report)
    print("tune: disabled (tune.enabled=false); train keeps the configured values")
    return report


def log_summary(cfg: DictConfig, study: optuna.Study, report: dict[str, Any]) -> None:
    """Best trial and counts as parent-run metrics; report, trials and Optuna's plots as files."""
    trials = report["trials"]
    mlflow.log_metrics(
        {
            "trials_complete": trials["COMPLETE"],
            "trials_pruned": trials["PRUNED"],
            "trials_failed": trials["FAIL"],
            "tune_seconds": report["elapsed_seconds"],
        }
    )
    if report["best_trial"] is not None:
        mlflow.log_metric(
            f"best_{cfg.tune.objective}", report["best_value"], step=report["best_trial"]
        )
        mlflow.set_tag("best_trial", str(report["best_trial"]))
        mlflow.set_tag("tune.handed_over", report["handed_over"])
    mlflow.log_dict(report, "tune/tune.json")
    mlflow.log_dict(report["best_params"], "tune/best_params.yaml")
    if study.trials:
        mlflow.log_text(study.trials_dataframe().to_csv(index=False), "tune/trials.csv")
    import matplotlib.pyplot as plt  # deferred: only a finished study draws figures

    for name, figure in optuna_figures(study):
        mlflow.log_figure(figure, f"tune/{name}.png")
        plt.close(figure)


def optuna_figures(study: optuna.Study) -> list[tuple[str, Any]]:
    """Optuna's matplotlib plots (plotly is not installed). A plot that cannot be drawn yet, such
    as importances before two trials complete, is skipped with a note."""
    import matplotlib  # deferred, as above

    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as ovm

    complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    plots: dict[str, Callable[[optuna.Study], Any]] = {
        "optimization_history": ovm.plot_optimization_history,
        "intermediate_values": ovm.plot_intermediate_values,
        "parallel_coordinate": ovm.plot_parallel_coordinate,
    }
    if complete >= 2:
        plots["param_importances"] = ovm.plot_param_importances
    figures = []
    for name, plot in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # ExperimentalWarning, empty-study warnings
                axes = plot(study)
        except (ValueError, RuntimeError) as exc:
            print(f"tune: no {name} plot ({exc})")
            continue
        figure = axes.flat[0].figure if isinstance(axes, np.ndarray) else axes.figure
        figure.set_size_inches(9, 5)
        figure.tight_layout()
        figures.append((name, figure))
    return figures
