"""
distlocal bench inference: whole-slide prediction against patch-based GABMIL, in the layout of the paper's Table 3.

Two tables. The first, with slide files (``records``): both methods from the file on disk to the prediction, the
baseline as CLAM + GABMIL reading tiles through OpenSlide (``bench.deployed``, ``bench.clam``). The second, the
compute race below, on the 5X images in memory.

In the compute race both methods start from the same decoded 5X slide in host memory; reading it is the same for
both (it is timed and reported apart, and ``bench io`` measures it). The baseline (``bench.patch_mil``) then tiles,
extracts features and runs GABMIL; ours runs what ``distlocal predict`` runs: normalisation, F_1 .. F_K and H over the
whole slide (exact tiles only where the device is too small). Weights are random unless ``--checkpoint`` is
given: the time of a forward pass does not depend on them.

Every method runs once untimed per slide on CUDA (cuDNN picks its kernels per shape), once on a small crop on the
CPU, then ``repeats`` times, alternating; each step's median is reported.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from distlocal.bench.patch_mil import PATCH, PatchMIL
from distlocal.bench.timing import gflops, ours_from_image, seconds, timings
from distlocal.classifiers import choose
from distlocal.config import Config
from distlocal.data import SlideLoader, SlideRecord
from distlocal.model import build_stages, resolve_device
from distlocal.predictor import Predictor
from distlocal.progress import progress
from distlocal.slides.synthetic_tissue import plan_slide, render_region

__all__ = ["bench_inference", "format_inference", "gflops", "ours_from_image", "slide_images", "synthetic_images"]

_BAND = 1024  # rows rendered at a time: a paper-sized synthetic slide stays a few hundred MB while painted
# On a CPU, ours is also timed as exact tiles of this many input pixels (predict.max_tile_pixels), alternating with
# the whole map, to see which is faster where the maps outgrow the caches.
CPU_TILE_PIXELS = 2048 * 2048


def synthetic_images(sizes: list[tuple[int, int]], seed: int = 0) -> list[dict]:
    """One synthetic 5X slide per size (tissue on 40-65 % of it, as a real scan), rendered band by band."""
    images = []
    for height, width in sizes:
        rng = np.random.default_rng([seed, height, width])  # the same size gives the same slide in any list
        plan = plan_slide((height, width), 1, rng, task="detect")
        image = np.empty((height, width, 3), np.uint8)
        for y0 in range(0, height, _BAND):
            image[y0 : y0 + _BAND] = render_region(plan, 5.0, y0, 0, min(_BAND, height - y0), width, rng)
        images.append({"name": f"{height} x {width}", "image": image, "read_s": None})
    return images


def slide_images(records: list[SlideRecord], cfg: Config) -> list[dict]:
    """The 5X tissue crops of slide files (``predict.slide_records``), read as ``distlocal predict`` reads them."""
    loader = SlideLoader(cfg.data, train=False)
    images = []
    for record in records:
        start = time.perf_counter()
        image = loader.read(record)
        images.append({"name": f"{record.slide_id} ({image.shape[0]} x {image.shape[1]})", "image": image,
                       "read_s": time.perf_counter() - start})
    return images


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def bench_inference(out_dir: Path, images: list[dict], cfg: Config, repeats: int = 3, batch: int = 0,
                    checkpoint: str | None = None, overrides: list[str] = (), records: list | None = None,
                    workers: int | None = None, classifiers: list[str] = ()) -> dict:
    """
    Time both methods on every image (and first from every slide file of ``records``, with ``workers`` tile
    loaders for the baseline); write inference.json and inference.png into ``out_dir``. ``classifiers``: also time
    ours deciding by each of these predict.classifier choices (A_i exits after stage i).
    """
    if checkpoint:
        predictor = Predictor.load(checkpoint, list(overrides), str(resolve_device(cfg.train.device)))
    else:
        classes = cfg.data.classes or ["class0", "class1"]
        device = resolve_device(cfg.train.device)
        predictor = Predictor.from_stages(cfg, classes, build_stages(cfg, len(classes), device), device)
    cfg, device = predictor.cfg, predictor.device
    bf16 = cfg.train.precision == "bf16" and device.type == "cuda"
    batch = batch or (256 if device.type == "cuda" else 32)
    baseline = PatchMIL.build(cfg.model.backbone, len(predictor.classes), device, bf16, batch, cfg.data.mean,
                              cfg.data.std, cfg.train.fold_batchnorm)
    loader = SlideLoader(cfg.data, train=False)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # both methods: the fastest kernels for each shape
    else:
        crop = images[0]["image"][:512, :512]
        baseline(crop)
        ours_from_image(predictor, loader, crop)
    deployed = []
    if records:
        from distlocal.bench.clam import default_workers  # OpenSlide: only where the files are timed
        from distlocal.bench.deployed import run_deployed

        workers = default_workers(device) if workers is None else workers
        deployed = run_deployed(predictor, baseline, records, repeats, workers)
    variants = {c if c != "best" else f"best ({predictor.best_classifier})":
                dataclasses.replace(predictor, choice=choose(c, len(predictor.parts), predictor.best_classifier))
                for c in classifiers}
    results = []
    for item in progress(images, desc="bench inference (in memory)", unit="slide"):
        image = item["image"]
        if device.type == "cuda":
            baseline(image)
            ours_from_image(predictor, loader, image)
        tiled = None
        if device.type == "cpu" and not predictor.max_tile_pixels and image.shape[0] * image.shape[1] > CPU_TILE_PIXELS:
            tiled = dataclasses.replace(predictor, max_tile_pixels=CPU_TILE_PIXELS)
        patch_runs, our_runs, tiled_runs = [], [], []
        for _ in range(repeats):
            patch_runs.append(baseline(image))
            our_runs.append(ours_from_image(predictor, loader, image))
            if tiled is not None:
                tiled_runs.append(ours_from_image(tiled, loader, image))
        gabmil = {k: _median(patch_runs, k) for k in ("tiling_s", "features_s", "prediction_s", "total_s")}
        gabmil.update(tiles=patch_runs[0]["tiles"], grid_tiles=patch_runs[0]["grid_tiles"],
                      tiles_per_s=patch_runs[0]["tiles"] / gabmil["features_s"])
        ours = {k: _median(our_runs, k) for k in ("input_s", "forward_s", "head_s", "prediction_s", "total_s")}
        ours["megapixels_per_s"] = image.shape[0] * image.shape[1] / 1e6 / ours["total_s"]
        if tiled_runs:
            ours.update(tiled_total_s=_median(tiled_runs, "total_s"), tiled_pixels=CPU_TILE_PIXELS)
        work = gflops(predictor, baseline, *image.shape[:2], gabmil["tiles"])
        for name, timing in (("gabmil", gabmil), ("ours", ours)):
            timing.update(gflop=work[name], gflop_per_s=work[name] / timing["total_s"])
        by_classifier = {}
        for label, variant in variants.items():
            runs = [ours_from_image(variant, loader, image) for _ in range(repeats)]
            total = _median(runs, "total_s")
            by_classifier[label] = {
                "total_s": total, "speed_gain": gabmil["total_s"] / total, "stages_run": variant.choice.depth,
                "gflop": gflops(variant, baseline, *image.shape[:2], gabmil["tiles"])["ours"]}
        results.append({"name": item["name"], "size": list(image.shape[:2]), "read_s": item["read_s"],
                        "gabmil": gabmil, "ours": ours, "speed_gain": gabmil["total_s"] / ours["total_s"],
                        "by_classifier": by_classifier,
                        "gflop_ratio": work["gabmil"] / work["ours"],
                        "runs": {"gabmil": [timings(r) for r in patch_runs], "ours": [timings(r) for r in our_runs],
                                 "ours_tiled": [timings(r) for r in tiled_runs]}})
        print(f"{item['name']}: GABMIL {gabmil['total_s']:.2f} s ({gabmil['tiles']} tiles), ours "
              f"{ours['total_s']:.2f} s, {results[-1]['speed_gain']:.1f}x", flush=True)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "threads": torch.get_num_threads(), "backbone": cfg.model.backbone, "mode": cfg.model.mode,
              "k": cfg.model.k, "bf16": bf16, "patch": PATCH, "batch": batch, "repeats": repeats,
              "max_tile_pixels": predictor.max_tile_pixels, "checkpoint": checkpoint, "workers": workers,
              "classifier": predictor.choice.name,
              "deployed": deployed, "images": results}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "inference.json").write_text(json.dumps(report, indent=2))
    from distlocal.plots import deployed_bars, inference_bars

    inference_bars(report, out_dir / "inference.png")
    if deployed:
        deployed_bars(report, out_dir / "inference_deployed.png")
    return report


def format_inference(report: dict) -> str:
    """Table 3's layout: per slide, GABMIL / ours / speed gain for tiling, features, prediction and total."""
    where = f"{report['device']}" + ("" if report["bf16"] else ", fp32") + f", {report['threads']} threads"
    lines = [f"In memory: {where}; {report['backbone']}, K = {report['k']}, ours decided by "
             f"{report.get('classifier', 'H')}; GABMIL tiles {report['patch']} px, "
             f"batch {report['batch']}; median of {report['repeats']}"]
    header, rule = "| step |", "|---|"
    for entry in report["images"]:
        header += f" {entry['name']}: GABMIL | Ours | Speed gain |"
        rule += "---|---|---|"
    rows = {"Tiling": [], "Features": [], "Prediction": [], "Total": [], "Tiles (tissue / grid)": [],
            "Compute (GFLOP)": [], "Achieved GFLOP/s": [], "Read (both, not in total)": [],
            "Ours as exact tiles (CPU), total": []}
    for entry in report["images"]:
        g, o = entry["gabmil"], entry["ours"]
        rows["Tiling"] += [seconds(g["tiling_s"]), "/", "/"]
        rows["Features"] += [seconds(g["features_s"]), "/", "/"]
        rows["Prediction"] += [seconds(g["prediction_s"]), seconds(o["prediction_s"]), "/"]
        rows["Total"] += [seconds(g["total_s"]), f"**{seconds(o['total_s'])}**", f"{entry['speed_gain']:.1f}x"]
        rows["Tiles (tissue / grid)"] += [f"{g['tiles']} / {g['grid_tiles']}", "-", "-"]
        rows["Compute (GFLOP)"] += [f"{g['gflop']:,.0f}", f"{o['gflop']:,.0f}", f"{entry['gflop_ratio']:.2f}x"]
        rows["Achieved GFLOP/s"] += [f"{g['gflop_per_s']:,.0f}", f"{o['gflop_per_s']:,.0f}", "-"]
        read = "-" if entry["read_s"] is None else seconds(entry["read_s"])
        rows["Read (both, not in total)"] += [read, read, "-"]
        tiled = o.get("tiled_total_s")
        rows["Ours as exact tiles (CPU), total"] += ["-", "-" if tiled is None else
                                                     f"{seconds(tiled)} ({math.isqrt(o['tiled_pixels'])}² px tiles)",
                                                     "-" if tiled is None else f"{g['total_s'] / tiled:.1f}x"]
    for name, first in report["images"][0].get("by_classifier", {}).items() if report["images"] else ():
        cells = rows.setdefault(f"Ours deciding by {name} (stages 1..{first['stages_run']}), total", [])
        for entry in report["images"]:
            timing = entry["by_classifier"][name]
            cells += ["-", f"{seconds(timing['total_s'])} ({timing['gflop']:,.0f} GFLOP)",
                      f"{timing['speed_gain']:.1f}x"]
    lines += [header, rule] + [f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows.items()]
    return "\n".join(lines)
