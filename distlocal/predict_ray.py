"""
`distlocal predict --executor ray`: one model per device of the cluster, slides handed to whichever is free.

Each PredictActor loads the checkpoint once (its own model, on its GPU or its share of a node's CPUs), reads the
slides it is given from shared storage, writes their heatmaps there and returns only the CSV row; the driver sends
manifest records, never pixels. Scheduling is Ray's ActorPool: a slide goes to the next idle actor and rows come
back as they finish (predict.py puts them in manifest order). ray.data was the other candidate; it suits many
small records batched through a transform, while here each item is a whole slide of very uneven cost, the rows
must reach the driver one by one (the resume log, the progress bar) and a dataset pipeline would add its own
start-up and object-store copies for nothing gained.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import ray
from ray.util import ActorPool

from distlocal.data import SlideRecord
from distlocal.data.loader import SkippedSlide
from distlocal.engine.placement import connect

__all__ = ["PredictActor", "RayPredictors"]

log = logging.getLogger(__name__)


class PredictActor:
    """A thin Ray actor around SlidePredictor (plain PyTorch): the model loaded once, one slide per call."""

    def __init__(self, checkpoint: str, overrides: list[str], device: str, out_dir: str, heatmaps: bool,
                 threads: int):
        import torch

        from distlocal.predict_slide import SlidePredictor
        from distlocal.predictor import Predictor

        torch.set_num_threads(threads)  # its CPU share: actors on one node must not oversubscribe its cores
        self.slides = SlidePredictor(Predictor.load(checkpoint, overrides, device), out_dir, heatmaps)

    def info(self) -> dict:
        return {**self.slides.info(), "node_id": ray.get_runtime_context().get_node_id()}

    def predict(self, record: SlideRecord) -> dict | SkippedSlide:
        return self.slides(record)


class RayPredictors:
    """
    `actors` PredictActors spread over the cluster: by default one per GPU, or, on a cluster without GPUs, one per
    `cpus_per_actor` CPUs.
    """

    def __init__(self, checkpoint: str | Path, overrides: list[str], out_dir: str | Path, heatmaps: bool,
                 actors: int | None = None, cpus_per_actor: int = 1, device: str | None = None,
                 most: int | None = None):
        connect()
        total = ray.cluster_resources()
        gpus = int(total.get("GPU", 0)) if device != "cpu" else 0
        count = actors or (gpus or max(1, int(total.get("CPU", 1)) // cpus_per_actor))
        if most is not None:
            count = max(1, min(count, most))  # no idle models for a short list
        options = {"num_cpus": cpus_per_actor, "num_gpus": 1 if gpus else 0, "scheduling_strategy": "SPREAD"}
        remote = ray.remote(PredictActor).options(**options)
        # Absolute paths: the actors' working folder is not the driver's.
        args = (str(Path(checkpoint).resolve()), list(overrides), "cuda" if gpus else "cpu",
                str(Path(out_dir).resolve()), heatmaps, cpus_per_actor)
        self.actors = [remote.remote(*args) for _ in range(count)]
        infos = ray.get([a.info.remote() for a in self.actors])
        self.info = {**{k: v for k, v in infos[0].items() if k != "node_id"}, "actors": count,
                     "nodes": len({i["node_id"] for i in infos})}
        log.info("predicting with %d model(s) on %d node(s), %s", count, self.info["nodes"], self.info["device"])

    def __call__(self, records: list[SlideRecord]) -> Iterator[dict | SkippedSlide]:
        """Each record's row (or skip), in the order they finish."""
        pool = ActorPool(self.actors)
        yield from pool.map_unordered(lambda actor, record: actor.predict.remote(record), records)

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
