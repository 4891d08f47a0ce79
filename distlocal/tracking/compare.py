"""`distlocal compare EXPERIMENT`: the ablation table of an MLflow experiment's finished runs."""

from __future__ import annotations

from pathlib import Path

from distlocal.ablation import AblationRow, ablation_rows, table_metric
from distlocal.config import ConfigError

__all__ = ["compare_experiment"]

# Keys that differ between runs without being a setting under comparison.
_NOT_SETTINGS = ("run.", "tracking.", "train.seed", "model.blocks_per_stage", "data.manifest", "data.cache_dir")


def _check_store(uri: str) -> None:
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise ConfigError(f"no MLflow store at {uri}; pass --uri (e.g. http://host:5000 or sqlite:///runs/mlflow.db) "
                          f"or --run-dir with the run.dir the trainings used")


def compare_experiment(experiment: str, uri: str, by: list[str] | None = None,
                       sweep: str | None = None) -> tuple[list[AblationRow], str]:
    """(rows, metric source) over the experiment's finished training runs, grouped by the `by` params."""
    from mlflow.tracking import MlflowClient

    _check_store(uri)
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = [e.name for e in client.search_experiments()]
        raise ConfigError(f"MLflow at {uri} has no experiment {experiment!r}; it has {names}")
    runs, token = [], None
    while True:
        page = client.search_runs([found.experiment_id], "attributes.status = 'FINISHED'", max_results=1000,
                                  page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            break
    runs = [r for r in runs if r.data.tags.get("distlocal.sweep") != "parent"
            and (sweep is None or r.data.tags.get("distlocal.sweep") == sweep)]
    if not runs:
        raise ConfigError(f"experiment {experiment!r} at {uri} has no finished training runs"
                          + (f" of sweep {sweep!r}" if sweep else ""))
    if not by:
        keys = sorted({k for r in runs for k in r.data.params if not k.startswith(_NOT_SETTINGS)})
        by = [k for k in keys if len({r.data.params.get(k) for r in runs}) > 1] or ["model.k", "model.rfr.enabled"]
    source = "test" if all("test/acc" in r.data.metrics for r in runs) else "valid"
    prefix = "test/" if source == "test" else "val/"
    pairs = []
    for run in runs[::-1]:  # search_runs returns newest first; the table reads in the order runs were made
        metrics = {k.removeprefix(prefix): v for k, v in run.data.metrics.items()
                   if k.startswith(prefix) and table_metric(k.removeprefix(prefix))}
        if "classifier" in run.data.tags:
            metrics["classifier"] = run.data.tags["classifier"]
        pairs.append(({k: run.data.params.get(k, "") for k in by}, metrics))
    return ablation_rows(pairs, by), source
