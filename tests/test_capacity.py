"""Slides whose maps cannot fit host memory or the Ray object store are refused before training (issue 28)."""

from __future__ import annotations

import pytest
import ray

from distlocal.config import ConfigError
from distlocal.data import read_manifest
from distlocal.data.prepare import prepare_slides
from distlocal.engine.capacity import check_capacity, slide_shape, slides_in_flight, stage_maps
from distlocal.engine.trainer import Trainer
from distlocal.model.backbone import build_backbone, split_backbone
from distlocal.slides import read_slide
from tests.tiny_run import tiny_run


def test_map_bytes_follow_the_slide_and_the_travelling_dtype(manifest, tmp_path):
    """The shape comes from the file's levels (no decode); maps count in the dtype they travel in: bf16 halves them."""
    record = read_manifest(manifest).records[0]
    cfg = tiny_run(manifest, tmp_path)
    height, width = slide_shape(record, cfg.data)
    image = read_slide(record.path).image
    assert image.shape[0] <= height  # the whole slide bounds its tissue crop
    assert image.shape[1] <= width
    prepare_slides([record], tmp_path / "cache", cfg.data, workers=1)
    cached = tiny_run(manifest, tmp_path, f"data.cache_dir={tmp_path / 'cache'}")
    assert slide_shape(record, cached.data) == image.shape[:2]  # a prepared slide: its crop's, from the JSON
    backbone = build_backbone(cfg.model)
    specs = split_backbone(backbone, cfg.model.k, cfg.model.split, cfg.model.blocks_per_stage)
    fp32 = stage_maps(cfg, specs, (96, 96), backbone.stem_stride)
    assert fp32[0].output == 128 * 8 * 8 * 4  # resnet18's layer2: 128 channels at 1/12
    assert fp32[1].input == fp32[0].output
    assert fp32[0].input == 64 * 16 * 16 * 4 + 3 * 96 * 96 * 4  # the stem's output beside the slide itself
    assert fp32[0].host == fp32[0].input + fp32[0].output
    streamed = stage_maps(tiny_run(manifest, tmp_path, "model.stream=on"), specs, (96, 96), backbone.stem_stride)
    assert streamed[0].input == 64 * 16 * 16 * 4  # read by region: the slide's float input never exists whole
    recomputed = stage_maps(tiny_run(manifest, tmp_path, "model.stream=on", "model.stream_stem=recompute"), specs,
                            (96, 96), backbone.stem_stride)
    assert (recomputed[0].input, recomputed[1].input) == (0, streamed[1].input)  # the stem map is never held
    # Streamed, the classifier's z and its gradient too: layer2 (1/12) opens A_1 with a kernel of 9
    # (model.classifier_kernels), so a 960 px side gives at most 9 x 9 instances of 128 channels
    wide = stage_maps(tiny_run(manifest, tmp_path, "model.stream=on"), specs, (960, 960), backbone.stem_stride)
    assert wide[0].host == wide[0].input + wide[0].output + 2 * 128 * 9 * 9 * 4
    bf16 = stage_maps(tiny_run(manifest, tmp_path, "train.precision=bf16"), specs, (96, 96), backbone.stem_stride)
    assert bf16[0].output * 2 == fp32[0].output
    assert bf16[0].sent == bf16[0].output  # bf16 training sends bf16
    narrow = stage_maps(tiny_run(manifest, tmp_path, "train.activation_dtype=bf16"), specs, (96, 96),
                        backbone.stem_stride)
    assert (narrow[0].output, narrow[0].sent) == (fp32[0].output, fp32[0].output // 2)  # held in fp32, sent in bf16
    assert slides_in_flight(tiny_run(manifest, tmp_path, "train.executor=ray")) == 3  # K + 1


def test_a_slide_too_large_for_host_memory_is_refused_before_training(manifest, tmp_path):
    """train.host_memory_gb below one slide's maps: the error names the slide, stage, bytes and fix; nothing trains."""
    cfg = tiny_run(manifest, tmp_path / "run", "train.host_memory_gb=0.0001")
    with pytest.raises(ConfigError, match=r"slide \S+ \(\d+ x \d+ px at 5X\) cannot train: stage 1's maps need "
                                          r"[\d.]+ MB of host memory .* per slide, x 1 slide\(s\) in flight\), more "
                                          r"than the 0.1 MB it has \(train.host_memory_gb=0.0001\); fix: fewer "
                                          r"stages \(model\.k=2.*data\.magnification \(5 now\)"):
        Trainer(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # no config, checkpoint or metric written


def test_an_uncached_slide_is_refused_on_its_tissue_crop_not_its_whole_size(manifest, tmp_path):
    """
    Without a cache the check first sizes a slide from its file's level dimensions (cheap, an upper bound); before
    refusing, it finds the tissue crop as the loader would. Host memory between the crop's need and the whole
    slide's: trained; below the crop's: refused, the message giving the crop's size.
    """
    cfg = tiny_run(manifest, tmp_path)
    record = min(read_manifest(manifest).records, key=lambda r: slide_shape(r, cfg.data, crop=True))
    whole, crop = slide_shape(record, cfg.data), slide_shape(record, cfg.data, crop=True)
    backbone = build_backbone(cfg.model)
    specs = split_backbone(backbone, cfg.model.k, cfg.model.split, cfg.model.blocks_per_stage)
    need = {shape: max(m.host for m in stage_maps(cfg, specs, shape, backbone.stem_stride)) for shape in (whole, crop)}
    assert need[crop] < need[whole]
    check_capacity(tiny_run(manifest, tmp_path, f"train.host_memory_gb={(need[crop] + need[whole]) / 2e9}"), [record])
    below = f"train.host_memory_gb={need[crop] * 0.9e-9}"
    with pytest.raises(ConfigError, match=rf"slide {record.slide_id} \({crop[0]} x {crop[1]} px at 5X\) cannot train"):
        check_capacity(tiny_run(manifest, tmp_path, below), [record])
    prepare_slides([record], tmp_path / "cache", cfg.data, workers=1)  # cached: its crop's size straight away
    with pytest.raises(ConfigError, match=rf"slide {record.slide_id} \({crop[0]} x {crop[1]} px at 5X\) cannot train"):
        check_capacity(tiny_run(manifest, tmp_path, below, f"data.cache_dir={tmp_path / 'cache'}"), [record])


def test_maps_beyond_the_object_store_are_refused(local_ray, manifest, tmp_path):
    """On Ray, the maps between stages of all slides in flight must fit the object store of the Ray in use."""
    store = ray.cluster_resources()["object_store_memory"]
    per_slide = 128 * 8 * 8 * 4  # stage 1's output of a 96 x 96 slide
    inflight = int(store // per_slide) + 1
    cfg = tiny_run(manifest, tmp_path / "run", "train.executor=ray", f"train.max_inflight={inflight}",
                   "train.host_memory_gb=1e6")
    with pytest.raises(ConfigError, match=rf"stage 1's output maps need [\d.]+ GB of the Ray object store .* x "
                                          rf"{inflight} slide\(s\) in flight\), more than its [\d.]+ GB; fix: "
                                          rf"fewer slides in flight \(train.max_inflight=1; now {inflight}\)"):
        Trainer(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
