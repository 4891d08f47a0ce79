"""
Ablation sweeps: one training per combination of `--grid` values (and seed), as nested MLflow runs under a parent.

SWEEP_DIR = run.dir/NAME holds sweep.json (what was asked), one run folder per child, and the ablation table.
Running the same sweep again skips children whose summary says they completed and resumes children that were
interrupted from their last checkpoint, so an interrupted sweep never redoes finished work.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from distlocal.ablation import ablation_rows, format_markdown, table_metric, write_csv
from distlocal.config import Config, ConfigError
from distlocal.config_load import load_config
from distlocal.engine.faults import RunFailed
from distlocal.tracking import RUN_ID_FILE, flatten, make_tracker, tracking_uri

__all__ = ["Child", "auto_parallel", "child_configs", "parse_grid", "plan_children", "run_sweep"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Child:
    name: str
    settings: dict  # grid key -> value, as given
    seed: int

    @property
    def overrides(self) -> list[str]:
        return [f"{key}={value}" for key, value in self.settings.items()] + [f"train.seed={self.seed}"]


def _split_values(text: str) -> list[str]:
    """Split on commas outside brackets: `[3,1],[5,3]` is two values."""
    values, depth, current = [], 0, ""
    for char in text:
        depth += char in "[{"
        depth -= char in "]}"
        if char == "," and depth == 0:
            values.append(current.strip())
            current = ""
        else:
            current += char
    values.append(current.strip())
    return values


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """`["model.k=4,8", "model.rfr.enabled=true,false"]` -> {"model.k": ["4", "8"], ...}."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        values = _split_values(raw) if sep else []
        if not key.strip() or not values or "" in values:
            raise ConfigError(f"--grid {item!r}: expected KEY=V1,V2,... (e.g. --grid model.k=4,8)")
        if key.strip() in grid:
            raise ConfigError(f"--grid {key.strip()} is given twice; list all its values in one --grid")
        grid[key.strip()] = values
    if not grid:
        raise ConfigError("a sweep needs at least one --grid KEY=V1,V2 (e.g. --grid model.k=4,8)")
    return grid


def plan_children(grid: dict[str, list[str]], seeds: int, base_seed: int) -> list[Child]:
    """Every combination of the grid values, for seeds base_seed .. base_seed + seeds - 1."""
    children = []
    for values in itertools.product(*grid.values()):
        settings = dict(zip(grid, values, strict=True))
        stem = "__".join(f"{key.split('.', 1)[-1].replace('.', '_')}-{value}" for key, value in settings.items())
        stem = "".join(c if c.isalnum() or c in "_-." else "_" for c in stem)
        for seed in range(base_seed, base_seed + seeds):
            children.append(Child(f"{stem}__seed{seed}", settings, seed))
    return children


def child_configs(config: str | None, overrides: list[str], children: list[Child], sweep_dir: Path,
                  uri: str) -> dict[str, Config]:
    """
    Each child's resolved config: the base config, the sweep's overrides, then the child's grid values. Settings that
    follow from a grid key resolve per child (model.mode=e2e takes K = 1; a K without the paper's split is balanced).
    """
    return {c.name: load_config(config, [*overrides, *c.overrides, f"run.dir={sweep_dir}", f"run.name={c.name}",
                                         f"tracking.uri={uri}"]) for c in children}


def auto_parallel(configs: list[Config]) -> int:
    """Children that fit on the Ray cluster at once (each needs K stages' resources); 1 for the local executor."""
    if any(cfg.train.executor != "ray" for cfg in configs):
        return 1
    import ray

    from distlocal.engine.placement import connect, stage_resources

    connect()
    total = ray.cluster_resources()
    gpus, cpus = total.get("GPU", 0.0), total.get("CPU", 0.0)
    need = max(configs, key=lambda c: c.model.k)
    per_cpu, per_gpu = stage_resources(need.train, need.model.k)  # what each of its stages will be given
    fits = [math.floor(cpus / (need.model.k * per_cpu) + 1e-9)]
    if per_gpu > 0:
        fits.append(math.floor(gpus / (need.model.k * per_gpu) + 1e-9))
    return max(1, min(fits))


def _state(config: str | None, overrides: list[str], grid: dict, seeds: int) -> dict:
    return {"config": config, "overrides": list(overrides), "grid": grid, "seeds": seeds}


