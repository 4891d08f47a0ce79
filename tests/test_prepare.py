"""`distlocal prepare` and the cache of 5X tissue crops: lossless, reused, invalidated, and bad slides."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from distlocal.cli import main
from distlocal.config_load import load_config
from distlocal.data import read_manifest
from distlocal.data.loader import SlideLoader
from distlocal.slides import SlideError, read_slide, write_synthetic_dataset
from distlocal.slides.cache import cache_key, entry_paths, read_cached
from tests.harness import write_manifest_rows


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """Six synthetic pyramidal slides and their manifest, in a folder of the test's own (tests change files)."""
    return write_synthetic_dataset(tmp_path / "slides", slides=6, classes=2, size=(160, 128), seed=3)


def _prepare(manifest: Path, out: Path, *extra: str) -> tuple[int, dict]:
    code = main(["prepare", str(manifest), "--out", str(out), "--workers", "2", *extra])
    return code, json.loads((out / "prepare.json").read_text())


def _rows(manifest: Path) -> list[dict]:
    with manifest.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_prepare_stores_every_slide_losslessly(dataset: Path, tmp_path: Path) -> None:
    """Each cached crop and mask equal what read_slide gives from the original, pixel for pixel."""
    code, report = _prepare(dataset, tmp_path / "cache")
    assert code == 0
    assert (report["prepared"], report["reused"], report["skipped"]) == (6, 0, 0)
    assert report["output_mb"] > 0
    for record in read_manifest(dataset).records:
        original = read_slide(record.path)
        cached = read_cached(tmp_path / "cache", record.slide_id, cache_key(record.path, 5.0, None, None))
        assert cached is not None
        np.testing.assert_array_equal(cached.image, original.image)
        np.testing.assert_array_equal(cached.mask, original.mask)
        assert (cached.bbox, cached.source_level) == (original.bbox, original.source_level)


def test_second_run_reuses_and_force_redoes(dataset: Path, tmp_path: Path) -> None:
    """Running again prepares nothing; --force prepares everything again."""
    _prepare(dataset, tmp_path / "cache")
    assert _prepare(dataset, tmp_path / "cache")[1]["prepared"] == 0
    assert _prepare(dataset, tmp_path / "cache")[1]["reused"] == 6
    assert _prepare(dataset, tmp_path / "cache", "--force")[1]["prepared"] == 6


