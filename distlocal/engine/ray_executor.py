"""
The Ray executor: K stage actors training at once, each on a different slide (decoupled greedy learning).

This module is the Executor interface over the parts that do the work:
- stage_actors.py starts the actors (one per replica of each stage) in a placement group;
- streaming.py chains each slide through them, at most `train.max_inflight` slides in flight, and handover.py lets
  validation enter while training drains (evaluate_next);
- replica_driver.py routes slides to a stage's replicas (train.replicas) and steps them window by window;
- transport.py chooses how activations travel; recovery.py waits for restarted actors after a failure.
Slides load ahead of the pipeline in train.loaders loader actors that live as long as the executor (loading.py
says why).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

from ray.exceptions import RayError

from distlocal.config import Config, ConfigError, stage_replicas
from distlocal.config_load import config_to_dict
from distlocal.data import SlideLoader, SlideRecord
from distlocal.engine.actor import StageActor
from distlocal.engine.faults import ClusterError, StageFailure
from distlocal.engine.handover import NextPass
from distlocal.engine.loading import SlideFeed
from distlocal.engine.placement import connect
from distlocal.engine.recovery import await_restarts
from distlocal.engine.remote import fetch
from distlocal.engine.replica_driver import ReplicaDriver
from distlocal.engine.stage_actors import StageActors, write_marker
from distlocal.engine.streaming import EVALUATION, TRAINING, SlideStream, evaluation_inputs
from distlocal.engine.transport import (
    CLOSE_S,
    Hop,
    close_group,
    handshake,
    log_hops,
    open_collective_group,
    plan_hops,
    summary,
)
from distlocal.engine.unread import Unread, read_results

__all__ = ["RayExecutor"]

log = logging.getLogger(__name__)


class RayExecutor:
    """Same interface as LocalExecutor; every stage lives in a Ray actor placed by a placement group."""

    def __init__(self, cfg: Config, num_classes: int, actor_cls: type = StageActor):
        if cfg.train.loaders == "auto":  # the trainer resolves it (engine/loader_plan.py); here it would be a guess
            raise ConfigError("train.loaders=auto is set by distlocal train from a probe of the slides against the "
                              "planner's stage times; outside a training run give a number, e.g. train.loaders=2")
        connect()
        self.cfg, self.k = cfg, cfg.model.k
        counts = stage_replicas(cfg.train, self.k)
        # Replicas share a window: with R of them a stage takes up to R slides at once, so more may be in flight.
        self.max_inflight = cfg.train.max_inflight or self.k + max(counts)
        # Actors on other nodes run in their own copy of the working dir: a relative run.dir would mean a
        # different folder on each node. The driver's absolute path is the one every actor uses.
        self.run_dir = Path(cfg.run.dir).resolve()
        config = config_to_dict(cfg)
        config["run"]["dir"] = str(self.run_dir)
        self.actors = StageActors(cfg, config, num_classes, actor_cls, counts)
        self.replicas = ReplicaDriver(self.actors, cfg.train.accumulate)
        self.feed: SlideFeed | None = None
        self.next_pass: NextPass | None = None  # evaluate_next's pass, until evaluate consumes it
        self.collective = None  # the collective group's handle (nccl / gloo hops), to destroy it by
        marker, token = write_marker(self.run_dir)  # before anything starts: a driver that cannot write there fails
        try:  # a sweep runs many children in one driver: a failed start must not keep the GPUs or the actors
            self.actors.place()
            self.actors.start()
            # Starts while the stages build models; bundles in stage order: stage 1's replicas' nodes first.
            self.feed = SlideFeed(cfg.data, self.actors.placement, fetch, cfg.train.loaders, self.actors.bundles)
            self.actors.refresh_info("starting the stage actors")
            self.actors.check_shared_run_dir(self.run_dir, marker, token)
            self.replicas.form_groups()
        except BaseException:
            self.close()
            raise
        finally:
            marker.unlink(missing_ok=True)
        self.actors.log_where()
        self.stream = SlideStream(self.actors, self.replicas, self.feed, self.k, self.max_inflight)
        self._connect_stages()

    @property
    def info(self) -> list[dict]:
        """Where each actor runs, stage by stage, replicas side by side (StageActor.info)."""
        return self.actors.info

    @property
    def hops(self) -> list[Hop]:
        return self.stream.hops

    def _connect_stages(self) -> None:
        """Choose each hop's transport (see engine/transport.py), build the group it needs, and say what it got."""
        asked = self.cfg.train.transport
        if self.replicas.active:  # config.py allows only the object store with replicas
            self.collective, self.stream.hops = None, [Hop("object_store", "")] * (self.k - 1)
            return
        self.collective, self.stream.hops = open_collective_group(self.actors.all, plan_hops(asked, self.info))
        # Each pair's communicator, built now, while its hop can still fall back to the object store.
        self.stream.hops = handshake(self.actors.all, self.hops)
        log_hops(self.hops, asked)

    @property
    def transport(self) -> str | None:
        """The direct transport of the hops (e.g. gloo, cuda_ipc, or cuda_ipc,nccl), or None: the object store."""
        name = summary(self.hops)
        return None if name in ("object_store", "none") else name

    @property
    def transport_summary(self) -> str:
        """For the run's tags: what each hop really uses."""
        return summary(self.hops)

    # -- streaming ----------------------------------------------------------------------------------------------

    def train(self, records: Iterable[SlideRecord], loader: SlideLoader,
              epoch: int) -> Iterator[tuple[str, list[dict]]]:
        """For each slide, in order, (slide_id, one metrics dict per stage); stages overlap on different slides."""
        if self.next_pass is not None and self.next_pass.entered:
            self.next_pass = None  # it entered after an earlier pass, which then failed: its results are not wanted
        records = list(records)
        results = self.stream.run(TRAINING, self.stream.slides(records, loader, epoch),
                                  lambda r: (r.label, r.slide_id, epoch), following=self.next_pass)
        return read_results(results, records, loader)

    def evaluate_next(self, records: list[SlideRecord], loader: SlideLoader) -> NextPass:
        """The next call is evaluate(records, loader): its slides enter as the training under way drains."""
        self.next_pass = NextPass(records, loader)
        return self.next_pass

    def evaluate(self, records: Iterable[SlideRecord], loader: SlideLoader,
                 depth: int | None = None) -> Iterator[tuple[str, list]]:
        """For each slide (slide_id, class probabilities of stage 1..depth's classifiers), forward only."""
        records = list(records)
        next_pass, self.next_pass = self.next_pass, None
        if next_pass is not None and next_pass.serves(records, loader, full_depth=depth in (None, self.k)):
            results = self.stream.run(EVALUATION, next_pass.slides, evaluation_inputs, continuing=next_pass)
        else:
            results = self.stream.run(EVALUATION, self.stream.slides(records, loader, 0), evaluation_inputs,
                                      depth=depth)
        return read_results(results, records, loader)

    def attention(self, records: Iterable[SlideRecord], loader: SlideLoader,
                  depth: int | None = None) -> Iterator[tuple[str, tuple]]:
        """
        For each slide (slide_id, (probabilities, attention map)) of stage ``depth``'s classifier (H's by default);
        one slide at a time (for plots).
        """
        last = (depth or self.k) - 1
        for record, x in self.stream.slides(records, loader, 0):
            earlier = []
            for replicas in self.actors.stages[:last]:
                x, result = replicas[0].eval_step.remote(x, record.slide_id)
                earlier.append(result)
            result = fetch(self.actors.stages[last][0].attend.remote(x, record.slide_id), f"slide {record.slide_id}")
            if isinstance(result, Unread):  # stage 1 could not read it (engine/unread.py): its result has the error
                loader.skip(record, fetch(earlier[0], f"slide {record.slide_id}").error if earlier else result.error)
                continue
            yield record.slide_id, result

    # -- state --------------------------------------------------------------------------------------------------

    def end_epoch(self, metrics: list[float]) -> None:
        fetch([a.end_epoch.remote(m) for replicas, m in zip(self.actors.stages, metrics, strict=True)
               for a in replicas], "ending the epoch")

    # Paths are resolved here: an actor would resolve a relative one in its own node's working dir.
    def save_stages(self, directory: Path) -> None:
        """Each stage's rank 0 writes its stage file into `directory` (on storage every node can reach)."""
        directory = Path(directory).resolve()
        self.replicas.pool()
        self.actors.call("save", str(directory), what=f"saving a checkpoint to {directory}",
                         actors=self.actors.firsts())

    def load_stages(self, directory: Path) -> None:
        """Every replica loads its stage's file (any replica count); routing resumes at the window's fill."""
        directory = Path(directory).resolve()
        self.replicas.drain()
        filled = self.actors.call("load", str(directory), what=f"loading the checkpoint {directory}")
        self.replicas.resume_at(filled[0])  # every stage counted the same trained slides

    def state_dicts(self) -> list[dict]:
        """Each stage's state, on the CPU (the driver may have no GPU)."""
        self.replicas.pool()
        return self.actors.call("state_dict", what="collecting the stages' state", actors=self.actors.firsts())

    def stats(self) -> list[dict]:
        """Each stage's optimizer steps (rank 0's: replicas step together) and RFR clamps (summed over replicas)."""
        stats = self.actors.call("stats", what="collecting the stages' counters")
        of = [[stats[self.actors.all.index(a)] for a in replicas] for replicas in self.actors.stages]
        return [{"steps": mine[0]["steps"], "rfr_clamped": sum(s["rfr_clamped"] for s in mine)} for mine in of]

    def traces(self) -> list[list[tuple[str, str, float, float]]]:
        """Per actor (stage by stage, replicas side by side), (kind, slide_id, start, end) since the last call."""
        return self.actors.call("pop_trace", what="collecting the stages' traces")

    # -- recovery -----------------------------------------------------------------------------------------------

    def recover(self, directory: Path) -> None:
        """After a StageFailure: wait for Ray to restart the dead actors, then reload every stage from `directory`."""
        self.next_pass = None  # an evaluation entered before the failure ran on the lost state
        if self.replicas.active:  # a dead replica broke its group: every actor starts afresh
            self.replicas.restart()
            self.load_stages(directory)
            return
        timeout_s = self.cfg.train.recovery_timeout_s
        await_restarts(self.actors.all, timeout_s, self.cfg.train.max_restarts)
        self.load_stages(directory)
        self.actors.refresh_info("restarting the stage actors (train.recovery_timeout_s)", timeout_s)
        # A restarted actor is a new process, perhaps on another node or GPU: the group is built again, and
        # the hops chosen again from where the stages now run.
        self._destroy_collective()
        self._connect_stages()

    def _destroy_collective(self, leave: bool = True) -> None:
        if self.collective is None:
            return
        close_group(self.collective)
        try:
            if leave:
                self.actors.call("leave_collective", what="leaving the collective group", timeout_s=CLOSE_S)
        except (RayError, StageFailure, ClusterError) as exc:  # a member that died again, or hangs
            log.warning("destroying the %s group: %s", self.collective.backend, exc)
        self.collective = None

    def close(self) -> None:
        try:
            self.actors.kill()  # first: a member stuck in a transfer would hold up the group's destruction
            self._destroy_collective(leave=False)
        finally:
            if self.feed is not None:
                self.feed.close()
            self.actors.release_placement()
