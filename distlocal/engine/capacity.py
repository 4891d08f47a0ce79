"""
Host memory and the Ray object store against the slides' maps, checked before training (issue 28).

Streaming bounds a stage's device memory by its tile; what grows with the slide is then host memory. A stage holds
its input and output maps there (streamed: the classifier's reduced map z and z's gradient too, k^2 times smaller;
the output's gradient is made tile by tile, model/stream.py output_gradient), every slide
in flight holds its own, and under the Ray executor each map between stages passes through the object store. A slide
whose maps cannot fit is refused here, naming the slide, the stage, the bytes and the fix, instead of failing
mid-epoch. Sizes come from the prepared cache's metadata or the slide file's level dimensions: nothing is decoded.
The file's dimensions are the whole slide's, an upper bound on its tissue crop: a slide they would refuse is sized
again by its crop, found on a low-resolution level as the loader finds it, and refused only if that does not fit.
Maps are counted in host memory in the dtype a stage computes in (train.precision's) and in the object store in the
dtype they travel in (transport.activation_dtype: train.precision's by default, so bf16 on GPU runs).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from distlocal.config import Config, ConfigError, DataConfig, stage_replicas
from distlocal.data.loader import entry_key, original_regions
from distlocal.data.manifest import SlideRecord
from distlocal.engine.transport import activation_dtype
from distlocal.model.backbone import StageSpec, build_backbone, split_backbone
from distlocal.model.budget import GB, host_memory_bytes
from distlocal.model.build import stage_kernel
from distlocal.slides import SlideError
from distlocal.slides.cache import cached_shape
from distlocal.slides.reader import read_shape

__all__ = ["StageMaps", "check_capacity", "slide_shape", "slides_in_flight", "stage_maps"]

SLIDE_BYTES = 3 * 4  # the loader's normalised slide: 3 channels of fp32 per pixel


@dataclass(frozen=True)
class StageMaps:
    """One stage's maps for one slide, in bytes."""

    stage: int  # 1-based
    input: int  # the stem's output on stage 1 (and the slide, unless read by region), the previous stage's after
    output: int
    reduced: int = 0  # streamed: the classifier's z and its gradient (fp32 at least), beside the output
    sent: int = 0  # the output as it travels (Ray's object store): in train.activation_dtype


    @property
    def host(self) -> int:
        return self.input + self.output + self.reduced


def stage_maps(cfg: Config, specs: list[StageSpec], shape: tuple[int, int], stem_stride: int) -> list[StageMaps]:
    """Each stage's maps for a slide of ``shape`` (height, width) at the read magnification."""
    height, width = shape
    # A stage holds its maps in the dtype it computes in (bf16 under train.precision=bf16, else fp32: model/stage.py
    # held_dtype) and sends its output in train.activation_dtype, which may be narrower (fp32 training, bf16 hops).
    itemsize = 2 if cfg.train.precision == "bf16" else 4
    travels = torch.empty((), dtype=activation_dtype(cfg.train.activation_dtype, cfg.train.precision)).element_size()

    def size(channels: int, stride: int, nbytes: int = itemsize) -> int:
        return channels * math.ceil(height / stride) * math.ceil(width / stride) * nbytes

    # model.stream on or auto: stage 1 reads the slide by region (data/regions.py), its float input never whole
    slide = 0 if cfg.model.stream != "off" else SLIDE_BYTES * height * width
    # model.stream_stem=recompute: stage 1 never holds its stem map (each region is computed where it is read)
    stem_held = not (cfg.model.stream != "off" and cfg.model.stream_stem == "recompute")
    rows = []
    for spec in specs:
        held = size(spec.in_channels, spec.in_stride) if spec.index > 0 or stem_held else 0
        held += slide if spec.index == 0 else 0
        reduced = 0
        if cfg.model.stream != "off":
            z = size(spec.out_channels, spec.out_stride * stage_kernel(cfg, stem_stride, spec))
            reduced = z + z * max(4, itemsize) // itemsize
        rows.append(StageMaps(spec.index + 1, held, size(spec.out_channels, spec.out_stride), reduced,
                              size(spec.out_channels, spec.out_stride, travels)))
    return rows


def slides_in_flight(cfg: Config) -> int:
    """One on the local executor; train.max_inflight (default K + the most replicas of a stage) on Ray."""
    if cfg.train.executor != "ray":
        return 1
    return cfg.train.max_inflight or cfg.model.k + max(stage_replicas(cfg.train, cfg.model.k))


