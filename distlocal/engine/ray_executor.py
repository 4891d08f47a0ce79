"""
The Ray executor: K stage actors training at once, each on a different slide (decoupled greedy learning).

Per slide the driver chains stage_1 -> ... -> stage_K by handing each actor the ObjectRef the previous one
returned (no ray.get between stages), and keeps at most `train.max_inflight` slides in flight. Slides load ahead
of the pipeline in one loader actor that lives as long as the executor (loading.py says why). The driver only ever
fetches the small things: metrics and class probabilities.

With `train.replicas`, a stage is R actors, each on its own device (engine/replicas.py): a slide goes to one of
them, and the driver issues every replicated stage's optimizer step right after the last slide of a window.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError
from ray.util.placement_group import remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from distlocal.config import Config, config_to_dict, stage_replicas
from distlocal.data import SlideLoader, SlideRecord
from distlocal.engine.actor import StageActor, restart_config
from distlocal.engine.faults import ClusterError, GroupFailure, InputFailed, StageFailure, unplaced_out_of_memory
from distlocal.engine.loading import SlideFeed
from distlocal.engine.placement import bundle_order, connect, place_stages
from distlocal.engine.replicas import Schedule
from distlocal.engine.transport import CLOSE_S, Hop, close_group, handshake, log_hops, open_group, plan_hops, summary

__all__ = ["RayExecutor"]

log = logging.getLogger(__name__)


def _fetch(refs, what: str, timeout_s: float | None = None):
    """ray.get that turns a dead actor into StageFailure and a task's own error into that error."""
    try:
        return ray.get(refs, timeout=timeout_s)
    except GetTimeoutError:
        raise ClusterError(f"{what}: no answer within {timeout_s:g} s") from None
    except RayTaskError as exc:
        cause = exc.cause
        if isinstance(cause, InputFailed) and isinstance(refs, list):  # the stage whose error it is, not a later one
            cause = _first_error(refs) or cause
        if (oom := unplaced_out_of_memory(cause, exc, what)) is not None:  # before the stage's own code ran
            raise oom from None
        if isinstance(cause, RayError | GroupFailure):
            raise StageFailure(f"{what}: {cause}") from None
        raise cause from None
    except RayError as exc:  # RayActorError, ObjectLostError, OwnerDiedError, WorkerCrashedError, ...
        raise StageFailure(f"{what}: {type(exc).__name__}: {exc}") from None


def _eval_args(record: SlideRecord) -> tuple:
    return (record.slide_id,)


class _Entering:
    """
    An evaluation entering the pipeline while the training before it drains (evaluate_next): every actor runs its
    calls in order, so each stage evaluates after its own last training step, as it would after a full drain.
    """

    def __init__(self, executor: RayExecutor, records: list[SlideRecord], loader: SlideLoader):
        self.executor, self.loader = executor, loader
        self.ids = [r.slide_id for r in records]
        self.slides = executor._slides(records, loader, 0)
        self.inflight: deque = deque()
        self.n = 0

    def enter_one(self) -> None:
        item = next(self.slides, None)
        if item is not None:
            record, x = item
            self.inflight.append((record.slide_id, self.executor._submit("eval_step", self.n, record, x, _eval_args)))
            self.n += 1


def _first_error(refs: list) -> BaseException | None:
    """The error of the earliest stage that failed on its own (a slide's refs are in stage order)."""
    for ref in refs:
        try:
            ray.get(ref)
        except RayTaskError as exc:
            if not isinstance(exc.cause, InputFailed):
                return exc.cause
        except RayError as exc:
            return exc
    return None


