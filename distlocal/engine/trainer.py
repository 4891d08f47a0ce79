"""
The training loop: epochs of slides through the stages, validation, checkpoints, resume.

load (or resume) -> for each epoch: train slides, validate, step lr schedules, save -> summary

A stage that dies under the Ray executor sends the loop back to the last checkpoint: every stage reloads it
and the slides since then are replayed in the same order with the same augmentation.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from distlocal.classifiers import best_index, choose, classifier_name
from distlocal.config import Config
from distlocal.config_load import save_config
from distlocal.data import ManifestError, SlideLoader, read_manifest
from distlocal.engine.checkpoint import for_restoring, load_checkpoint, save_checkpoint
from distlocal.engine.evaluate import by_classifier, evaluate, metrics_line, monitored
from distlocal.engine.executor import make_executor
from distlocal.engine.faults import RunFailed, StageFailure
from distlocal.engine.report import final_report
from distlocal.engine.run_plan import plan_run
from distlocal.engine.selection import Candidate, oriented, select
from distlocal.engine.timing import split_transfer
from distlocal.model import resolve_device
from distlocal.model.optim import schedule_metric
from distlocal.plots import classifiers_by_epoch
from distlocal.progress import progress
from distlocal.tracking import flatten, git_commit, make_tracker

__all__ = ["Trainer", "TrainState", "epoch_order"]

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    epoch: int = 0  # epochs completed
    position: int = 0  # slides of this epoch's order already trained
    slides_seen: int = 0
    best: float = -math.inf  # the best epoch's monitored metric (as measured: a loss is not negated)
    best_epoch: int = -1
    best_classifier: str = "H"  # the classifier that validated best in the best epoch (predict.classifier=best)
    best_loss: float = math.inf  # the deciding classifier's validation loss in the best epoch (ties: selection.py)
    best_reason: str = ""  # why the best epoch was chosen (engine/selection.py)
    history: list[dict] = field(default_factory=list)  # validation metrics per epoch
    failures: list[dict] = field(default_factory=list)  # stage failures survived (Ray executor)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled slide order of an epoch: a pure function of (seed, epoch), so resume replays it."""
    return np.random.default_rng([seed, epoch]).permutation(n).tolist()


class _Window:
    """Means of per-stage training metrics over the last few slides, for logging."""

    def __init__(self):
        self.rows: list[list[dict]] = []

    def add(self, metrics: list[dict]) -> None:
        self.rows.append(split_transfer(metrics))

    def flush(self) -> dict[str, float]:
        out = {}
        for i in range(len(self.rows[0]) if self.rows else 0):
            stage = [row[i] for row in self.rows]
            for key, name in (("loss_cls", "loss_cls"), ("loss_rec", "loss_rec"), ("correct", "acc"),
                              ("step_s", "step_s")):
                out[f"stage{i + 1}/{name}"] = float(np.mean([m[key] for m in stage]))
            if "wait_s" in stage[0]:  # Ray: time the actor sat idle waiting for its input
                out[f"stage{i + 1}/wait_s"] = float(np.mean([m["wait_s"] for m in stage]))
            if "transfer_s" in stage[0]:  # Ray: its input ready, being serialized, copied and deserialized
                out[f"stage{i + 1}/transfer_s"] = float(np.mean([m["transfer_s"] for m in stage]))
            seen = {int(m.get("replica", 0)) for m in stage}
            for replica in sorted(seen) if seen != {0} else []:
                # Replicas (train.replicas): the stage's series above combine them; each one's pace shows here.
                mine = [m for m in stage if int(m["replica"]) == replica]
                out[f"stage{i + 1}/replica{replica}/step_s"] = float(np.mean([m["step_s"] for m in mine]))
                out[f"stage{i + 1}/replica{replica}/wait_s"] = float(np.mean([m["wait_s"] for m in mine]))
            out[f"stage{i + 1}/lr"] = stage[-1]["lr"]
            out[f"stage{i + 1}/peak_mem_mb"] = max(m["peak_mem_mb"] for m in stage)
        self.rows = []
        return out


def _chunks(records: list, size: int):
    """Consecutive runs of `size` records (all of them when size is 0): checkpoints fall between runs."""
    size = size or len(records) or 1
    return [records[i:i + size] for i in range(0, len(records), size)]


