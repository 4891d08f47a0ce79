"""distlocal stats: a cohort's per-channel mean / std over tissue pixels, written for a config to use."""

import numpy as np
import pytest
import yaml

from distlocal.cli import main
from distlocal.config import DataConfig
from distlocal.config_load import load_config
from distlocal.data import read_manifest
from distlocal.data.loader import read_original
from distlocal.data.stats import channel_stats


def test_stats_are_of_the_tissue_pixels_only(manifest):
    """The numbers equal numpy's mean / std over every train slide's tissue pixels, not the whole crops."""
    records = read_manifest(manifest).split("train")
    slides = [read_original(r, DataConfig()) for r in records]
    tissue = np.concatenate([s.image[s.mask] for s in slides]).astype(np.float64) / 255
    stats = channel_stats(records, DataConfig())
    assert stats.pixels == len(tissue)
    assert stats.mean == pytest.approx(tissue.mean(0), abs=5e-5)  # rounded to 4 decimals
    assert stats.std == pytest.approx(tissue.std(0), abs=5e-5)
    whole = np.concatenate([s.image.reshape(-1, 3) for s in slides]).astype(np.float64) / 255
    assert len(whole) > len(tissue)  # the premise: the crops hold background too


def test_stats_command_writes_numbers_a_config_takes(manifest, tmp_path, capsys):
    """`distlocal stats MANIFEST --out FILE` writes data.mean / data.std and prints --set lines that load."""
    out = tmp_path / "stats.yaml"
    assert main(["stats", str(manifest), "--out", str(out)]) == 0
    data = yaml.safe_load(out.read_text())["data"]
    line = capsys.readouterr().out.splitlines()[-1].split()
    cfg = load_config(None, [line[1], line[3]])
    assert (cfg.data.mean, cfg.data.std) == (data["mean"], data["std"])
    assert data["mean"] != DataConfig().mean


def test_stats_read_band_by_band_from_the_cache_equal_the_originals(manifest, tmp_path, monkeypatch):
    """
    Slides are read band by band (bands of 7 rows here: a 20X crop is never decoded whole), from a prepared cache
    (its tissue mask read by region from the entry's mask page) or from the originals: the same numbers, exactly.
    """
    from dataclasses import replace

    from distlocal.data.loader import entry_key
    from distlocal.data.prepare import prepare_slides
    from distlocal.slides.cache import cached_regions, read_cached

    monkeypatch.setattr("distlocal.slides.region.BAND_BYTES", 3 * 96 * 7)
    records = read_manifest(manifest).split("train")[:3]
    prepare_slides(records, tmp_path / "cache", DataConfig(), workers=1)
    cached = replace(DataConfig(), cache_dir=str(tmp_path / "cache"))
    assert channel_stats(records, cached) == channel_stats(records, DataConfig())
    key = entry_key(records[0], cached)
    source, whole = cached_regions(cached.cache_dir, records[0].slide_id, key), read_cached(
        cached.cache_dir, records[0].slide_id, key, with_mask=True)
    h, w = source.shape
    np.testing.assert_array_equal(source.mask(3, h - 2, 5, w - 1), whole.mask[3:h - 2, 5:w - 1])
    source.close()
