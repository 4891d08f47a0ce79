"""
bench inference, deployed: both methods from the slide file on disk to the prediction, the table users compare.

- CLAM + GABMIL (``bench.clam``): tissue segmentation through OpenSlide, the 224 px grid at 5X, every tile read
  with OpenSlide's ``read_region`` and normalised in DataLoader workers, batched ResNet features, GABMIL;
- ours: what ``distlocal predict`` runs per slide: distlocal's reader (tissue found on a small level, only the
  tissue's bounding box decoded from the 5X level), normalisation, F_1 .. F_K and H over the whole crop.
Both read the same file, from the page cache after the first repeat. Synthetic slides are written first as real
pyramidal SVS-like files (``write_bench_slides``), so both pipelines read exactly what they read on a scanner's.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from distlocal.bench.clam import clam_pipeline
from distlocal.bench.patch_mil import PatchMIL
from distlocal.bench.timing import gflops, ours_from_image, seconds, timings
from distlocal.data import SlideLoader, SlideRecord
from distlocal.predictor import Predictor
from distlocal.progress import progress
from distlocal.slides import write_synthetic_slide

__all__ = ["format_deployed", "run_deployed", "write_bench_slides"]

_GABMIL_STEPS = ("tiling_s", "features_s", "wait_s", "prediction_s", "total_s")
_OUR_STEPS = ("read_s", "prediction_s", "forward_s", "total_s")


def write_bench_slides(out_dir: Path, sizes: list[tuple[int, int]], base_magnification: float = 20.0,
                       seed: int = 0) -> list[SlideRecord]:
    """One synthetic slide file per 5X size (tissue on 40-65 % of it), written once and reused by later runs."""
    records = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for height, width in sizes:
        path = out_dir / f"synthetic_{height}x{width}_{base_magnification:g}x_seed{seed}.svs"
        if not path.exists():  # a paper-sized slide takes minutes to paint and compress
            partial = path.with_suffix(".partial")
            write_synthetic_slide(partial, 1, (height, width), (seed, height, width), base_magnification, "detect",
                                  show_progress=True)
            partial.rename(path)
        records.append(SlideRecord(f"{height}x{width}", path.resolve(), -1, "", f"{height}x{width}"))
    return records


def _ours_from_file(predictor: Predictor, loader: SlideLoader, record: SlideRecord) -> tuple[dict, tuple]:
    start = time.perf_counter()
    image = loader.read(record)
    read_s = time.perf_counter() - start
    result = ours_from_image(predictor, loader, image)
    return {"read_s": read_s, "prediction_s": result["prediction_s"], "forward_s": result["forward_s"],
            "total_s": read_s + result["total_s"], "probs": result["probs"]}, image.shape[:2]


def run_deployed(predictor: Predictor, baseline: PatchMIL, records: list[SlideRecord], repeats: int,
                 workers: int) -> list[dict]:
    """Time both pipelines ``repeats`` times on every slide file, alternating; each step's median per slide."""
    cfg = predictor.cfg
    loader = SlideLoader(cfg.data, train=False)
    results = []
    for record in progress(records, desc="bench inference (from the file)", unit="slide"):
        if predictor.device.type == "cuda":  # cuDNN picks its kernels per shape on the first run
            clam_pipeline(baseline, record.path, workers, cfg.data.mean, cfg.data.std)
            _ours_from_file(predictor, loader, record)
        patch_runs, our_runs = [], []
        for _ in range(repeats):
            patch_runs.append(clam_pipeline(baseline, record.path, workers, cfg.data.mean, cfg.data.std))
            run, shape = _ours_from_file(predictor, loader, record)
            our_runs.append(run)
        gabmil = {k: statistics.median(r[k] for r in patch_runs) for k in _GABMIL_STEPS}
        gabmil.update({k: patch_runs[0][k] for k in ("tiles", "grid_tiles", "level", "read_size")})
        ours = {k: statistics.median(r[k] for r in our_runs) for k in _OUR_STEPS}
        work = gflops(predictor, baseline, *shape, gabmil["tiles"])
        for name, timing in (("gabmil", gabmil), ("ours", ours)):
            timing.update(gflop=work[name], gflop_per_s=work[name] / timing["total_s"])
        results.append({"name": record.slide_id, "path": str(record.path), "size": list(shape), "gabmil": gabmil,
                        "ours": ours, "speed_gain": gabmil["total_s"] / ours["total_s"],
                        "gflop_ratio": work["gabmil"] / work["ours"],
                        "runs": {"gabmil": [timings(r) for r in patch_runs],
                                 "ours": [timings(r) for r in our_runs]}})
        print(f"{record.slide_id} from the file: CLAM + GABMIL {gabmil['total_s']:.2f} s ({gabmil['tiles']} tiles), "
              f"ours {ours['total_s']:.2f} s, {results[-1]['speed_gain']:.1f}x", flush=True)
    return results


def format_deployed(report: dict) -> str:
    """Table 3 from the file: per slide, CLAM + GABMIL / ours / speed gain, and where each one's time goes."""
    where = f"{report['device']}" + ("" if report["bf16"] else ", fp32") + f", {report['threads']} threads"
    lines = [f"From the slide file: {where}; {report['backbone']}, K = {report['k']}; CLAM tiles {report['patch']} px "
             f"read with OpenSlide, batch {report['batch']}, {report['workers']} loader worker(s); median of "
             f"{report['repeats']}"]
    header, rule = "| step |", "|---|"
    rows: dict[str, list[str]] = {name: [] for name in (
        "Tiling (segmentation, grid)", "Read (file to 5X tissue crop)", "Features (read, transform, ResNet)",
        "Prediction", "Total", "of which waiting for tiles", "Tiles (kept / grid)", "Compute (GFLOP)",
        "Achieved GFLOP/s")}
    for entry in report["deployed"]:
        g, o = entry["gabmil"], entry["ours"]
        header += f" {entry['name']}: CLAM + GABMIL | Ours | Speed gain |"
        rule += "---|---|---|"
        rows["Tiling (segmentation, grid)"] += [seconds(g["tiling_s"]), "/", "/"]
        rows["Read (file to 5X tissue crop)"] += ["(in features)", seconds(o["read_s"]), "/"]
        rows["Features (read, transform, ResNet)"] += [seconds(g["features_s"]), "/", "/"]
        rows["Prediction"] += [seconds(g["prediction_s"]), seconds(o["prediction_s"]), "/"]
        rows["Total"] += [seconds(g["total_s"]), f"**{seconds(o['total_s'])}**", f"{entry['speed_gain']:.1f}x"]
        rows["of which waiting for tiles"] += [seconds(g["wait_s"]), "-", "-"]
        rows["Tiles (kept / grid)"] += [f"{g['tiles']} / {g['grid_tiles']}", f"crop {entry['size'][0]} x "
                                        f"{entry['size'][1]}", "-"]
        rows["Compute (GFLOP)"] += [f"{g['gflop']:,.0f}", f"{o['gflop']:,.0f}", f"{entry['gflop_ratio']:.2f}x"]
        rows["Achieved GFLOP/s"] += [f"{g['gflop_per_s']:,.0f}", f"{o['gflop_per_s']:,.0f}", "-"]
    lines += [header, rule] + [f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows.items()]
    return "\n".join(lines)
