"""Slides read by region (model.stream): region reads, the 10X prepare, and stage 1 fed region by region."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from distlocal.cli import main
from distlocal.config_load import load_config
from distlocal.data import SlideLoader, read_manifest
from distlocal.data.regions import SlideRegions
from distlocal.model import build_stages
from distlocal.slides import read_slide, write_synthetic_dataset
from distlocal.slides.cache import cache_key, cached_regions, read_cached
from distlocal.slides.region import OriginalRegions, thumbnail


def _boxes(shape: tuple[int, ...]) -> list[tuple[int, int, int, int]]:
    """Regions cut at odd places: one pixel, inner ones across the original's tiles, the crop's far corner, all."""
    h, w = shape[:2]
    return [(0, 1, 0, 1), (5, h - 39, 3, w - 37), (h - 16, h, w - 27, w), (0, h, 0, w)]


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> Path:
    """Two synthetic slides written at 20X (64 x 48 at 5X: level 0 is 256 x 192), read at 10X: a real resample."""
    return write_synthetic_dataset(tmp_path_factory.mktemp("slides"), slides=2, classes=2, size=(64, 48), seed=0)


def _cfg(manifest: Path, *overrides: str):
    return load_config(None, [f"data.manifest={manifest}", "data.magnification=10", *overrides])


@pytest.mark.parametrize("reader", ["tifffile", "openslide"])
def test_original_regions_are_slices_of_the_whole_read(slides: Path, reader: str) -> None:
    """
    At 10X from a 20X slide (area resampling), every region equals the slice of read_slide's crop, also unpickled;
    with OpenSlide too, whose level downsamples are whole numbers here (region.py: the tolerance where they are not).
    """
    record = read_manifest(slides).records[0]
    whole = read_slide(record.path, magnification=10, reader=reader).image
    regions = OriginalRegions.open(record.path, magnification=10, reader=reader)
    assert regions.shape == whole.shape[:2] == (116, 87)
    travelled = pickle.loads(pickle.dumps(regions))  # what a loader sends: the open file stays behind
    regions.close()
    for y0, y1, x0, x1 in _boxes(whole.shape):
        np.testing.assert_array_equal(travelled.read(y0, y1, x0, x1), whole[y0:y1, x0:x1])
    np.testing.assert_array_equal(thumbnail(travelled, 3), whole[::3, ::3])
    with pytest.raises(ValueError, match="not inside the 116 x 87 crop"):
        travelled.read(0, 117, 0, 5)
    travelled.close()


def test_prepare_at_10x_equals_the_whole_read_and_reads_by_region(slides: Path, tmp_path: Path) -> None:
    """`distlocal prepare` at 10X, written band by band, holds read_slide's crop and mask; its entry reads by region."""
    cache = tmp_path / "cache"
    assert main(["prepare", str(slides), "--out", str(cache), "--set", "data.magnification=10"]) == 0
    for record in read_manifest(slides).records:
        whole = read_slide(record.path, magnification=10)
        key = cache_key(record.path, 10.0, None, None)
        cached = read_cached(cache, record.slide_id, key)
        np.testing.assert_array_equal(cached.image, whole.image)
        np.testing.assert_array_equal(cached.mask, whole.mask)
        assert (cached.bbox, cached.magnification) == (whole.bbox, 10.0)
        regions = cached_regions(cache, record.slide_id, key)
        assert regions.shape == whole.image.shape[:2]
        for y0, y1, x0, x1 in _boxes(whole.image.shape):
            np.testing.assert_array_equal(regions.read(y0, y1, x0, x1), whole.image[y0:y1, x0:x1])
        regions.close()
    assert cached_regions(cache, "s", cache_key(record.path, 5.0, None, None)) is None  # other settings: no entry


