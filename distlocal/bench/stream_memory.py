"""
distlocal bench memory --stream: each streamed stage's peak against the slide's size, at 5X, 10X and 20X.

Measured: one streamed training step (model.stream=on, tiles of --stream-tile slide pixels) of every stage at K = 4
and of E2E (StreamingCNN's method), at the sizes given (on a CPU two sizes 16x apart in pixels, as 5X to 20X are),
counted as bench memory counts ("model" bytes: autograd's saved bytes, here at their peak, since a streamed step
frees each tile's before the next, plus weights, gradients and AdamW state; CUDA's max allocated where a device is).
A streamed step peaks either in its global part's autograd (the classifier's MLP on the pooled vector and RFR's
crops; GroupNorm and attention run in chunks with z in host memory, model/stream_global.py) or in one tile's or
chunk's rerun: both are measured (SavedTensors' first and later peaks), and neither grows with the slide.

Computed (marked so): the paper's three slides at 5X, 10X and 20X, from the tile's measured bytes and the global
part's measured bytes per pixel (a line through the two sizes); E2E without streaming from its measured whole-slide
bytes per pixel (budget.working_set) and from the paper's Table 2 figure scaled by the pixels; the host memory a
slide's maps need (engine/capacity.py). Also the time of the streamed step against the whole-slide step, per stage,
at the smaller measured size (the overhead is the tiles' rerun forward and their halos).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from distlocal.bench import base_overrides
from distlocal.bench.memory import METHODS, PAPER_SIZES
from distlocal.config_load import load_config
from distlocal.model import build_stages, resolve_device
from distlocal.model.budget import GB, SavedTensors, state_bytes, working_set

__all__ = ["MAGNIFICATIONS", "STREAMED", "bench_stream_memory", "format_stream_memory", "measure_step"]

MAGNIFICATIONS = (5, 10, 20)
PAPER_E2E_GB = {(8698, 7496): 17.89, (12223, 10057): 33.63, (23849, 10257): 78.14}  # Table 2, at 5X
STREAMED = {"k4": METHODS["k4"], "e2e": METHODS["e2e"]}


def _modules(stage):
    return stage.net if hasattr(stage, "net") else stage.modules


def measure_step(stage, x: torch.Tensor, device: torch.device) -> tuple[dict, torch.Tensor]:
    """One training step of ``stage`` on ``x``: its bytes (saved at peak, global / tile split) and its seconds."""
    params = {p.untyped_storage().data_ptr() for p in _modules(stage).parameters()}
    state = sum(state_bytes([_modules(stage)]).values())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    with SavedTensors(exclude=params) as saved:
        out, metrics = stage.train_step(x, 1)
    row = {"stage": stage.spec.index + 1, "streamed": bool(metrics["streamed"]), "state": state,
           "saved_peak": saved.peak, "global": saved.first_peak if metrics["streamed"] else saved.peak,
           "tile": saved.later_peak, "model_total": state + saved.peak, "step_s": time.perf_counter() - start}
    if device.type == "cuda":
        row["cuda_max_allocated"] = torch.cuda.max_memory_allocated(device) - before + state
    return row, out


def _run(cfg, size: tuple[int, int], device: torch.device) -> list[dict]:
    stages = build_stages(cfg, 2, device)
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0)).to(device)
    rows = []
    for stage in stages:
        row, x = measure_step(stage, x, device)
        rows.append(row)
    return rows


def _computed(measured: list[list[dict]], sizes: list[tuple[int, int]], pixels: float) -> list[dict]:
    """
    Each stage at ``pixels``: state + the larger of its global part, on the line through the first and last measured
    sizes, and its tiles' peak at the last size (where, at 3 tiles a side or more, an inner tile with its halo on
    every side is measured: the largest a tile's rerun gets, whatever the slide).
    """
    (p0, p1), rows = (sizes[0][0] * sizes[0][1], sizes[-1][0] * sizes[-1][1]), []
    for small, large in zip(measured[0], measured[-1], strict=True):
        global_bytes = small["global"] + max(0.0, (large["global"] - small["global"]) / (p1 - p0)) * (pixels - p0)
        rows.append({"stage": small["stage"], "global": global_bytes, "tile": large["tile"],
                     "model_total": small["state"] + max(global_bytes, large["tile"]), "computed": True})
    return rows


def bench_stream_memory(out_dir: Path, sizes: list[tuple[int, int]], tile: int, overrides: list[str] = (),
                        device: str = "auto", methods: tuple[str, ...] = tuple(STREAMED)) -> dict:
    """Streamed K = 4 and E2E (``methods``) at ``sizes`` (measured), the paper's slides at 5X / 10X / 20X (computed)."""
    from distlocal.engine.capacity import stage_maps
    from distlocal.model.backbone import build_backbone, split_backbone

    dev = resolve_device(device)
    base = [*base_overrides(dev), "train.accumulate=1", *overrides]
    report = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "tile": tile,
              "precision": load_config(None, base).train.precision, "measured": {}, "computed": [], "time": {}}
    out_dir.mkdir(parents=True, exist_ok=True)
    total, done, start = len(methods) * (len(sizes) + 1), 0, time.perf_counter()
    for name in methods:
        extra = STREAMED[name]
        cfg = load_config(None, [*base, *extra, "model.stream=on", f"model.stream_tile={tile}"])
        report["measured"][name] = []
        for size in sizes:
            print(f"bench memory --stream: {name} at {size[0]} x {size[1]}, tiles of {tile} px ({done + 1}/{total})",
                  flush=True)
            report["measured"][name].append({"size": list(size), "rows": _run(cfg, size, dev)})
            done += 1
            _progress(out_dir, report, done, total, start)
        whole = load_config(None, [*base, *extra])
        print(f"bench memory --stream: {name} whole-slide steps at {sizes[0][0]} x {sizes[0][1]} ({done + 1}/{total})",
              flush=True)
        report["time"][name] = {"size": list(sizes[0]), "whole": _run(whole, sizes[0], dev),
                                "streamed": report["measured"][name][0]["rows"]}
        done += 1
        _progress(out_dir, report, done, total, start)
    # E2E without streaming, computed from its whole-slide step's measured bytes per pixel (two probe steps)
    report["e2e_whole_per_pixel"] = working_set(build_stages(load_config(None, [*base, *STREAMED["e2e"]]), 2,
                                                             dev)[0]).per_pixel
    model = load_config(None, [*base, *STREAMED["k4"], "model.stream=on"])
    backbone = build_backbone(model.model)
    specs = split_backbone(backbone, 4, model.model.split, model.model.blocks_per_stage)
    for height, width in PAPER_SIZES:
        for mag in MAGNIFICATIONS:
            scale = mag / 5
            shape = (round(height * scale), round(width * scale))
            pixels = shape[0] * shape[1]
            entry = {"size_5x": [height, width], "magnification": mag, "size": list(shape),
                     "e2e_whole_gb": report["e2e_whole_per_pixel"] * pixels / GB,
                     "paper_e2e_gb": PAPER_E2E_GB[(height, width)] * scale**2,
                     "host_maps_gb": [m.host / GB for m in stage_maps(model, specs, shape, backbone.stem_stride)]}
            for name in methods:
                measured = [m["rows"] for m in report["measured"][name]]
                entry[name] = _computed(measured, sizes, pixels)
            report["computed"].append(entry)
    report["complete"] = True
    (out_dir / "memory_stream.json").write_text(json.dumps(report, indent=2))
    _plot(report, out_dir / "memory_stream.png")
    return report