class Trainer:
    """
    Trains the stages of `cfg` on its manifest; `resume=True` continues from run_dir's last checkpoint.

    `parent_run_id` nests the MLflow run under a sweep's parent run; `extra_tags` are added to its tags.
    """

    def __init__(self, cfg: Config, run_dir: Path, resume: bool = False, parent_run_id: str | None = None,
                 extra_tags: dict | None = None):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self._read_manifest(resume)
        if cfg.train.executor == "local":
            resolve_device(cfg.train.device)  # fail on a missing GPU before reading anything
        # model.stream: stage 1 reads each slide by region (data/regions.py), never decoded whole
        by_region = cfg.model.stream != "off"
        self.train_loader = SlideLoader(cfg.data, train=True, seed=cfg.train.seed, by_region=by_region)
        self.valid_loader = SlideLoader(cfg.data, train=False, by_region=by_region)
        self.cfg, self.plan, self.loader_plan = plan_run(cfg, len(self.classes), self.train_set,
                                                         self.manifest.records, self.train_loader, resume)
        self.state = TrainState()
        self._start_executor(resume)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.run_dir / "config.yaml")
        if not resume and self.cfg.train.executor == "ray":
            self._save("last")  # a stage that dies before the first checkpoint restarts from here
        self._start_tracking(resume, parent_run_id, extra_tags)

    def _read_manifest(self, resume: bool) -> None:
        """The manifest's classes and splits, checked before anything starts."""
        cfg = self.cfg
        self.manifest = read_manifest(cfg.data.manifest, cfg.data.classes or None)
        self.classes = self.manifest.classes
        self.train_set, self.valid_set = self.manifest.split("train"), self.manifest.split("valid")
        if not self.train_set or not self.valid_set:
            raise ManifestError(f"manifest {self.manifest.path} needs slides with split=train and split=valid "
                             f"(has {len(self.train_set)} / {len(self.valid_set)}); add rows with those splits")
        missing = self.manifest.missing(cfg.data.cache_dir)
        if missing and cfg.data.on_error == "fail":
            names = ", ".join(f"{r.slide_id} ({r.path})" for r in missing[:5])
            raise ManifestError(f"{len(missing)} slide file(s) of {self.manifest.path} are missing: {names}; "
                                    f"fix the paths or set data.on_error=skip to train without them")
        if cfg.model.pretrained == "none" and not cfg.model.weights and not resume:
            log.warning("%s starts from random init (model.pretrained=none): expect much lower accuracy than from "
                        "ImageNet weights (model.pretrained=imagenet)", cfg.model.backbone)

    def _start_executor(self, resume: bool) -> None:
        """The executor of train.executor; a resumed run's stages and state come from its last checkpoint."""
        if resume:
            ckpt = load_checkpoint(self.ckpt_dir / "last", stages=False)  # checks the folder before Ray starts
        # A resumed run's weights come from its checkpoint: building it must not fetch ImageNet weights again.
        self.executor = make_executor(for_restoring(self.cfg) if resume else self.cfg, len(self.classes))
        if resume:
            self._restore(ckpt.path)
            log.info("resumed %s at epoch %d, slide %d", self.run_dir, self.state.epoch + 1, self.state.position)

    def _start_tracking(self, resume: bool, parent_run_id: str | None, extra_tags: dict | None) -> None:
        """The MLflow run (a resumed run continues its own): params, the planner's prediction, tags."""
        self.logged = _logged_steps(self.run_dir / "metrics.jsonl") if resume else {}
        self.tracker = make_tracker(self.cfg, self.run_dir, resume, parent_run_id)
        self.tracker.log_params(flatten(self.cfg))
        # What the planner predicted (and train.loaders=auto measured), beside what the run will measure. Logged
        # once: MLflow params do not change, and a resume with train.loaders=auto measures afresh.
        if self.plan is not None and not resume:
            self.tracker.log_params({"plan.slides_per_s": round(self.plan.slides_per_s, 4),
                                     "plan.busy": json.dumps([round(b, 3) for b in self.plan.busy])})
        if self.loader_plan is not None and not resume:
            self.tracker.log_params(self.loader_plan.params())
        self.tracker.set_tags({**self._tags(), **(extra_tags or {})})

    def _tags(self) -> dict:
        m, t = self.cfg.model, self.cfg.train
        info = self.executor.info
        devices = [i["device_name"] if i["device"] != "cpu" else "cpu" for i in info] if info else \
            [str(resolve_device(t.device))] * m.k
        return {"executor": t.executor, "k": m.k, "rfr": "on" if m.rfr.enabled else "off", "split": m.split,
                "mode": m.mode, "backbone": m.backbone, "git_commit": git_commit(),
                # what each activation hop really uses (Ray executor), fallbacks included
                "transport": self.executor.transport_summary, "devices_per_stage":
                json.dumps(devices), "blocks_per_stage": json.dumps(m.blocks_per_stage), "run_dir": str(self.run_dir)}

    def _restore(self, path: Path) -> None:
        self.executor.load_stages(path)
        failures = self.state.failures
        self.state = TrainState(**load_checkpoint(path, stages=False).trainer)
        self.state.failures = failures or self.state.failures

    def _log(self, record: dict) -> None:
        # After a stage failure or a --resume, the slides since the last checkpoint are trained again and report
        # the same steps: each metric is logged once per step, so histories in MLflow have no doubled points.
        step = record["step"]
        new = {k: v for k, v in record.items() if k not in ("step", "epoch") and step > self.logged.get(k, -1)}
        if not new:
            return
        self.logged.update(dict.fromkeys(new, step))
        record = {"step": step, "epoch": record["epoch"], **new}
        with (self.run_dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.tracker.log_metrics({k: v for k, v in record.items() if k != "step"}, step=step)

    def _save(self, name: str) -> None:
        save_checkpoint(self.ckpt_dir / name, self.executor.save_stages, self.cfg.model.k, asdict(self.state),
                        self.cfg, self.classes)

    def _train_epoch(self, epoch: int) -> bool:
        """Train the rest of `epoch`; return False when train.max_slides stopped the run."""
        t, order = self.cfg.train, epoch_order(len(self.train_set), self.cfg.train.seed, epoch)
        records = [self.train_set[i] for i in order[self.state.position:]]
        # train.max_slides, the one place: the pipeline runs ahead of the results, so slides past the limit would
        # train, uncounted, if handed to it; the epoch is cut there instead.
        left = max(0, t.max_slides - self.state.slides_seen) if t.max_slides else len(records) + 1
        limited = len(records) >= left
        records = records[:left]
        position_after = {r.slide_id: self.state.position + n + 1 for n, r in enumerate(records)}
        window, log_every = _Window(), max(1, t.accumulate)
        bar = progress(total=len(order), initial=self.state.position, desc=f"epoch {epoch + 1}/{t.epochs}",
                       unit="slide")
        # The pipeline drains between chunks, so every stage has seen exactly the same slides when it saves.
        chunks = _chunks(records, t.checkpoint_every * t.accumulate)
        for n, chunk in enumerate(chunks):
            last = n == len(chunks) - 1
            if last and not limited:  # validation's slides follow the last ones without a drain
                self.executor.evaluate_next(self.valid_set, self.valid_loader)
            for slide_id, metrics in self.executor.train(chunk, self.train_loader, epoch):
                self.state.position, self.state.slides_seen = position_after[slide_id], self.state.slides_seen + 1
                window.add(metrics)
                bar.update(self.state.position - bar.n)
                bar.set_postfix(loss=f"{metrics[-1]['loss']:.3f}")
                if self.state.slides_seen % log_every == 0:
                    self._log({"step": self.state.slides_seen, "epoch": epoch, **window.flush()})
            if t.checkpoint_every and self.state.position < len(order) and not (last and limited):
                self._save("last")  # (a stop at train.max_slides is saved by the loop)
        bar.close()
        return not limited  # (a skipped slide leaves the limit unreached: the run stops all the same)

    def _validate(self, epoch: int) -> None:
        result = evaluate(self.executor, self.valid_set, self.valid_loader, len(self.classes), desc="validate")
        stages, monitor, k = result["stages"], self.cfg.train.monitor, self.cfg.model.k
        scores = [oriented(monitored(m, monitor), monitor) for m in stages]  # higher is better, a loss too
        plateau = schedule_metric(self.cfg.train)
        self.executor.end_epoch([monitored(m, plateau) for m in stages])  # each stage's schedule, its own metric
        named = by_classifier(result, len(self.classes), k)
        best_stage = best_index(scores)  # ties go to the shallower, cheaper one
        best = classifier_name(best_stage, k)
        record = {f"val/{key}": v for key, v in stages[-1].items()}
        for i, m in enumerate(stages[:-1]):
            record.update({f"val/stage{i + 1}/{key}": v for key, v in m.items()})
        record.update({f"val/ensemble/{key}": v for key, v in named.get("ensemble", {}).items()})
        record["val/best_stage"] = best_stage + 1  # the stage whose classifier validated best (K: H)
        self._log({"step": self.state.slides_seen, "epoch": epoch, **record})
        self.state.history.append({"epoch": epoch + 1, "stages": stages, "ensemble": named.get("ensemble"),
                                   "best_classifier": best})
        log.info("epoch %d validation: %s; best %s", epoch + 1, metrics_line(named), best)
        # The best checkpoint is the epoch where the classifier that will predict validated best.
        selected = choose(self.cfg.predict.classifier, k, best).name
        self._keep_if_best(Candidate(epoch + 1, monitored(named[selected], monitor), named[selected]["loss"]),
                           best, selected)

    def _keep_if_best(self, candidate: Candidate, best: str, selected: str) -> None:
        """Save `candidate`'s epoch as the best checkpoint when the rule picks it (engine/selection.py)."""
        s = self.state
        held = Candidate(s.best_epoch, s.best, s.best_loss) if s.best_epoch > 0 else None
        reason = select(self.cfg.train.monitor, candidate, held)
        if reason is not None:
            s.best, s.best_epoch, s.best_classifier = candidate.score, candidate.epoch, best
            s.best_loss, s.best_reason = candidate.loss, f"{selected}: {reason}"
            log.info("epoch %d is the best so far (%s)", candidate.epoch, s.best_reason)
            self._save("best")

    def _loop(self) -> None:
        while self.state.epoch < self.cfg.train.epochs:
            try:
                if not self._train_epoch(self.state.epoch):  # train.max_slides: keep the mid-epoch position
                    self._save("last")
                    return
                self._validate(self.state.epoch)
            except StageFailure as exc:
                self._recover(exc)
                continue
            self.state.epoch, self.state.position = self.state.epoch + 1, 0
            try:
                self._save("last")
            except StageFailure as exc:  # a stage died while saving: the previous "last" is intact (atomic swap)
                self._recover(exc)

    def _recover(self, exc: Exception) -> None:
        """Reload every stage from the last checkpoint and replay from there, at most train.max_restarts times."""
        failure = {"epoch": self.state.epoch + 1, "slides_seen": self.state.slides_seen, "error": str(exc)}
        self.state.failures.append(failure)
        if len(self.state.failures) > self.cfg.train.max_restarts:
            raise RunFailed(f"a stage failed {len(self.state.failures)} times, more than train.max_restarts="
                            f"{self.cfg.train.max_restarts} (last: {exc}); the last good checkpoint is "
                            f"{self.ckpt_dir / 'last'}: fix the cause and continue with --resume {self.run_dir}")
        log.warning("stage failure (%s); reloading %s and replaying", exc, self.ckpt_dir / "last")
        self.executor.recover(self.ckpt_dir / "last")
        self._restore(self.ckpt_dir / "last")
        log.warning("replaying from epoch %d, slide %d", self.state.epoch + 1, self.state.position)

    def fit(self) -> dict:
        """Run (or finish) the training; return a summary, also written to RUN_DIR/summary.json."""
        start = time.perf_counter()
        try:
            self._loop()
            stats = self.executor.stats()
            completed = self.state.epoch >= self.cfg.train.epochs
            test = self._final_report() if completed else {}
        except BaseException as exc:
            self.executor.close()
            report = self.tracker.finish("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            _report_tracking(report)
            raise
        self.executor.close()  # stops the Ray actors and frees their placement group
        # A bad slide is skipped again every epoch: report each once.
        skipped = list({s.slide_id: s for s in self.train_loader.skipped + self.valid_loader.skipped}.values())
        if skipped:
            names = ", ".join(s.slide_id for s in skipped)
            log.warning("%d slide(s) skipped (data.on_error=skip): %s", len(skipped), names)
        clamped = [s["rfr_clamped"] for s in stats]
        if any(clamped):
            log.warning("RFR patch clamped on small slides, per stage: %s", clamped)
        summary = {
            "run_dir": str(self.run_dir), "completed": completed, "epochs": self.state.epoch,
            "slides_seen": self.state.slides_seen, "best_epoch": self.state.best_epoch,
            "best_classifier": self.state.best_classifier, "best_reason": self.state.best_reason,
            "classifier": choose(self.cfg.predict.classifier, self.cfg.model.k, self.state.best_classifier).name,
            f"best_val_{self.cfg.train.monitor}": self.state.best,
            "last_val": self.state.history[-1]["stages"] if self.state.history else None, "test": test,
            "skipped": [asdict(s) for s in skipped], "rfr_clamped": clamped, "failures": self.state.failures,
            "loader_plan": asdict(self.loader_plan) if self.loader_plan else None,  # train.loaders=auto's measures
            "seconds": time.perf_counter() - start,
        }
        # Written before the artifacts are logged, so MLflow keeps the summary too; written again below with the
        # tracking report, which exists only once the tracker has finished (and is what the file is read for).
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        self._log_artifacts()
        summary["tracking"] = self.tracker.finish("FINISHED")
        _report_tracking(summary["tracking"])
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    def _final_report(self) -> dict:
        """Load the best checkpoint and score it on the test split (or plot validation when there is none)."""
        best = self.ckpt_dir / "best"
        if not best.is_dir():
            return {}
        self.executor.load_stages(best)
        best_val = self.state.history[self.state.best_epoch - 1]["stages"] if self.state.best_epoch > 0 else None
        choice = choose(self.cfg.predict.classifier, self.cfg.model.k, self.state.best_classifier)
        flat = final_report(self.executor, test_set=self.manifest.split("test"), valid_set=self.valid_set,
                            loader=self.valid_loader, classes=self.classes, best_val=best_val, run_dir=self.run_dir,
                            seed=self.cfg.train.seed, heatmaps=self.cfg.train.heatmaps, choice=choice)
        self.tracker.set_tags({"classifier": choice.name, "best_classifier": self.state.best_classifier})
        classifiers_by_epoch(self.state.history, self.run_dir / "plots" / "classifiers_by_epoch.png",
                             self.cfg.train.monitor, self.state.best_epoch)
        if flat:
            self.tracker.log_metrics(flat, step=self.state.slides_seen)
        return flat

    def _log_artifacts(self) -> None:
        for name in ("config.yaml", "summary.json", "metrics.jsonl", "test_metrics.json"):
            if (self.run_dir / name).is_file():
                self.tracker.log_artifact(self.run_dir / name)
        if (self.run_dir / "plots").is_dir():
            self.tracker.log_artifact(self.run_dir / "plots", "plots")
        if (self.ckpt_dir / "best").is_dir():
            self.tracker.log_artifact(self.ckpt_dir / "best", "checkpoint_best")


def _logged_steps(path: Path) -> dict[str, int]:
    """The last step each metric of an earlier run reached (from its metrics.jsonl)."""
    logged: dict[str, int] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # the line a killed run was writing
                continue
            for key in record.keys() - {"step", "epoch"}:
                logged[key] = max(logged.get(key, -1), record["step"])
    return logged


def _report_tracking(report: dict) -> None:
    """Say what tracking could not deliver; silence means everything reached the server."""
    unsent = sum(report.get("unsent", {}).values()) if report else 0
    dropped = sum(report.get("dropped", {}).values()) if report else 0
    if unsent or dropped:
        log.warning("MLflow tracking at %s lost data: not sent %s, refused by the server %s (last error: %s). "
                    "Unsent data is kept in %s%s", report["uri"], report["unsent"], report["dropped"],
                    report["last_error"], report["spill_file"] or "no file",
                    f"; send it once the server is back: distlocal sync {Path(report['spill_file']).parent}"
                    if report["spill_file"] else "")
    elif report.get("run_id"):
        log.info("MLflow run %s at %s: all tracking data sent", report["run_id"], report["uri"])