@pytest.mark.parametrize("train", [True, False], ids=["augmented", "evaluation"])
def test_loader_regions_are_slices_of_the_input_tensor(slides: Path, tmp_path: Path, train: bool) -> None:
    """The loader's SlideRegions (cache, original) are the input tensor's slices, with the same augmentation draws."""
    cfg = _cfg(slides, f"data.cache_dir={tmp_path / 'cache'}")
    records = read_manifest(slides).records
    assert main(["prepare", str(slides), "--out", str(tmp_path / "cache"), "--set", "data.magnification=10"]) == 0
    uncached = _cfg(slides).data
    for data, record in ((cfg.data, records[0]), (uncached, records[1])):
        for epoch in (0, 1, 2):  # a few draws: crops, flips and turns vary
            x = SlideLoader(data, train, seed=4).load(record, epoch)
            regions = SlideLoader(data, train, seed=4, by_region=True).load(record, epoch)
            assert isinstance(regions, SlideRegions)
            assert regions.shape == tuple(x.shape)
            height, width = x.shape[-2:]
            for y0, y1, x0, x1 in ((0, height, 0, width), (7, height - 3, 2, width // 2)):
                torch.testing.assert_close(regions.region(y0, y1, x0, x1), x[..., y0:y1, x0:x1], rtol=0, atol=0)
            regions.close()
        picture = SlideLoader(data, train, by_region=True).picture(record)  # a heatmap's: the thumbnail (step 1)
        np.testing.assert_array_equal(picture, SlideLoader(data, train).read(record))


@pytest.mark.parametrize(("augment", "stem", "mode"), [(True, "keep", "local"), (False, "keep", "local"),
                                                        (True, "recompute", "local"), (False, "recompute", "e2e")],
                         ids=["augmented", "not-augmented", "stem-recomputed", "e2e-stem-recomputed"])
def test_streamed_stage_one_from_regions_equals_from_the_tensor(slides: Path, make_cfg, augment: bool, stem: str,
                                                                mode: str) -> None:
    """
    In float64 a streamed stage-1 step whose stem reads the slide region by region is the step on the decoded
    tensor: loss, output map and every gradient (the stem tiles and the regions they read are the same). With
    model.stream_stem=recompute the stem map is never held: each region of it (a tile's input with its halo, an RFR
    crop) is computed again from the slide's regions where it is read, and the step is the same.
    """
    cfg = make_cfg(f"data.manifest={slides}", f"data.augment={str(augment).lower()}", "model.k=4",
                   "model.backbone=resnet18", "model.split=balanced", "model.stream=on", "model.stream_tile=48",
                   "model.rfr.patch_size=8", f"model.stream_stem={stem}", f"model.mode={mode}")
    record = read_manifest(slides).records[0]
    x = SlideLoader(cfg.data, True, seed=1).load(record, 3)
    regions = SlideLoader(cfg.data, True, seed=1, by_region=True).load(record, 3)
    tiles, results, evaluated = [], [], []
    for source in (x, regions):
        stage = build_stages(cfg, 2)[0]
        modules = stage.net if mode == "e2e" else stage.modules
        modules.double()
        stage.driver_steps = True
        stage.stem_tile_pixels = 40 * 40  # several stem tiles, as a 20X slide has
        if source is regions:
            read = regions.region
            regions.region = lambda *box, read=read: tiles.append(box) or read(*box)
        out, metrics = stage.train_step(source, record.label, (3, record.slide_id))
        grads = {n: p.grad.clone() for n, p in modules.named_parameters() if p.grad is not None}
        results.append((out, metrics, grads))
        evaluated.append(stage.eval_step(source))  # the driver steps: the weights are still the same in both
    assert len(tiles) > 4
    if stem == "keep":
        assert all((y1 - y0) * (x1 - x0) <= 40 * 40 for y0, y1, x0, x1 in tiles)
    else:  # the slide is read again in the backward and for RFR's crops: more reads than one pass's tiles
        assert sum((y1 - y0) * (x1 - x0) for y0, y1, x0, x1 in tiles) > 2 * regions.shape[-2] * regions.shape[-1]
    (out_a, m_a, g_a), (out_b, m_b, g_b) = results
    assert m_b["loss"] == pytest.approx(m_a["loss"], rel=1e-12)
    assert m_a["loss_rec"] > 0 or mode == "e2e"  # E2E has no RFR
    torch.testing.assert_close(out_b, out_a, rtol=1e-12, atol=1e-14)
    assert g_a.keys() == g_b.keys()
    assert len(g_a) > 10
    for name, grad in g_a.items():
        torch.testing.assert_close(g_b[name], grad, rtol=1e-12, atol=1e-14, msg=name)
    for ours, theirs in zip(evaluated[1], evaluated[0], strict=True):  # output map, probabilities, attention
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)



def test_crop_sums_from_the_cache_decode_only_the_border_tiles(tmp_path: Path) -> None:
    """
    A cache entry's tile sums give a crop's exact channel sums (the contrast jitter's mean grey) reading only the
    tiles on the crop's border, for crops with and without whole tiles inside and reaching the short last tiles.
    """
    from distlocal.slides import SlideImage
    from distlocal.slides.cache import write_cached
    from distlocal.slides.region import channel_sums

    image = np.random.default_rng(0).integers(0, 256, (1300, 1700, 3), dtype=np.uint8)
    key = cache_key(tmp_path / "nowhere.svs", 20.0, None, None)
    write_cached(tmp_path, "big", key, SlideImage(image, np.ones(image.shape[:2], bool), 20.0, 0, (0, 0, 1300, 1700)))
    source = cached_regions(tmp_path, "big", key)
    assert source.tile_sums.shape == (3, 4, 3)
    read = source.read
    pixels = []
    source.read = lambda y0, y1, x0, x1: pixels.append((y1 - y0) * (x1 - x0)) or read(y0, y1, x0, x1)
    for y0, y1, x0, x1 in [(0, 1300, 0, 1700), (3, 1297, 10, 1650), (100, 1300, 513, 1700), (600, 700, 5, 900)]:
        pixels.clear()
        expected = image[y0:y1, x0:x1].sum(axis=(0, 1), dtype=np.int64)
        np.testing.assert_array_equal(channel_sums(source, y0, y1, x0, x1), expected)
        assert sum(pixels) < (y1 - y0) * (x1 - x0) or (y1 - y0) < 512  # whole tiles come from the table
    assert sum(pixels) == 100 * 895  # no whole tile inside: read
    source.close()


def test_an_originals_tile_sums_are_made_once_then_only_border_tiles_decode(tmp_path: Path, monkeypatch) -> None:
    """
    Streamed training from an original (no cache): the first load of a slide sums its crop tile by tile in one pass
    and the process keeps the table (data/original_sums.py); a later epoch's mean grey then decodes only the border
    tiles of its augmentation's crop, and equals a full pass's bit for bit. The table does not travel to stage 1.
    """
    from distlocal.data.loader import original_regions
    from distlocal.slides.region import channel_sums

    manifest = write_synthetic_dataset(tmp_path / "big", slides=2, classes=2, size=(400, 400), seed=4)
    record = read_manifest(manifest).records[0]
    cfg = load_config(None, [f"data.manifest={manifest}", "data.magnification=20"]).data
    pixels = []
    read = OriginalRegions.read
    monkeypatch.setattr(OriginalRegions, "read", lambda self, y0, y1, x0, x1: pixels.append((y1 - y0) * (x1 - x0))
                        or read(self, y0, y1, x0, x1))
    loader = SlideLoader(cfg, train=True, seed=0, by_region=True)
    first = loader.regions(record, 0)
    crop = first.source.shape[0] * first.source.shape[1]
    # An edge crop keeps 90-100 % of a side under 3000 px: a whole 512-px tile lies inside it on each axis
    assert min(first.source.shape) > 1024 + 0.1 * max(first.source.shape)
    assert sum(pixels) >= crop  # the one pass
    pixels.clear()
    later = loader.regions(record, 1)
    y0, y1, x0, x1 = later.augmentation.crop
    assert sum(pixels) <= (y1 - y0) * (x1 - x0) - 512 * 512  # a frame of border tiles at most, never the whole crop
    fresh = original_regions(record, cfg)  # no table: a full pass
    assert fresh.tile_sums is None
    assert later.grey == later.augmentation.mean_grey(channel_sums(fresh, *later.augmentation.crop))
    assert pickle.loads(pickle.dumps(later.source)).tile_sums is None
