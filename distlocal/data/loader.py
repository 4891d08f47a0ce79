"""
Turn manifest records into normalised slide tensors, loading ahead of compute in threads.

Slide decoding (tifffile / imagecodecs) releases the GIL, so a few threads keep the trainer fed;
`data.prefetch` bounds how many decoded slides wait in memory.
"""

from __future__ import annotations

import logging
import zlib
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from distlocal.config import DataConfig
from distlocal.data.augment import Augmentation, augment, normalise, to_tensor
from distlocal.data.manifest import SlideRecord
from distlocal.data.original_sums import with_tile_sums
from distlocal.data.regions import SlideRegions
from distlocal.slides import SlideError, SlideImage, read_slide
from distlocal.slides.cache import CacheKey, cache_key, cached_regions, read_cached
from distlocal.slides.region import OriginalRegions, RegionSource, channel_sums, thumbnail, thumbnail_step

__all__ = ["SkippedSlide", "SlideLoader", "entry_key", "named_slide_error", "original_regions", "read_original"]

log = logging.getLogger(__name__)
_warned_uncached = False  # one warning per process: a run without `distlocal prepare` would warn per slide


@dataclass(frozen=True)
class SkippedSlide:
    slide_id: str
    path: str
    reason: str


@contextmanager
def named_slide_error(record: SlideRecord) -> Iterator[None]:
    """Any failure inside becomes a SlideError naming the slide (a SlideError names its file already)."""
    try:
        yield
    except SlideError:
        raise
    except Exception as exc:
        raise SlideError(f"slide {record.slide_id} ({record.path}) could not be read: {exc}") from exc


def read_original(record: SlideRecord, cfg: DataConfig) -> SlideImage:
    """Read a manifest record's slide file with the data settings; any failure is a SlideError naming the slide."""
    with named_slide_error(record):
        return read_slide(record.path, magnification=cfg.magnification, level=cfg.level,
                          base_magnification=cfg.base_magnification, reader=cfg.reader)


def original_regions(record: SlideRecord, cfg: DataConfig) -> OriginalRegions:
    """A record's original as a region source (slides/region.py), its read planned with the data settings."""
    with named_slide_error(record):
        return OriginalRegions.open(record.path, magnification=cfg.magnification, level=cfg.level,
                                    base_magnification=cfg.base_magnification, reader=cfg.reader)


def entry_key(record: SlideRecord, cfg: DataConfig) -> CacheKey:
    """The cache key of a manifest record's entry under the data settings (prepare writes it, loaders look it up)."""
    return cache_key(record.path, cfg.magnification, cfg.level, cfg.base_magnification, cfg.reader)


