"""
Synthetic datasets: pyramidal, tiled, JPEG-compressed SVS-like slides and their manifest.

The demo, the tests and the benchmarks need slides that are read exactly like real ones (Aperio metadata, a
pyramid with a 5X level, 256 x 256 JPEG tiles), and a task that needs the whole slide. Slides are painted tile by
tile from a plan (see ``synthetic_tissue``), so even a 40,000 x 40,000 level 0 is written in modest memory.

Example (what ``distlocal synth OUT_DIR --slides 12 --classes 3 --size 512 512 --seed 0`` does):
    >>> manifest = write_synthetic_dataset("data/synth", slides=12, classes=3, size=(512, 512), seed=0)  # doctest: +SKIP
"""  # noqa: E501

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tifffile

from distlocal.slides.synthetic_tissue import MOTIFS, TASKS, SlidePlan, plan_slide, render_region

__all__ = ["write_synthetic_dataset", "write_synthetic_slide"]

_TILE = 256
_JPEG_QUALITY = 90
_THUMBNAIL_SIDE = 768  # the SVS thumbnail page (page 1), as Aperio scanners write one
_SPLITS = ("train", "valid", "test")


def write_synthetic_dataset(out_dir: str | os.PathLike, slides: int, classes: int, size: tuple[int, int], seed: int,
                            base_magnification: float = 20.0,
                            splits: tuple[float, float, float] = (0.6, 0.2, 0.2), task: str = "subtype",
                            fraction: float | None = None, checker: float | None = None) -> Path:
    """
    Write ``slides`` synthetic slides of ``classes`` classes and ``out_dir/manifest.csv``; return its path.

    ``size`` is (rows, cols) of a slide at 5X; the file is written at ``base_magnification`` (level 0 is ``size``
    times ``base_magnification / 5``) with pyramid levels down to below 5X. Classes are balanced and the
    train/valid/test split is stratified by class; everything is deterministic for ``seed``.
    ``task`` is "subtype" (each class its own structure, same ink area), "detect" (class 0 has no structures,
    class c has structure c - 1), "texture" (two classes: smooth or finely textured nodules) or "fine" (the
    texture task at the scale of one 10X pixel: invisible at 5X): see
    ``synthetic_tissue.TASKS``. ``fraction`` (share of the tissue the structures cover) and ``checker`` (the texture
    task's amplitude) make a task harder when smaller; None keeps each task's default.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if slides < 1:
        raise ValueError(f"slides must be at least 1, got {slides}")
    most = {"detect": len(MOTIFS) + 1, "texture": 2, "fine": 2}.get(task, len(MOTIFS))
    if not 1 <= classes <= most:
        raise ValueError(f"classes must be between 1 and {most} for task={task} (structures: "
                         f"{'smooth, textured nodules' if task in ('texture', 'fine') else ', '.join(MOTIFS)}), "
                         f"got {classes}")
    if fraction is not None and not 0 < fraction < 1:
        raise ValueError(f"fraction is the share of the tissue the structures cover, in (0, 1); got {fraction}")
    if len(splits) != 3 or min(splits) < 0 or not math.isclose(sum(splits), 1.0):
        raise ValueError(f"splits must be three non-negative fractions (train, valid, test) summing to 1, got {splits}")
    out_dir = Path(out_dir)
    (out_dir / "slides").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(slides) % classes)
    split_of = _stratified_splits(labels, splits, rng)
    rows = []
    for index, label in enumerate(labels):
        slide_id = f"slide_{index:04d}"
        relative = Path("slides") / f"{slide_id}.tiff"
        write_synthetic_slide(out_dir / relative, int(label), size, (seed, index), base_magnification, task,
                              fraction=fraction, checker=checker)
        rows.append({"slide_id": slide_id, "path": relative.as_posix(), "label": f"class{label}",
                     "split": split_of[index], "patient_id": f"patient_{index:04d}"})
    manifest = out_dir / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["slide_id", "path", "label", "split", "patient_id"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def write_synthetic_slide(path: str | os.PathLike, label: int, size: tuple[int, int], seed: tuple[int, ...] | int,
                          base_magnification: float = 20.0, task: str = "subtype", show_progress: bool = False,
                          fraction: float | None = None, checker: float | None = None) -> Path:
    """
    Write one synthetic slide of class ``label`` (``size`` at 5X) as an SVS-like pyramidal TIFF; ``show_progress``:
    a bar over its tiles (a paper-sized slide at 20X takes minutes).
    """
    ratio = base_magnification / 5.0
    if ratio < 1 or not math.log2(ratio).is_integer():
        raise ValueError(f"base_magnification must be 5 times a power of two (5, 10, 20, 40, ...), got "
                         f"{base_magnification}")
    seed = tuple(np.atleast_1d(seed).tolist())
    plan = plan_slide(size, label, np.random.default_rng([*seed, 0]), task, fraction, checker)
    downsample = 4 if math.log2(ratio) % 2 == 0 else 2  # 20X: 20, 5, 1.25; 40X: 40, 20, 10, 5, 2.5
    height, width = round(size[0] * ratio), round(size[1] * ratio)
    magnifications = [base_magnification]
    while magnifications[-1] >= 5.0:
        magnifications.append(magnifications[-1] / downsample)
    mpp = 10.0 / base_magnification
    header = f"Aperio Image Library v12.0.15 (distlocal synthetic)\r\n{width}x{height} [0,0 {width}x{height}]"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    bar = None
    if show_progress:
        from distlocal.progress import progress

        tiles = sum(math.ceil(height / (f * _TILE)) * math.ceil(width / (f * _TILE))
                    for f in (base_magnification / m for m in magnifications))
        bar = progress(total=tiles, desc=f"writing {path.name}", unit="tile")
    with tifffile.TiffWriter(path, bigtiff=height * width * 3 > 2**32) as tiff:
        for level, magnification in enumerate(magnifications):
            factor = base_magnification / magnification
            shape = (math.ceil(height / factor), math.ceil(width / factor))
            description = (f"{header} ({_TILE}x{_TILE}) JPEG/RGB Q={_JPEG_QUALITY}|AppMag = {base_magnification:g}"
                           f"|MPP = {mpp:g}|Filename = {path.stem}|Class = {label}")
            if level > 0:
                description = f"{header} ({_TILE}x{_TILE}) -> {shape[1]}x{shape[0]} JPEG/RGB Q={_JPEG_QUALITY}"
            tiff.write(_tiles(plan, magnification, shape, (*seed, level + 1), bar), shape=(*shape, 3), dtype=np.uint8,
                       tile=(_TILE, _TILE), **_page_args(description, mpp * factor))
            if level == 0:  # SVS readers expect the thumbnail as the second page
                tiff.write(_thumbnail(plan, seed), description=f"{header} -> thumbnail", **_page_args(None, None))
    if bar is not None:
        bar.close()
    return path


def _page_args(description: str | None, mpp: float | None) -> dict:
    args = {"photometric": "rgb", "compression": "jpeg", "compressionargs": {"level": _JPEG_QUALITY},
            "metadata": None}
    if description is not None:
        args["description"] = description
    if mpp is not None:
        args.update(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
    return args


def _tiles(plan: SlidePlan, magnification: float, shape: tuple[int, int], seed: tuple[int, ...],
           bar=None) -> Iterator[np.ndarray]:
    for y in range(0, shape[0], _TILE):
        for x in range(0, shape[1], _TILE):
            rng = np.random.default_rng([*seed, y // _TILE, x // _TILE])
            tile = render_region(plan, magnification, y, x, _TILE, _TILE, rng)
            if bar is not None:  # before the yield: tifffile stops asking once it has a level's last tile
                bar.update()
            yield tile


def _thumbnail(plan: SlidePlan, seed: tuple[int, ...]) -> np.ndarray:
    magnification = min(5.0, 5.0 * _THUMBNAIL_SIDE / max(plan.shape))
    height, width = (max(1, round(side * magnification / 5.0)) for side in plan.shape)
    rng = np.random.default_rng([*seed, 0, 0])
    bands = [render_region(plan, magnification, y, 0, min(64, height - y), width, rng) for y in range(0, height, 64)]
    return np.concatenate(bands)


def _stratified_splits(labels: np.ndarray, fractions: tuple[float, float, float],
                       rng: np.random.Generator) -> dict[int, str]:
    """Split name per slide index: within each class, shuffled, with counts by largest remainder."""
    split_of: dict[int, str] = {}
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        exact = np.array(fractions) * members.size
        counts = np.floor(exact).astype(int)
        # Ties (2 slides at 0.6/0.2/0.2) go to a random split, so small datasets still get every split.
        for extra in np.lexsort((rng.random(3), counts - exact))[: members.size - counts.sum()]:
            counts[extra] += 1
        bounds = np.cumsum(counts)
        for position, index in enumerate(members):
            split_of[int(index)] = _SPLITS[int(np.searchsorted(bounds, position, side="right"))]
    return split_of
