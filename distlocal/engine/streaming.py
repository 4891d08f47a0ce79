"""
Streaming slides through the stage actors: a slide is chained stage_1 -> ... -> stage_K by handing each actor
the ObjectRef the previous one returned (no ray.get between stages), and at most `max_inflight` slides are in
flight. The driver only ever fetches the small things: metrics and class probabilities, in slide order.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from distlocal.data import SlideLoader, SlideRecord
from distlocal.engine.handover import NextPass
from distlocal.engine.loading import SlideFeed
from distlocal.engine.replica_driver import ReplicaDriver
from distlocal.engine.stage_actors import StageActors
from distlocal.engine.transport import Hop

__all__ = ["EVALUATION", "TRAINING", "PassKind", "SlideStream", "evaluation_inputs"]


@dataclass(frozen=True)
class PassKind:
    """The actor methods a pass calls for each slide."""

    step: str  # through the object store: returns (activation for the next stage, the stage's small result)
    direct: str  # through a direct transport: returns the activation only; the result waits for pop_result
    training: bool


TRAINING = PassKind("train_step", "train_direct", True)
EVALUATION = PassKind("eval_step", "eval_direct", False)

# A pass's slide inputs: the arguments each stage's step takes after the activation.
SlideInputs = Callable[[SlideRecord], tuple]


def evaluation_inputs(record: SlideRecord) -> tuple:
    return (record.slide_id,)


class SlideStream:
    """Submits the slides of a pass to the stages and yields each slide's results as it leaves the pipeline."""

    def __init__(self, actors: StageActors, replicas: ReplicaDriver, feed: SlideFeed, k: int, max_inflight: int):
        self.actors, self.replicas, self.feed, self.k, self.max_inflight = actors, replicas, feed, k, max_inflight
        self.hops: list[Hop] = []  # stage i -> i + 1, chosen by the executor from where the stages run

    def slides(self, records: Iterable[SlideRecord], loader: SlideLoader, epoch: int) -> Iterator:
        """(record, ObjectRef of its tensor) in order; loads run `data.prefetch` slides ahead of the pipeline."""
        return self.feed.slides(records, loader, epoch, ahead=loader.cfg.prefetch + self.max_inflight)

    def submit(self, kind: PassKind, n: int, record: SlideRecord, x, inputs: SlideInputs,
               depth: int | None = None) -> list:
        """
        Chain the n-th slide of a pass through stages 1..depth (all by default); the refs of each stage's small
        result.
        """
        outputs = []
        actors, closes = self.replicas.route(kind.training, n)
        actors = actors[:depth]
        for i, actor in enumerate(actors):  # x stays an ObjectRef: stage i+1 starts once stage i returns it
            last = i == len(actors) - 1
            hop = "object_store" if last else self.hops[i].transport
            if hop != "object_store":
                x = getattr(actor, kind.direct).options(tensor_transport=hop).remote(x, *inputs(record))
                out = actor.pop_result.remote(record.slide_id)
            else:
                early_exit = last and len(actors) < self.k  # no activation onwards: no stage takes it
                x, out = getattr(actor, kind.step).remote(x, *inputs(record), *((True,) if early_exit else ()))
            outputs.append(out)
        if closes:
            self.replicas.step_window()
        return outputs

    def run(self, kind: PassKind, slides: Iterator, inputs: SlideInputs, depth: int | None = None,
            continuing: NextPass | None = None, following: NextPass | None = None) -> Iterator[tuple[str, list]]:
        """
        Each slide's (slide_id, per-stage results) in order. ``continuing``: a pass that entered early, whose slides
        in flight come first; ``following``: a pass that enters as this one drains.
        """
        inflight = continuing.inflight if continuing is not None else deque()
        n = continuing.entered_count if continuing is not None else 0
        for record, x in slides:
            inflight.append((record.slide_id, self.submit(kind, n, record, x, inputs, depth)))
            n += 1
            if len(inflight) >= self.max_inflight:
                slide_id, outputs = inflight.popleft()
                yield slide_id, self.replicas.wait(outputs, f"slide {slide_id}")
        if following is not None:
            following.slides = self.slides(following.records, following.loader, 0)
        while inflight:
            if following is not None:  # one slide of the next pass enters as one of this pass leaves
                self._enter_one(following)
            slide_id, outputs = inflight.popleft()
            yield slide_id, self.replicas.wait(outputs, f"slide {slide_id}")
        self.replicas.drain()

    def _enter_one(self, following: NextPass) -> None:
        item = next(following.slides, None)
        if item is not None:
            record, x = item
            following.inflight.append((record.slide_id, self.submit(EVALUATION, following.entered_count, record, x,
                                                                    evaluation_inputs)))
            following.entered_count += 1