class RayExecutor:
    """Same interface as LocalExecutor; every stage lives in a Ray actor placed by a placement group."""

    def __init__(self, cfg: Config, num_classes: int, actor_cls: type = StageActor):
        connect()
        self.cfg, self.k = cfg, cfg.model.k
        self.replicas = stage_replicas(cfg.train, self.k)
        self.replicated = max(self.replicas) > 1
        # Replicas share a window: with R of them a stage takes up to R slides at once, so more may be in flight.
        self.max_inflight = cfg.train.max_inflight or self.k + max(self.replicas)
        self.schedule = Schedule(self.replicas, cfg.train.accumulate)
        self.generation, self.window, self.steps = 0, 0, []  # replica groups; windows stepped; step refs pending
        self.num_classes = num_classes
        # Actors on other nodes run in their own copy of the working dir: a relative run.dir would mean a
        # different folder on each node. The driver's absolute path is the one every actor uses.
        self.run_dir = Path(cfg.run.dir).resolve()
        config = config_to_dict(cfg)
        config["run"]["dir"] = str(self.run_dir)
        self.config, self.actor_cls = config, actor_cls
        self.actors: list = []  # every actor, stage by stage (replicas of a stage side by side)
        self.stages: list[list] = []  # stage -> its replicas
        self.feed: SlideFeed | None = None
        self.asked: tuple | None = None  # evaluate_next's pass, until training drains
        self.entered: _Entering | None = None  # that pass, entering the pipeline
        self.collective = None  # the collective group's handle (nccl / gloo hops), to destroy it by
        self.group = None
        marker, token = self._write_marker()  # before anything starts: a driver that cannot write there fails at once
        try:  # a sweep runs many children in one driver: a failed start must not keep the GPUs or the actors
            self.group, self.cpus, self.gpus = place_stages(cfg.train, sum(self.replicas), self.replicated)
            self._start_actors()
            self.feed = SlideFeed(cfg.data, self.group, _fetch)  # starts while the stages build their models
            self.info = _fetch([a.info.remote() for a in self.actors], "starting the stage actors")
            self._check_shared_run_dir(marker, token)
            self._form_groups()
        except BaseException:
            self.close()
            raise
        finally:
            marker.unlink(missing_ok=True)
        for info in self.info:
            count = self.replicas[info["stage"] - 1]
            where = f"stage {info['stage']}" + (f" replica {info['replica'] + 1}/{count}" if count > 1 else "")
            log.info("%s on %s (node %s, pid %d): %s (%s), GPU ids %s, activations %s", where, info["node"],
                     info["node_id"][:12], info["pid"], info["device"], info["device_name"], info["gpu_ids"] or "-",
                     info["activation_dtype"])
        self._connect_stages()

    def _start_actors(self) -> None:
        """One actor per replica, each in its own bundle (flat index: stage by stage)."""
        # Direct hops choose their transport per call (.options(tensor_transport)), which the class must allow.
        remote_cls = ray.remote(enable_tensor_transport=self.cfg.train.transport != "object_store")(self.actor_cls)
        # A restarted replica is not in its group: replicas are never restarted by Ray, the executor starts the
        # whole pipeline afresh instead (recover).
        restarts = 0 if self.replicated else self.cfg.train.max_restarts
        self.actors, self.stages = [], []
        bundles = bundle_order(self.group)  # neighbouring stages on one node
        for i, count in enumerate(self.replicas):
            self.stages.append([remote_cls.options(
                num_cpus=self.cpus, num_gpus=self.gpus, max_restarts=restarts, max_task_retries=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self.group, placement_group_bundle_index=bundles[len(self.actors) + r]),
            ).remote(self.config, self.num_classes, i, r, count) for r in range(count)])
            self.actors += self.stages[-1]

    def _form_groups(self) -> None:
        """A torch process group per replicated stage, under a new generation number."""
        self.generation += 1
        for i, replicas in enumerate(self.stages):
            if len(replicas) == 1:
                continue
            where = [(info["node_id"], tuple(info["gpu_ids"])) for info in self.info if info["stage"] == i + 1]
            if self.info[self.actors.index(replicas[0])]["device"].startswith("cuda") and \
                    len(set(where)) < len(where):
                raise ClusterError(
                    f"the {len(replicas)} replicas of stage {i + 1} share GPUs ({[list(w[1]) for w in where]}), but "
                    f"NCCL takes one rank per GPU; give each replica a whole GPU (train.gpus_per_stage=1) or lower "
                    f"train.replicas={self.cfg.train.replicas}")
            wait = self.cfg.train.collective_timeout_s
            address = _fetch(replicas[0].host_group.remote(), f"hosting stage {i + 1}'s replica group", wait)
            _fetch([a.join_group.remote(address, self.generation) for a in replicas],
                   f"forming stage {i + 1}'s replica group (train.collective_timeout_s)", wait)

    def _write_marker(self) -> tuple[Path, str]:
        """A file in run.dir that every stage actor must find (_check_shared_run_dir)."""
        token = secrets.token_hex(8)
        marker = self.run_dir / f".distlocal-shared-{token}"
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            marker.write_text(token)
        except OSError as exc:  # e.g. evaluating a cluster's checkpoint where its /shared/runs does not exist
            raise ClusterError(f"cannot write to run.dir {self.run_dir} ({exc}); the stages keep their checkpoints "
                               f"there: set run.dir to a folder on storage every node shares") from None
        return marker, token

    def _check_shared_run_dir(self, marker: Path, token: str) -> None:
        """Every actor must see the driver's run.dir: checkpoints are written by the actors, read by all."""
        seen = _fetch([a.sees.remote(str(self.run_dir), marker.name, token) for a in self.actors],
                      f"checking that the stages see {self.run_dir}")
        blind = [info for info, ok in zip(self.info, seen, strict=True) if not ok]
        if blind:
            where = ", ".join(f"stage {i['stage']} on node {i['node']} ({i['node_id'][:12]})" for i in blind)
            raise ClusterError(
                f"run.dir {self.run_dir} is not shared: {where} cannot see the file the driver wrote there, so "
                f"checkpoints would scatter over the nodes' own disks; put run.dir on storage every node mounts at "
                f"the same path (NFS, a cluster file system) and pass it as an absolute path")

    def _connect_stages(self) -> None:
        """Choose each hop's transport (see engine/transport.py), build the group it needs, and say what it got."""
        asked = self.cfg.train.transport
        if self.replicated:  # config.py allows only the object store with replicas
            self.collective, self.hops = None, [Hop("object_store", "")] * (self.k - 1)
            return
        self.collective, self.hops = open_group(self.actors, plan_hops(asked, self.info))
        self.hops = handshake(self.actors, self.hops)  # each pair's communicator, built now, while it can fall back
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

    def _slides(self, records: Iterable[SlideRecord], loader: SlideLoader, epoch: int) -> Iterator:
        """(record, ObjectRef of its tensor) in order; loads run `data.prefetch` slides ahead of the pipeline."""
        return self.feed.slides(records, loader, epoch, ahead=loader.cfg.prefetch + self.max_inflight)

    def _route(self, method: str, n: int) -> tuple[list, bool]:
        """The actor of each stage for the n-th slide of a pass, and whether a training window closes after it."""
        if method != "train_step":  # replicas are equal: forward passes go to them in turn
            return [replicas[n % len(replicas)] for replicas in self.stages], False
        route = self.schedule.next()
        return [replicas[r] for replicas, r in zip(self.stages, route.replicas, strict=True)], route.closes

    def _step_window(self) -> None:
        """Every replica of every replicated stage steps: each actor's queue already holds the window's slides."""
        self.window += 1
        self.steps += [a.step.remote(self.window) for replicas in self.stages if len(replicas) > 1 for a in replicas]

    def _wait(self, refs: list, what: str):
        """
        ray.get of `refs`, watching the pending steps meanwhile: a replica stuck in an all-reduce with a dead partner
        would otherwise hide the death until the collective's timeout.
        """
        while self.steps:
            done, self.steps = ray.wait(self.steps, num_returns=len(self.steps), timeout=0)
            _fetch(done, "stepping the replicas")
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0.5)
            if len(ready) == len(refs):
                break
        return _fetch(refs, what)

    def _drain_steps(self) -> None:
        steps, self.steps = self.steps, []
        _fetch(steps, "stepping the replicas")

    def _submit(self, method: str, n: int, record: SlideRecord, x, args, depth: int | None = None) -> list:
        """
        Chain the n-th slide of a pass through stages 1..depth (all by default); the refs of each stage's small
        result.
        """
        outputs = []
        actors, closes = self._route(method, n)
        actors = actors[:depth]
        for i, actor in enumerate(actors):  # x stays an ObjectRef: stage i+1 starts once stage i returns it
            hop = self.hops[i].transport if i < len(actors) - 1 else "object_store"
            if hop != "object_store":
                direct = getattr(actor, f"{method.removesuffix('_step')}_direct")
                x = direct.options(tensor_transport=hop).remote(x, *args(record))
                out = actor.pop_result.remote(record.slide_id)
            else:
                exits = (True,) if i == len(actors) - 1 < self.k - 1 else ()  # early exit: no activation onwards
                x, out = getattr(actor, method).remote(x, *args(record), *exits)
            outputs.append(out)
        if closes and self.replicated:
            self._step_window()
        return outputs

    def _pipeline(self, method: str, slides: Iterator, args, inflight: deque | None = None, n: int = 0,
                  depth: int | None = None) -> Iterator[tuple[str, list]]:
        inflight = deque() if inflight is None else inflight
        for record, x in slides:
            inflight.append((record.slide_id, self._submit(method, n, record, x, args, depth)))
            n += 1
            if len(inflight) >= self.max_inflight:
                slide_id, outputs = inflight.popleft()
                yield slide_id, self._wait(outputs, f"slide {slide_id}")
        following = self._enter_next() if method == "train_step" else None
        while inflight:
            if following is not None:  # one slide of the next pass enters as one of this pass leaves
                following.enter_one()
            slide_id, outputs = inflight.popleft()
            yield slide_id, self._wait(outputs, f"slide {slide_id}")
        self._drain_steps()

    def train(self, records: Iterable[SlideRecord], loader: SlideLoader,
              epoch: int) -> Iterator[tuple[str, list[dict]]]:
        """For each slide, in order, (slide_id, one metrics dict per stage); stages overlap on different slides."""
        self.entered = None  # an evaluation entered before an earlier pass failed: its results are not wanted
        return self._pipeline("train_step", self._slides(records, loader, epoch),
                              lambda r: (r.label, r.slide_id, epoch))

    def evaluate_next(self, records: list[SlideRecord], loader: SlideLoader) -> None:
        """The next call is evaluate(records, loader): its slides enter as the training under way drains."""
        self.asked, self.entered = (list(records), loader), None

    def _enter_next(self) -> _Entering | None:
        if self.asked is None:
            return None
        records, loader = self.asked
        self.asked, self.entered = None, _Entering(self, records, loader)
        return self.entered

    def evaluate(self, records: Iterable[SlideRecord], loader: SlideLoader,
                 depth: int | None = None) -> Iterator[tuple[str, list]]:
        """For each slide (slide_id, class probabilities of stage 1..depth's classifiers), forward only."""
        records = list(records)
        entered, self.entered, self.asked = self.entered, None, None
        if entered is not None and entered.loader is loader and entered.ids == [r.slide_id for r in records] \
                and depth in (None, self.k):
            return self._pipeline("eval_step", entered.slides, _eval_args, entered.inflight, entered.n)
        return self._pipeline("eval_step", self._slides(records, loader, 0), _eval_args, depth=depth)

    def attention(self, records: Iterable[SlideRecord], loader: SlideLoader,
                  depth: int | None = None) -> Iterator[tuple[str, tuple]]:
        """
        For each slide (slide_id, (probabilities, attention map)) of stage ``depth``'s classifier (H's by default);
        one slide at a time (for plots).
        """
        last = (depth or self.k) - 1
        for record, x in self._slides(records, loader, 0):
            for replicas in self.stages[:last]:
                x, _ = replicas[0].eval_step.remote(x, record.slide_id)
            yield record.slide_id, _fetch(self.stages[last][0].attend.remote(x, record.slide_id),
                                          f"slide {record.slide_id}")

    # -- state --------------------------------------------------------------------------------------------------

    def _all(self, method: str, *args, what: str, actors: list | None = None, timeout_s: float | None = None) -> list:
        return _fetch([getattr(a, method).remote(*args) for a in (self.actors if actors is None else actors)], what,
                      timeout_s)

    def _firsts(self) -> list:
        """Rank 0 of every stage: after `_pool` it holds its stage's whole state."""
        return [replicas[0] for replicas in self.stages]

    def end_epoch(self, metrics: list[float]) -> None:
        _fetch([a.end_epoch.remote(m) for replicas, m in zip(self.stages, metrics, strict=True) for a in replicas],
               "ending the epoch")

    def _pool(self) -> None:
        """
        Gather each replicated stage's open window on rank 0 and check that its replicas are equal: rank 0's state
        is then one stage's state, the file one stage would write.
        """
        replicated = [replicas for replicas in self.stages if len(replicas) > 1]
        if not replicated:
            return
        self._drain_steps()
        _fetch([a.pool.remote() for replicas in replicated for a in replicas], "pooling the replicas' gradients")
        for replicas in replicated:
            prints = self._all("fingerprint", what="comparing the replicas", actors=replicas)
            if len(set(prints)) > 1:
                stage = self.stages.index(replicas) + 1
                raise RuntimeError(f"the replicas of stage {stage} differ ({prints}); their steps were not the same "
                                   f"all-reduced update: this is a bug, please report it")

    # Paths are resolved here: an actor would resolve a relative one in its own node's working dir.
    def save_stages(self, directory: Path) -> None:
        """Each stage's rank 0 writes its stage file into `directory` (on storage every node can reach)."""
        directory = Path(directory).resolve()
        self._pool()
        self._all("save", str(directory), what=f"saving a checkpoint to {directory}", actors=self._firsts())

    def load_stages(self, directory: Path) -> None:
        """Every replica loads its stage's file (any replica count); routing resumes at the window's fill."""
        directory = Path(directory).resolve()
        self._drain_steps()
        filled = self._all("load", str(directory), what=f"loading the checkpoint {directory}")
        self.schedule.filled = filled[0]  # every stage counted the same trained slides

    def state_dicts(self) -> list[dict]:
        """Each stage's state, on the CPU (the driver may have no GPU)."""
        self._pool()
        return self._all("state_dict", what="collecting the stages' state", actors=self._firsts())

    def stats(self) -> list[dict]:
        stats = self._all("stats", what="collecting the stages' counters")
        per_stage = [stats[self.actors.index(replicas[0])] for replicas in self.stages]
        return [{"steps": s["steps"], "rfr_clamped": sum(stats[self.actors.index(a)]["rfr_clamped"]
                                                         for a in replicas)}
                for s, replicas in zip(per_stage, self.stages, strict=True)]

    def traces(self) -> list[list[tuple[str, str, float, float]]]:
        """Per actor (stage by stage, replicas side by side), (kind, slide_id, start, end) since the last call."""
        return self._all("pop_trace", what="collecting the stages' traces")

    def recover(self, directory: Path) -> None:
        """After a StageFailure: wait for Ray to restart the dead actors, then reload every stage from `directory`."""
        self.asked = self.entered = None  # an evaluation entered before the failure ran on the lost state
        timeout_s = self.cfg.train.recovery_timeout_s
        if self.replicated:
            self._restart_replicas(directory)
            return
        deadline = time.monotonic() + timeout_s
        for i, actor in enumerate(self.actors):
            while True:  # a restarting actor queues the ping; one that is dead for good keeps failing it
                try:
                    ray.get(actor.ping.remote(), timeout=max(1.0, deadline - time.monotonic()))
                    break
                except (RayActorError, GetTimeoutError) as exc:
                    if time.monotonic() > deadline:
                        raise ClusterError(
                            f"stage {i + 1} did not come back within {timeout_s:g} s ({type(exc).__name__}; "
                            f"train.recovery_timeout_s); Ray restarts an actor at most train.max_restarts="
                            f"{self.cfg.train.max_restarts} times"
                        ) from None
                    time.sleep(0.5)
        self.load_stages(directory)
        self.info = self._all("info", what="restarting the stage actors (train.recovery_timeout_s)",
                              timeout_s=self.cfg.train.recovery_timeout_s)
        # A restarted actor is a new process, perhaps on another node or GPU: the group is built again, and
        # the hops chosen again from where the stages now run.
        self._destroy_collective()
        self._connect_stages()

    def _restart_replicas(self, directory: Path) -> None:
        """
        A dead replica broke its group, and a survivor may wait in an all-reduce: end every actor, start fresh ones
        in the same bundles, form the groups under a new generation, and reload the checkpoint.
        """
        self.steps = []
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.config = restart_config(self.config)  # the checkpoint is loaded next: no weights to fetch again
        self._start_actors()
        self.info = self._all("info", what="restarting the stage actors (train.recovery_timeout_s)",
                              timeout_s=self.cfg.train.recovery_timeout_s)
        self._form_groups()
        self.load_stages(directory)

    def _destroy_collective(self, leave: bool = True) -> None:
        if self.collective is None:
            return
        close_group(self.collective)
        try:
            if leave:
                _fetch([a.leave_collective.remote() for a in self.actors], "leaving the collective group", CLOSE_S)
        except (RayError, StageFailure, ClusterError) as exc:  # a member that died again, or hangs
            log.warning("destroying the %s group: %s", self.collective.backend, exc)
        self.collective = None

    def close(self) -> None:
        try:
            for actor in self.actors:  # first: a member stuck in a transfer would hold up the group's destruction
                ray.kill(actor, no_restart=True)
            self._destroy_collective(leave=False)
        finally:
            if self.feed is not None:
                self.feed.close()
            if self.group is not None:
                remove_placement_group(self.group)