def test_changed_original_or_settings_make_an_entry_stale(dataset: Path, tmp_path: Path) -> None:
    """A rewritten original is prepared again; other read settings never read an entry made with the old ones."""
    cache = tmp_path / "cache"
    _prepare(dataset, cache)
    record = read_manifest(dataset).records[0]
    stat = record.path.stat()
    os.utime(record.path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    _, report = _prepare(dataset, cache)
    assert (report["prepared"], report["reused"]) == (1, 5)
    assert read_cached(cache, record.slide_id, cache_key(record.path, 2.5, None, None)) is None
    _, report = _prepare(dataset, cache, "--set", "data.magnification=2.5")
    assert report["prepared"] == 6
    cached = read_cached(cache, record.slide_id, cache_key(record.path, 2.5, None, None))
    assert cached is not None
    assert cached.magnification == 2.5


def test_training_loader_reads_the_cache_without_the_originals(dataset: Path, tmp_path: Path) -> None:
    """With data.cache_dir a node that holds only the cache trains on exactly the slides the originals give."""
    cache = tmp_path / "cache"
    _prepare(dataset, cache)
    manifest = read_manifest(dataset)
    cfg = load_config(None, ["data.augment=false"]).data
    expected = [SlideLoader(cfg, train=True).load(r) for r in manifest.records]
    shutil.rmtree(dataset.parent / "slides")
    assert len(manifest.missing()) == 6
    assert manifest.missing(str(cache)) == []
    cached_cfg = load_config(None, ["data.augment=false", f"data.cache_dir={cache}"]).data
    for record, tensor in zip(manifest.records, expected, strict=True):
        assert SlideLoader(cached_cfg, train=True).load(record).equal(tensor)
    with pytest.raises(SlideError, match=r"file not found"):
        SlideLoader(cfg, train=True).load(manifest.records[0])


def test_loader_falls_back_to_the_original_when_not_prepared(dataset: Path, tmp_path: Path) -> None:
    """A slide missing from the cache is read from its original, giving the same tensor."""
    record = read_manifest(dataset).records[0]
    plain = load_config(None, ["data.augment=false"]).data
    cached = load_config(None, ["data.augment=false", f"data.cache_dir={tmp_path / 'empty'}"]).data
    assert SlideLoader(cached, train=False).load(record).equal(SlideLoader(plain, train=False).load(record))


def test_damaged_entry_is_named_and_prepared_again(dataset: Path, tmp_path: Path) -> None:
    """A cache TIFF cut short raises an error naming the slide and the fix; prepare replaces it."""
    cache = tmp_path / "cache"
    _prepare(dataset, cache)
    record = read_manifest(dataset).records[2]
    image, _ = entry_paths(cache, record.slide_id)
    image.write_bytes(image.read_bytes()[:200])
    key = cache_key(record.path, 5.0, None, None)
    with pytest.raises(SlideError, match=rf"cache entry of slide {record.slide_id} is damaged.*--force"):
        read_cached(cache, record.slide_id, key)
    assert _prepare(dataset, cache)[1]["prepared"] == 1
    assert read_cached(cache, record.slide_id, key) is not None


def test_unsafe_slide_ids_get_distinct_files(tmp_path: Path) -> None:
    """Ids with path separators never escape the cache folder, and two ids that sanitise alike stay apart."""
    a, _ = entry_paths(tmp_path, "../a/b")
    b, _ = entry_paths(tmp_path, ".._a_b")
    assert a.parent == b.parent == tmp_path
    assert a != b


def _with_bad_slides(dataset: Path, tmp_path: Path) -> Path:
    rows = _rows(dataset)
    corrupt = tmp_path / "corrupt.svs"
    corrupt.write_bytes(b"II*\x00" + bytes(range(256)) * 8)
    bad = [dict(rows[0], slide_id="corrupt_slide", path=str(corrupt)),
           dict(rows[0], slide_id="missing_slide", path=str(tmp_path / "gone.svs"))]
    return write_manifest_rows(dataset.parent / "bad.csv", rows[:3] + bad + rows[3:])


def test_skip_reports_bad_slides_and_prepares_the_rest(dataset: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    """With data.on_error=skip every good slide is prepared and each bad one is listed with its problem."""
    code, report = _prepare(_with_bad_slides(dataset, tmp_path), tmp_path / "cache", "--set", "data.on_error=skip")
    assert code == 0
    assert (report["prepared"], report["skipped"]) == (6, 2)
    skipped = {row["slide_id"]: row["reason"] for row in _rows(tmp_path / "cache" / "skipped.csv")}
    assert "corrupt or truncated TIFF" in skipped["corrupt_slide"]
    assert "file not found" in skipped["missing_slide"]
    assert "2 slide(s) skipped" in capsys.readouterr().out


def test_fail_stops_keeps_the_work_done_and_continues_later(dataset: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    """The first bad slide stops preparation with an error naming it; a rerun without it does only the rest."""
    manifest = _with_bad_slides(dataset, tmp_path)
    code = main(["prepare", str(manifest), "--out", str(tmp_path / "cache"), "--workers", "1"])
    assert code == 2
    err = capsys.readouterr().err
    for part in ("corrupt.svs", "corrupt or truncated TIFF", "data.on_error=skip"):
        assert part in err
    report = json.loads((tmp_path / "cache" / "prepare.json").read_text())
    assert report["prepared"] == 3  # the slides before the bad one, kept
    write_manifest_rows(manifest, [r for r in _rows(manifest) if not r["slide_id"].endswith("_slide")])
    _, rerun = _prepare(manifest, tmp_path / "cache")
    assert (rerun["prepared"], rerun["reused"], rerun["skipped"]) == (3, 3, 0)


def test_bench_io_measures_every_way(tmp_path: Path) -> None:
    """`bench io` reads a slide six ways (one per reader) in fresh processes; the naive way holds level 0 in memory."""
    main(["bench", "io", "--size", "4096", "4096", "--repeats", "1", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "io.json").read_text())
    ways = result["ways"]
    assert set(ways) == {"distlocal", "distlocal_openslide", "distlocal_dicom", "distlocal_whole", "naive", "cache"}
    assert ways["naive"]["output_shape"] == ways["distlocal_whole"]["output_shape"] == [1024, 1024, 3]
    assert ways["cache"]["output_shape"] == ways["distlocal"]["output_shape"]
    # The kernel updates its peak-RSS figure lazily: allow slack, but the full decode must show.
    assert ways["naive"]["peak_mb"] >= 0.5 * result["level0_rgb_mb"] * 1e6 / 2**20
    assert ways["distlocal_openslide"]["output_shape"] == ways["distlocal"]["output_shape"]
    for way in ("distlocal", "distlocal_openslide", "distlocal_dicom"):
        assert ways[way]["peak_mb"] < ways["naive"]["peak_mb"], way
    assert (tmp_path / "io.png").stat().st_size > 0
    # At 20X (model.stream): prepare writes the crop band by band, the whole read holds it all (48 MB here).
    main(["bench", "io", "--size", "4096", "4096", "--repeats", "1", "--out", str(tmp_path),
          "--ways", "prepare_base,whole_base"])
    base = json.loads((tmp_path / "io.json").read_text())["ways"]
    assert base["prepare_base"]["output_shape"] == base["whole_base"]["output_shape"]
    assert base["prepare_base"]["peak_mb"] < base["whole_base"]["peak_mb"]  # flat in the size: BENCHMARKS.md
