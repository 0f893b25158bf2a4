"""tune stage: Optuna search over composed config keys, judged on the validation split only.

`tune.space` maps composed keys (train.lr, model.dropout, train.augment.zoom, ...) to
distributions. Each trial trains the configured model with its values for `tune.epochs` epochs on
a stratified `tune.subset_fraction` of train; a pruner reads the objective after every epoch.

The study lives in `tune.storage` (any SQLAlchemy URL) under a name derived from the data version
and a digest of the space plus every config value a trial's result depends on, so a rerun with the
same inputs resumes it and a changed space or config starts a new one. The budget is a number of
trials, `tune.n_trials`, counting those the study already holds, so a study means the same on
every machine. Hand-over to train: `tune.best_params_path` (dotted key -> value) and
reports/tune.json; MLflow gets one parent run per execution with a nested run per trial.

`run` calls `optimize` in-process (one worker) or in N spawned worker processes (`--workers N`);
with a PostgreSQL storage the same command on another machine joins the study. A worker starts a
trial only while the trials counted plus those running in live workers stay under n_trials, so N
workers never overshoot the budget; a trial whose worker process died is marked FAIL 'orphaned' and
does not count.

Modules: space (the search space and the search's settings), study (storage, name, sampler,
pruner, budget and orphans), objective (one trial), workers (the trial loop and worker processes),
report (hand-over and reports), stage (`run`, `cli`).
"""

from soundmood.tune.stage import cli, run

__all__ = ["cli", "run"]