def run_sweep(config: str | None, overrides: list[str], grid: dict[str, list[str]], seeds: int = 1,
              parallel: int | None = None, name: str = "") -> dict:
    """Train every child not yet completed, then write and log the ablation table; returns the sweep's result."""
    base = load_config(config, overrides)
    name = name or base.run.name or time.strftime("%Y%m%d-%H%M%S") + "-sweep"
    sweep_dir = Path(base.run.dir) / name
    state = _state(config, overrides, grid, seeds)
    state_file = sweep_dir / "sweep.json"
    if state_file.is_file() and json.loads(state_file.read_text()) != state:
        raise ConfigError(f"{sweep_dir} holds another sweep ({state_file} records its config, overrides and grid); "
                          f"repeat that sweep's command to resume it, or give this one another --name")
    uri = tracking_uri(base)  # children share the parent's store, although their run.dir is the sweep folder
    children = plan_children(grid, seeds, base.train.seed)
    configs = child_configs(config, overrides, children, sweep_dir, uri)  # config errors before any training
    sweep_dir.mkdir(parents=True, exist_ok=True)
    state_file.write_text(json.dumps(state, indent=2))
    parent = make_tracker(base, sweep_dir, resume=(sweep_dir / RUN_ID_FILE).is_file())
    parent.log_params({**flatten(base), "sweep.grid": json.dumps(grid), "sweep.seeds": seeds})
    parent.set_tags({"distlocal.sweep": "parent", "sweep_dir": str(sweep_dir)})
    parent_id = parent.wait_ready(timeout=min(30.0, base.tracking.flush_timeout_s))
    if base.tracking.enabled and parent_id is None:
        log.warning("MLflow parent run not created yet (tracking server unreachable): children are tracked as "
                    "separate runs, not nested")
    workers = parallel or auto_parallel(list(configs.values()))
    log.info("sweep %s: %d children, %d at a time", sweep_dir, len(children), workers)
    summaries, failed = {}, {}

    def train(child: Child) -> None:
        from distlocal.engine.trainer import Trainer

        run_dir = sweep_dir / child.name
        summary_file = run_dir / "summary.json"
        if summary_file.is_file() and json.loads(summary_file.read_text()).get("completed"):
            log.info("sweep child %s completed earlier; not run again", child.name)
            summaries[child.name] = json.loads(summary_file.read_text())
            return
        resume = (run_dir / "checkpoints" / "last").is_dir()
        try:
            summaries[child.name] = Trainer(configs[child.name], run_dir, resume=resume, parent_run_id=parent_id,
                                            extra_tags={"distlocal.sweep": name}).fit()
        except Exception as exc:  # one failed child must not stop the others
            log.error("sweep child %s failed: %s", child.name, exc)
            failed[child.name] = f"{type(exc).__name__}: {exc}"

    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sweep") as pool:
            list(pool.map(train, children))
        result = _table(children, summaries, configs, grid, sweep_dir)
        result["failed"] = failed
        for path in (sweep_dir / "ablation.md", sweep_dir / "ablation.csv", state_file):
            parent.log_artifact(path)
    except BaseException:
        parent.finish("KILLED")
        raise
    result["tracking"] = parent.finish("FAILED" if failed else "FINISHED")
    (sweep_dir / "sweep_result.json").write_text(json.dumps(result, indent=2))
    if failed:
        raise RunFailed(f"{len(failed)} of {len(children)} sweep children failed ({', '.join(failed)}); the table in "
                        f"{sweep_dir / 'ablation.md'} has the others. Fix the cause and run the same sweep again: "
                        f"finished children are not redone")
    return result


def _table(children: list[Child], summaries: dict, configs: dict[str, Config], grid: dict, sweep_dir: Path) -> dict:
    # Settings as the resolved config spells them (what MLflow params hold), so `compare` prints the same table.
    runs, source = [], "test"
    for child in children:
        summary = summaries.get(child.name)
        if summary is None:
            continue
        if summary.get("test"):
            metrics = {k.removeprefix("test/"): v for k, v in summary["test"].items()
                       if table_metric(k.removeprefix("test/"))}
            metrics["classifier"] = summary.get("classifier", "H")
        else:  # no test split: the last validation of H
            source = "valid"
            metrics = dict(summary["last_val"][-1]) if summary.get("last_val") else {}
        params = flatten(configs[child.name])
        runs.append(({key: params.get(key, child.settings[key]) for key in grid}, metrics))
    rows = ablation_rows(runs, list(grid))
    markdown = format_markdown(rows, source)
    (sweep_dir / "ablation.md").write_text(markdown + "\n")
    write_csv(rows, sweep_dir / "ablation.csv")
    return {"sweep_dir": str(sweep_dir), "children": len(children), "completed": len(runs), "table": markdown}
