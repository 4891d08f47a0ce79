"""
`distlocal bench io`: reading a large pyramidal slide to 5X, against decoding its full resolution.

Each way of reading runs in a fresh Python process, so its peak resident memory (ru_maxrss) is its own; the
memory of the process after imports, before the read, is subtracted. Ways:
- ``distlocal``: `read_slide`, as training and `prepare` read an original (5X level, tissue crop, band by band),
  through the tifffile reader that `data.reader: auto` picks for an SVS;
- ``distlocal_openslide``: the same read of the same file through the OpenSlide reader (`data.reader: openslide`),
  as MRXS, NDPI, SCN and Philips TIFF slides are read;
- ``distlocal_dicom``: the same read of the slide converted once to DICOM-WSI (JPEG quality 95, 256-pixel frames,
  by wsidicom's writer), through the DICOM reader, as IDC's TCGA slides are read;
- ``distlocal_whole``: the same without the tissue crop, so the output is the whole slide like the naive read;
- ``naive``: tifffile decodes level 0 in full, then a 4 x 4 (or 8 x 8) block mean gives 5X;
- ``cache``: reading the crop back from the `distlocal prepare` cache, what every epoch after the first costs.
Ways at the scan's own magnification (`--ways`, not run by default; 20X training with model.stream):
- ``prepare_base``: `distlocal prepare` at the base magnification, region by region into a cache entry (a band of
  the crop in memory at a time: slides/region.py);
- ``whole_base``: `read_slide` at the base magnification, the whole crop in memory (what prepare did before).
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["bench_io", "format_io"]

WAYS = ("distlocal", "distlocal_openslide", "distlocal_dicom", "distlocal_whole", "naive", "cache")
BASE_WAYS = ("prepare_base", "whole_base")  # at the scan's magnification: chosen with --ways
_COLOURS = {"distlocal": "#2a7", "distlocal_openslide": "#3b8", "distlocal_dicom": "#4c9", "distlocal_whole": "#5b9",
            "naive": "#c54", "cache": "#58c", "prepare_base": "#76b", "whole_base": "#a58"}


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}: bench io needs Linux")


def _reset_peak() -> None:
    # Linux >= 4.0: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS, so imports (and the
    # memory a forked process starts with) do not count as the read's peak.
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def _measure(way: str, path: str, cache_dir: str, factor: int) -> dict:
    """Read `path` one way in this process; seconds, output size and peak memory above the baseline."""
    import numpy as np
    import tifffile

    from distlocal.slides import read_slide
    from distlocal.slides.cache import cache_key, read_cached

    baseline = _status_mb("VmRSS")
    _reset_peak()
    start = time.perf_counter()
    if way in ("distlocal", "distlocal_whole"):
        image = read_slide(path, crop_tissue=way == "distlocal").image
    elif way == "distlocal_openslide":
        image = read_slide(path, reader="openslide").image
    elif way == "distlocal_dicom":
        image = read_slide(_dicom_folder(Path(path)), reader="dicom").image
    elif way == "cache":
        image = read_cached(cache_dir, "bench", cache_key(path, 5.0, None, None), with_mask=False).image
    elif way == "whole_base":
        image = read_slide(path, magnification=5.0 * factor).image
    elif way == "prepare_base":
        from distlocal.slides.cache import write_cached_regions
        from distlocal.slides.region import OriginalRegions

        regions = OriginalRegions.open(path, magnification=5.0 * factor)
        write_cached_regions(Path(cache_dir) / "base", "bench", cache_key(path, 5.0 * factor, None, None), regions)
        regions.close()
        image = np.empty((*regions.shape, 3), dtype=np.uint8)  # its shape only: never filled, never touched
    else:
        with tifffile.TiffFile(path) as tiff:
            full = tiff.pages[0].asarray()
        h, w = full.shape[0] // factor, full.shape[1] // factor
        image = full[: h * factor, : w * factor].reshape(h, factor, w, factor, 3).mean(axis=(1, 3), dtype=np.float32)
        image = image.round().astype(np.uint8)
    seconds = time.perf_counter() - start
    peak = _status_mb("VmHWM")
    return {"seconds": seconds, "output_shape": list(image.shape), "output_mb": image.nbytes / 1e6,
            "peak_mb": peak - baseline}


def _dicom_folder(path: Path) -> Path:
    return path.with_name(path.stem + "_dicom")


def _write_dicom_copy(path: Path, mpp: float) -> Path:
    from distlocal.slides.dicom_writer import write_dicom_slide
    from distlocal.slides.pyramid import open_pyramid

    folder = _dicom_folder(path)
    if not folder.is_dir():
        print(f"converting {path.name} to DICOM-WSI in {folder} (once) ...", flush=True)
        partial = folder.with_name(folder.name + ".partial")
        with open_pyramid(path) as pyramid:
            write_dicom_slide(pyramid.levels, partial, mpp=mpp)
        partial.rename(folder)
    return folder


def _run_way(way: str, path: Path, cache_dir: Path, factor: int) -> dict:
    code = (f"import json; from distlocal.bench.io import _measure; "
            f"print(json.dumps(_measure({way!r}, {str(path)!r}, {str(cache_dir)!r}, {factor})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"bench io: the {way} read failed (exit {done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_io(out_dir: str | Path, size: tuple[int, int] = (40000, 40000), base_magnification: float = 20.0,
             repeats: int = 3, ways: tuple[str, ...] = WAYS) -> dict:
    """Write (once) a `size` (H x W) synthetic slide at `base_magnification`, then time and measure each read."""
    if min(size) < 1024 or base_magnification < 5 or not math.log2(base_magnification / 5.0).is_integer():
        raise ValueError(f"bench io needs --size of at least 1024 x 1024 and a base magnification of 5 x 2^n "
                         f"(10, 20, 40), got {size} at {base_magnification}")
    factor = round(base_magnification / 5.0)
    from distlocal.slides import read_slide, write_synthetic_slide
    from distlocal.slides.cache import cache_key, is_cached, write_cached

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"bench_{size[0]}x{size[1]}_{base_magnification:g}x.svs"
    if not path.is_file():
        print(f"writing a {size[0]} x {size[1]} synthetic slide at {base_magnification:g}X to {path} (once) ...",
              flush=True)
        partial = path.with_suffix(".partial")
        write_synthetic_slide(partial, 1, (size[0] // factor, size[1] // factor), 0,
                              base_magnification=base_magnification)
        partial.rename(path)
    if "distlocal_dicom" in ways:
        _write_dicom_copy(path, 10.0 / base_magnification)
    cache_dir = out_dir / "cache"
    if "cache" in ways:
        key = cache_key(path, 5.0, None, None)
        if not is_cached(cache_dir, "bench", key):  # kept between runs, like the slide itself
            write_cached(cache_dir, "bench", key, read_slide(path))
    rows = {}
    for way in ways:
        runs = []
        for index in range(repeats):
            runs.append(_run_way(way, path, cache_dir, factor))
            print(f"{way} {index + 1}/{repeats}: {runs[-1]['seconds']:.2f} s, peak {runs[-1]['peak_mb']:.0f} MB",
                  flush=True)
        seconds = statistics.median(r["seconds"] for r in runs)
        rows[way] = {"seconds": seconds, "seconds_all": [r["seconds"] for r in runs],
                     "peak_mb": max(r["peak_mb"] for r in runs), "output_shape": runs[0]["output_shape"],
                     "output_mb": runs[0]["output_mb"], "mb_per_s": runs[0]["output_mb"] / seconds,
                     "slides_per_s": 1.0 / seconds}
    result = {"slide": str(path), "size": size, "base_magnification": base_magnification,
              "file_mb": path.stat().st_size / 1e6, "level0_rgb_mb": size[0] * size[1] * 3 / 1e6,
              "repeats": repeats, "ways": rows}
    (out_dir / "io.json").write_text(json.dumps(result, indent=2))
    _plot(result, out_dir / "io.png")
    return result


def format_io(result: dict) -> str:
    lines = [f"{result['size'][0]} x {result['size'][1]} slide at {result['base_magnification']:g}X "
             f"({result['file_mb']:.0f} MB JPEG file, {result['level0_rgb_mb']:.0f} MB decoded at level 0), "
             f"median of {result['repeats']}:", "",
             "| read | output (5X; the base magnification for *_base) | seconds | MB/s of output | slides/s | peak "
             "memory above baseline |",
             "|---|---|---|---|---|---|"]
    for way, row in result["ways"].items():
        h, w = row["output_shape"][:2]
        lines.append(f"| {way} | {h} x {w} ({row['output_mb']:.0f} MB) | {row['seconds']:.2f} | "
                     f"{row['mb_per_s']:.1f} | {row['slides_per_s']:.3f} | {row['peak_mb']:.0f} MB |")
    return "\n".join(lines)


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ways = list(result["ways"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, label in ((axes[0], "seconds", "seconds per slide"), (axes[1], "peak_mb", "peak MB above baseline")):
        values = [result["ways"][w][key] for w in ways]
        bars = ax.barh(ways, values, color=[_COLOURS[w] for w in ways])
        ax.bar_label(bars, labels=[f"{v:.2f}" if v < 10 else f"{v:.0f}" for v in values], padding=3)
        ax.set_xlabel(label)
        ax.set_xlim(0, max(values) * 1.25 if values and max(values) > 0 else 1)
        ax.invert_yaxis()
    fig.suptitle(f"{result['size'][0]} x {result['size'][1]} at {result['base_magnification']:g}X to 5X "
                 f"(*_base: at {result['base_magnification']:g}X)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