def _progress(out_dir: Path, report: dict, done: int, total: int, start: float) -> None:
    (out_dir / "memory_stream.json").write_text(json.dumps(report, indent=2))  # a stopped run keeps what it measured
    elapsed = time.perf_counter() - start
    print(f"bench memory --stream: {done}/{total} done in {elapsed:.0f} s, about "
          f"{elapsed / done * (total - done):.0f} s left", flush=True)


def _largest(rows: list[dict], key: str = "model_total") -> float:
    return max(r[key] for r in rows)


def format_stream_memory(report: dict) -> str:
    """Measured and computed peaks (MB / GB), the growth of the largest stage, and the time of streaming per stage."""
    tile, lines = report["tile"], []
    lines += [f"device: {report['device']}, train.precision {report['precision']}, model.stream_tile={tile} px; "
              "model bytes: autograd's saved bytes at their peak + weights, gradients and AdamW state", "",
              "| size (px) | measured / computed | K=4 stages (MB) | K=4 largest (MB) | E2E streamed (MB) |",
              "|---|---|---|---|---|"]
    e2e_measured = report["measured"].get("e2e")
    for i, k4 in enumerate(report["measured"]["k4"]):
        stages = " / ".join(f"{r['model_total'] / 2**20:,.0f}" for r in k4["rows"])
        e2e = f"{_largest(e2e_measured[i]['rows']) / 2**20:,.0f}" if e2e_measured else "-"
        lines.append(f"| {k4['size'][0]} x {k4['size'][1]} | measured | {stages} | "
                     f"{_largest(k4['rows']) / 2**20:,.0f} | {e2e} |")
    first, last = (report["measured"]["k4"][i]["rows"] for i in (0, -1))
    growth = _largest(last) / _largest(first) - 1
    lines += ["", f"K=4 largest stage, measured: {100 * growth:+.1f} % from the smaller size to the larger", "",
              "| slide (5X) | mag. | size (px) | K=4 stages, streamed (GB, computed) | K=4 largest (GB) | E2E "
              "streamed (GB) | E2E whole-slide (GB, ours per pixel) | E2E whole-slide (GB, paper x pixels) | host "
              "maps per slide, largest stage (GB) |", "|---|---|---|---|---|---|---|---|---|"]
    for entry in report["computed"]:
        stages = " / ".join(f"{r['model_total'] / GB:.2f}" for r in entry["k4"])
        e2e = f"{_largest(entry['e2e']) / GB:.2f}" if "e2e" in entry else "-"
        lines.append(f"| {entry['size_5x'][0]} x {entry['size_5x'][1]} | {entry['magnification']}X | "
                     f"{entry['size'][0]} x {entry['size'][1]} | {stages} | {_largest(entry['k4']) / GB:.2f} | "
                     f"{e2e} | {entry['e2e_whole_gb']:,.0f} | "
                     f"{entry['paper_e2e_gb']:,.0f}"
                     f" | {max(entry['host_maps_gb']):,.1f} |")
    by_slide = {}
    for entry in report["computed"]:
        by_slide.setdefault(tuple(entry["size_5x"]), {})[entry["magnification"]] = _largest(entry["k4"])
    lines += ["", "K=4 largest stage from 5X to 20X (16x the pixels), computed: " + ", ".join(
        f"{h} x {w}: {100 * (mags[20] / mags[5] - 1):+.1f} %" for (h, w), mags in by_slide.items())]
    lines += ["", "| method | stage | whole-slide step (s) | streamed step (s) | streamed / whole |",
              "|---|---|---|---|---|"]
    for name, timing in report["time"].items():
        for whole, streamed in zip(timing["whole"], timing["streamed"], strict=True):
            lines.append(f"| {name} at {timing['size'][0]} x {timing['size'][1]} | {whole['stage']} | "
                         f"{whole['step_s']:.2f} | {streamed['step_s']:.2f} | "
                         f"{streamed['step_s'] / whole['step_s']:.2f}x |")
    return "\n".join(lines)


def _plot(report: dict, path: Path) -> None:
    from distlocal.plots import stream_memory_lines

    stream_memory_lines(report, path)
