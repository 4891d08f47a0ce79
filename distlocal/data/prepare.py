"""
`distlocal prepare`: read every slide of a manifest once into the cache of tissue crops (data.magnification: 5X,
10X, 20X), in parallel.

Threads, not processes: decoding (imagecodecs) and area resampling (numpy) release the GIL, and each worker holds
one band of a slide's crop (slides/region.py), so even a 20X crop prepares in a band's memory. Slides already
prepared with the same settings are skipped, so an interrupted preparation continues where it stopped.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from distlocal.config import DataConfig
from distlocal.data.loader import SkippedSlide, entry_key, named_slide_error, original_regions
from distlocal.data.manifest import SlideRecord
from distlocal.progress import progress
from distlocal.slides import SlideError
from distlocal.slides.cache import is_cached, write_cached_regions

__all__ = ["PrepareReport", "prepare_one", "prepare_slides", "split_cached", "write_report"]

log = logging.getLogger(__name__)


@dataclass
class PrepareReport:
    prepared: list[str] = field(default_factory=list)  # read from the original and written now
    reused: list[str] = field(default_factory=list)  # already in the cache with the same settings
    skipped: list[SkippedSlide] = field(default_factory=list)  # bad slides under on_error=skip
    seconds: float = 0.0
    megabytes: float = 0.0  # 5X RGB output of the slides prepared now
    readers: dict[str, str] = field(default_factory=dict)  # slide id -> the reader that read it now (data.reader)

    def as_dict(self) -> dict:
        return {"prepared": len(self.prepared), "reused": len(self.reused), "skipped": len(self.skipped),
                "seconds": round(self.seconds, 2), "output_mb": round(self.megabytes, 1),
                "mb_per_s": round(self.megabytes / self.seconds, 2) if self.seconds else None,
                "readers": dict(Counter(self.readers.values())), "reader_of": self.readers,
                "skipped_slides": [s.__dict__ for s in self.skipped]}


def split_cached(records: list[SlideRecord], out_dir: Path, cfg: DataConfig, force: bool,
                 report: PrepareReport) -> list[SlideRecord]:
    """The records still to prepare; those already in `out_dir` with the same settings go to report.reused."""
    todo = []
    for record in records:
        if not force and is_cached(out_dir, record.slide_id, entry_key(record, cfg)):
            report.reused.append(record.slide_id)
        else:
            todo.append(record)
    if report.reused:
        log.info("%d of %d slide(s) already prepared in %s", len(report.reused), len(records), out_dir)
    return todo


def prepare_one(record: SlideRecord, out_dir: Path, cfg: DataConfig) -> tuple[float, str]:
    """
    Read one original region by region into its cache entry: a band of the crop in memory at a time, never the
    whole crop (a 20X crop of the paper's largest slide is 11.7 GB of RGB). Returns (MB of RGB written, reader).
    """
    regions = original_regions(record, cfg)
    try:
        with named_slide_error(record):
            write_cached_regions(out_dir, record.slide_id, entry_key(record, cfg), regions)
    finally:
        regions.close()
    height, width = regions.shape
    return height * width * 3 / 1e6, regions.opened_by


def prepare_slides(records: list[SlideRecord], out_dir: str | Path, cfg: DataConfig, workers: int = 2,
                   force: bool = False) -> PrepareReport:
    """
    Prepare `records` into `out_dir` (`cfg.on_error` decides what a bad slide does) and write the report files.

    With on_error=fail the first bad slide stops the preparation: slides being read finish and are kept, the rest
    are not started, and the SlideError names the bad slide. Run again after fixing it and only the rest is done.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report, start = PrepareReport(), time.perf_counter()
    todo = split_cached(records, out_dir, cfg, force, report)
    failure: SlideError | None = None
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="prepare") as pool, \
            progress(total=len(todo), desc="prepare", unit="slide") as bar:
        queue, running = iter(todo), {}
        while True:
            while failure is None and len(running) < max(1, workers) and (record := next(queue, None)):
                running[pool.submit(prepare_one, record, out_dir, cfg)] = record
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                record = running.pop(future)
                bar.update()
                try:
                    megabytes, reader = future.result()
                    report.megabytes += megabytes
                    report.readers[record.slide_id] = reader
                    report.prepared.append(record.slide_id)
                except SlideError as exc:
                    if cfg.on_error == "fail":
                        failure = failure or exc
                    else:
                        log.warning("skipping slide %s: %s", record.slide_id, exc)
                        report.skipped.append(SkippedSlide(record.slide_id, str(record.path), str(exc)))
            bar.set_postfix(MB_s=f"{report.megabytes / (time.perf_counter() - start):.1f}")
    report.seconds = time.perf_counter() - start
    write_report(out_dir, report)
    if failure is not None:
        raise SlideError(f"{failure}. Preparation stopped ({len(report.prepared)} slide(s) prepared now and kept, "
                         f"{len(todo) - len(report.prepared)} not done); fix or remove the slide and run "
                         f"distlocal prepare again to do the rest, or set data.on_error=skip")
    return report


def write_report(out_dir: Path, report: PrepareReport) -> None:
    (out_dir / "prepare.json").write_text(json.dumps(report.as_dict(), indent=2))
    with (out_dir / "skipped.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["slide_id", "path", "reason"])
        writer.writerows([s.slide_id, s.path, s.reason] for s in report.skipped)

