"""
One streamed training step of every K = 4 stage at a size no whole-slide tensor could hold, each stage on the
previous one's real output: the paper's largest slide at 20X is 95396 x 41028 px, 47 GB as the fp32 input.

Stage 1 reads a procedural slide region by region (``PatternRegions``, a RegionInput as data/regions.SlideRegions
is), so the slide never exists whole; the host holds each stage's input and output maps, as in training. Per stage:
seconds, the model bytes at their peak and CUDA max allocated (stream_memory's measurement), and the output map's
bytes in host memory. `bench memory --stream --step HxW` runs it; on a GPU it is the issue's one 20X training step.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from distlocal.bench import base_overrides
from distlocal.bench.stream_memory import STREAMED, measure_step
from distlocal.config_load import load_config
from distlocal.model import build_stages, resolve_device
from distlocal.model.budget import GB

__all__ = ["PatternRegions", "bench_stream_step", "format_stream_step"]


class PatternRegions:
    """A 1 x 3 x H x W slide input whose every region is computed from its coordinates, none stored."""

    def __init__(self, height: int, width: int):
        self.shape = (1, 3, height, width)

    def region(self, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
        # Stripes and checks at a few scales, about zero mean and unit spread, as a normalised slide is
        ys = torch.arange(y0, y1, dtype=torch.float32)[:, None]
        xs = torch.arange(x0, x1, dtype=torch.float32)[None, :]
        channels = [torch.sin(ys / 7 + xs / 11), torch.cos(ys / 13) * torch.sin(xs / 5), torch.sin((ys + xs) / 29)]
        return torch.stack(channels)[None] * 1.4

    def close(self) -> None:
        """Nothing is open."""


def bench_stream_step(out_dir: Path, size: tuple[int, int], tile: int, overrides: list[str] = (),
                      device: str = "auto") -> dict:
    """One streamed K = 4 step of a ``size`` slide (read-magnification pixels) in tiles of ``tile`` slide px."""
    dev = resolve_device(device)
    cfg = load_config(None, [*base_overrides(dev), "train.accumulate=1", *STREAMED["k4"], "model.stream=on",
                             f"model.stream_tile={tile}", *overrides])
    stages = build_stages(cfg, 2, dev)
    report = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "size": list(size),
              "tile": tile, "precision": cfg.train.precision, "k": cfg.model.k, "stages": []}
    out_dir.mkdir(parents=True, exist_ok=True)
    x, start = PatternRegions(*size), time.perf_counter()
    for i, stage in enumerate(stages):
        row, x = measure_step(stage, x, dev)
        row.update(output_shape=list(x.shape), host_output_gb=x.nbytes / GB)
        report["stages"].append(row)
        spent = time.perf_counter() - start
        print(f"bench memory --stream --step: stage {i + 1}/{len(stages)} done in {row['step_s']:.1f} s "
              f"({spent:.0f} s in all, about {spent / (i + 1) * (len(stages) - i - 1):.0f} s left)", flush=True)
        (out_dir / "stream_step.json").write_text(json.dumps(report, indent=2))  # kept if a later stage fails
    return report


def format_stream_step(report: dict) -> str:
    """The stages' step as a table."""
    cuda = any("cuda_max_allocated" in r for r in report["stages"])
    lines = [f"one streamed K={report['k']} training step of a {report['size'][0]} x {report['size'][1]} px slide "
             f"(read by region), tiles of {report['tile']} slide px, {report['precision']} on {report['device']}",
             "| stage | streamed | seconds | model bytes at peak (GB) | CUDA max allocated (GB) | output map in host "
             "memory (GB) | output shape |", "|---|---|---|---|---|---|---|"]
    for r in report["stages"]:
        peak = f"{r['cuda_max_allocated'] / GB:.2f}" if cuda else "-"
        lines.append(f"| {r['stage']} | {'yes' if r['streamed'] else 'no'} | {r['step_s']:.1f} | "
                     f"{r['model_total'] / GB:.2f} | {peak} | {r['host_output_gb']:.2f} | "
                     f"{' x '.join(map(str, r['output_shape']))} |")
    return "\n".join(lines)