class SlideLoader:
    """
    Loads slides for one purpose (train with augmentation, or evaluation without); ``by_region`` (model.stream on):
    as SlideRegions that stage 1 reads region by region, never decoded whole.
    """

    def __init__(self, cfg: DataConfig, train: bool, seed: int = 0, by_region: bool = False):
        self.cfg, self.train, self.seed, self.by_region = cfg, train, seed, by_region
        self.skipped: list[SkippedSlide] = []  # with data.on_error=skip; reported at the end, never dropped silently

    def load(self, record: SlideRecord, epoch: int = 0) -> torch.Tensor | SlideRegions:
        """
        One slide at the target magnification: a 1 x 3 x H x W normalised float tensor, or with ``by_region`` the
        same input as SlideRegions (data/regions.py).
        """
        if self.by_region:
            return self.regions(record, epoch)
        return self.to_input(self.read(record), record, epoch)

    def regions(self, record: SlideRecord, epoch: int = 0) -> SlideRegions:
        """
        The slide's input read by region: its crop's region source, its augmentation's draws (the same per-slide RNG
        as to_input) and, for the contrast jitter, the mean grey of the crop kept, summed band by band.
        """
        source = self._region_source(record)
        try:
            augmentation, grey = None, 0.0
            if self.train and self.cfg.augment:
                augmentation = Augmentation.draw(source.shape, self._rng(record, epoch))
                with named_slide_error(record):
                    if isinstance(source, OriginalRegions):  # one pass over the crop per process, not per epoch
                        source = with_tile_sums(source, entry_key(record, self.cfg))
                    grey = augmentation.mean_grey(channel_sums(source, *augmentation.crop))
        finally:
            source.close()  # the reader opens it again where it reads (stage 1, perhaps another process)
        return SlideRegions(source, augmentation, grey, self.cfg.mean, self.cfg.std)

    def _region_source(self, record: SlideRecord) -> RegionSource:
        cfg = self.cfg
        if cfg.cache_dir:
            key = entry_key(record, cfg)
            cached = cached_regions(cfg.cache_dir, record.slide_id, key)
            if cached is not None:
                return cached
            _note_uncached(record, cfg.cache_dir)
        return original_regions(record, cfg)

    def _rng(self, record: SlideRecord, epoch: int) -> np.random.Generator:
        # Per-slide RNG from (seed, epoch, slide): the same slide gets the same augmentation however many threads
        # load it, in whatever order, and after a resume.
        return np.random.default_rng([self.seed, epoch, zlib.crc32(record.slide_id.encode())])

    def to_input(self, image: np.ndarray, record: SlideRecord | None = None, epoch: int = 0,
                 device: torch.device | None = None) -> torch.Tensor:
        """
        A read slide (uint8 H x W x 3) as the network's input: augmented when training, then normalised.

        ``record`` seeds the augmentation (training only). ``device``: build the evaluation input there (prediction
        on a GPU); training inputs are made in host memory.
        """
        if self.train and self.cfg.augment:
            if record is None:
                raise ValueError("a training input is augmented per slide: give its SlideRecord")
            x = augment(image, self._rng(record, epoch))
        else:
            x = to_tensor(image, device)
        return normalise(x, self.cfg.mean, self.cfg.std)[None]

    def read(self, record: SlideRecord) -> np.ndarray:
        """The slide's uint8 RGB tissue crop: from `data.cache_dir` when prepared there, else from the original."""
        cfg = self.cfg
        if cfg.cache_dir:
            key = entry_key(record, cfg)
            cached = read_cached(cfg.cache_dir, record.slide_id, key, with_mask=False)
            if cached is not None:
                return cached.image
            _note_uncached(record, cfg.cache_dir)
        return read_original(record, cfg).image

    def picture(self, record: SlideRecord) -> np.ndarray:
        """
        The slide's crop for a heatmap: read whole, or with ``by_region`` only its thumbnail (every
        thumbnail_step-th pixel, read band by band), which the heatmap shows the same.
        """
        if not self.by_region:
            return self.read(record)
        source = self._region_source(record)
        try:
            with named_slide_error(record):
                return thumbnail(source, thumbnail_step(source.shape))
        finally:
            source.close()

    def skip(self, record: SlideRecord, exc: SlideError) -> None:
        """A slide that could not be read: re-raise it (data.on_error=fail) or note it in `skipped` and go on."""
        if self.cfg.on_error == "fail":
            raise exc
        log.warning("skipping slide %s: %s", record.slide_id, exc)
        self.skipped.append(SkippedSlide(record.slide_id, str(record.path), str(exc)))

    def _guarded(self, record: SlideRecord, epoch: int) -> torch.Tensor | SlideRegions | None:
        try:
            return self.load(record, epoch)
        except SlideError as exc:
            self.skip(record, exc)
            return None

    def stream(self, records: Iterable[SlideRecord], epoch: int = 0) -> Iterator[tuple[SlideRecord, torch.Tensor]]:
        """Yield (record, tensor) in order, with up to `data.prefetch` slides loading ahead."""
        with ThreadPoolExecutor(max_workers=self.cfg.prefetch, thread_name_prefix="slide-loader") as pool:
            pending: deque = deque()
            it = iter(records)
            for record in it:
                pending.append((record, pool.submit(self._guarded, record, epoch)))
                if len(pending) >= self.cfg.prefetch:
                    break
            while pending:
                record, future = pending.popleft()
                x = future.result()
                nxt = next(it, None)
                if nxt is not None:
                    pending.append((nxt, pool.submit(self._guarded, nxt, epoch)))
                if x is not None:
                    yield record, x


def _note_uncached(record: SlideRecord, cache_dir: str) -> None:
    global _warned_uncached
    if _warned_uncached:
        log.debug("slide %s is not prepared in %s; reading the original", record.slide_id, cache_dir)
        return
    _warned_uncached = True
    log.warning("slide %s is not prepared in data.cache_dir=%s (or was prepared from another file or with other "
                "read settings): reading the original, which is slower. Run `distlocal prepare MANIFEST --out %s` "
                "to fill the cache (further slides like this are logged at debug level)",
                record.slide_id, cache_dir, cache_dir)