def slide_shape(record: SlideRecord, data: DataConfig, crop: bool = False) -> tuple[int, int] | None:
    """
    The slide's (height, width) at data.magnification: its cached crop's, else the whole slide's from the file's
    level dimensions (its crop is at most that), or with ``crop`` its tissue crop's, found as the loader finds it
    (on a low-resolution level). None for a slide that cannot be opened: the loader reports it.
    """
    try:
        if data.cache_dir:
            key = entry_key(record, data)
            shape = cached_shape(data.cache_dir, record.slide_id, key)
            if shape is not None:
                return shape
        if crop:
            source = original_regions(record, data)
            source.close()
            return source.shape
        return read_shape(record.path, data.magnification, data.level, data.base_magnification, data.reader)
    except (SlideError, OSError):
        return None


def _object_store_bytes() -> float:
    import ray

    from distlocal.engine.placement import connect

    connect()
    return ray.cluster_resources().get("object_store_memory", math.inf)


def _gb(nbytes: float) -> str:
    return f"{nbytes / GB:.3g} GB" if nbytes >= GB / 10 else f"{nbytes / 1e6:.3g} MB"


def check_capacity(cfg: Config, records: list[SlideRecord]) -> None:
    """Refuse, before training, a slide whose maps times the slides in flight exceed host memory or the store."""
    shapes_only = dataclasses.replace(cfg.model, pretrained="none", weights="")  # no download for the shapes
    backbone = build_backbone(shapes_only)
    specs = split_backbone(backbone, cfg.model.k, cfg.model.split, cfg.model.blocks_per_stage)
    inflight = slides_in_flight(cfg)
    host = cfg.train.host_memory_gb * GB if cfg.train.host_memory_gb else host_memory_bytes()
    where = f"train.host_memory_gb={cfg.train.host_memory_gb:g}" if cfg.train.host_memory_gb else "available now"
    store = _object_store_bytes() if cfg.train.executor == "ray" and cfg.model.k > 1 else math.inf
    recompute = cfg.model.stream != "off" and cfg.model.stream_stem == "keep"
    fix = ", ".join([*([f"fewer slides in flight (train.max_inflight=1; now {inflight})"] if inflight > 1 else []),
                     *(["stage 1's stem map recomputed where it is read instead of held (model.stream_stem="
                        "recompute)"] if recompute else []),
                     f"fewer stages (model.k={cfg.model.k}: K + 1 slides in flight by default on Ray)",
                     f"a lower data.magnification ({cfg.data.magnification:g} now)",
                     "or more host memory (train.host_memory_gb)"])
    def refusal(record: SlideRecord, shape: tuple[int, int]) -> str | None:
        slide = f"slide {record.slide_id} ({shape[0]} x {shape[1]} px at {cfg.data.magnification:g}X)"
        for maps in stage_maps(cfg, specs, shape, backbone.stem_stride):
            per_slide = f"{_gb(maps.input)} input + {_gb(maps.output)} output" + (
                f" + {_gb(maps.reduced)} (streamed: the classifier's reduced map and its gradient)"
                if maps.reduced else "")
            if inflight * maps.host > host:
                return (f"{slide} cannot train: stage {maps.stage}'s maps need {_gb(inflight * maps.host)} of host "
                        f"memory ({per_slide} per slide, x {inflight} slide(s) in flight), more than the {_gb(host)} "
                        f"it has ({where}); fix: {fix}")
            if maps.stage < cfg.model.k and inflight * maps.sent > store:
                return (f"{slide} cannot train: stage {maps.stage}'s output maps need {_gb(inflight * maps.sent)} "
                        f"of the Ray object store ({_gb(maps.sent)} per slide, x {inflight} slide(s) in flight), "
                        f"more than its {_gb(store)}; fix: {fix}, or a larger object store (ray start "
                        f"--object-store-memory)")
        return None

    for record in records:
        shape = slide_shape(record, cfg.data)
        problem = None if shape is None else refusal(record, shape)
        if problem is not None:  # an uncached slide's shape is the whole slide's: refuse on its tissue crop only
            crop = slide_shape(record, cfg.data, crop=True)  # (a cached slide's is its crop already: the same)
            if crop is not None and crop != shape:
                problem = refusal(record, crop)
        if problem is not None:
            raise ConfigError(problem)
