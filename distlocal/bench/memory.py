"""
distlocal bench memory: the memory of one training step, end to end against every stage at K = 4 and K = 8.

The paper's Table 2 compares GPU memory of end-to-end training with the largest module of local training. Two ways
of measuring, both on one real training step (forward, loss, backward, optimizer step) of the real modules:
- "model" bytes, everywhere (CPU included): the larger of two moments, plus parameters + gradients + AdamW
  state. Backward: the activations saved for it (counted by saved-tensor hooks, each storage once) + a later
  stage's input. The stem (stage 1 and E2E): the slide, the stem's output, and one stem tile's conv1 and bn1
  outputs (the frozen stem saves nothing and runs in tiles: stage.run_stem). This is what training must hold at
  its peak, whatever the allocator does.
- CUDA only: torch.cuda.max_memory_allocated over the step (what the paper measured), at the paper's slide sizes
  as far as the GPU holds them; an out-of-memory is recorded as such.

Three variants of each, at the run's train.precision (bf16 on CUDA, fp32 on CPU): frozen BatchNorm run unfolded as
the paper's code runs it ("unfolded BN"), folded into the convolutions (train.fold_batchnorm, distlocal's default),
and folded with recomputed activations (train.recompute_activations). Every variant runs the frozen stem in tiles
(stage.run_stem), which the paper's code does not. When that precision is not fp32, an fp32 unfolded variant is
measured too, for the comparison with the paper's Table 2 (which does not say its precision). Ratios are to unfolded
E2E at the run's precision and to E2E with the same options.
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path

import torch

from distlocal.bench import base_overrides
from distlocal.config import Config
from distlocal.config_load import load_config
from distlocal.model import build_stages, resolve_device
from distlocal.model.budget import SavedTensors, state_bytes
from distlocal.model.stage import autocast

__all__ = ["PAPER_SIZES", "bench_memory", "format_memory"]

PAPER_SIZES = [(8698, 7496), (12223, 10057), (23849, 10257)]  # the paper's Table 2 images (5X pixels)
# (config-name suffix, label, overrides)
VARIANTS = [("", "unfolded BN", ["train.fold_batchnorm=false"]),
            ("_fold", "folded BN", ["train.fold_batchnorm=true"]),
            ("_rc", "folded BN + recompute", ["train.fold_batchnorm=true", "train.recompute_activations=true"])]
FP32 = ("_fp32", "unfolded BN, fp32", ["train.fold_batchnorm=false", "train.precision=fp32"])  # when not fp32 already
METHODS = {"e2e": ["model.mode=e2e", "model.k=1", "model.split=balanced"], "k4": ["model.k=4"], "k8": ["model.k=8"]}
_MB = 2**20


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _saved_bytes(step, held: dict[int, int] | None = None, exclude: set[int] = frozenset()) -> tuple[int, object]:
    """
    Run ``step()`` and return (bytes of distinct storages autograd saved for backward, step's result): SavedTensors'
    total, with its ``held`` (the block inputs recomputation keeps) and ``exclude`` (parameters, the input).
    """
    with SavedTensors(held, exclude) as saved:
        result = step()
    return saved.total, result


def _blocks(stage):
    return stage.net.blocks if hasattr(stage, "net") else stage.modules["backbone"]


def _block_hooks(stage, held: dict[int, int], inputs: dict, recompute: bool) -> list:
    """
    Note every block's input, by block (kept for the rerun and, with recomputation, what stays for backward:
    ``held``). The first one is the stem's output on stage 1 and E2E, which exists next to the slide while the stem
    runs. Recomputation runs each block's forward again in backward: that second call is not noted again.
    """

    def note(module, args):
        if recompute:
            held[_key(args[0])] = args[0].untyped_storage().nbytes()
        inputs.setdefault(module, args[0].detach())

    return [block.register_forward_pre_hook(note) for block in _blocks(stage)]


def _largest_block(inputs: dict, bf16: bool) -> int:
    """The backward of a recomputed block holds that block's saved activations: the largest block's, at most."""
    largest = 0
    for block, x in inputs.items():
        exclude = {_key(p) for p in block.parameters()} | {_key(x)}  # the input is already counted as held
        with torch.enable_grad(), autocast(x.device, bf16):  # rerun as the step ran it
            saved, _ = _saved_bytes(lambda b=block, h=x: b(h), exclude=exclude)
        largest = max(largest, saved)
    return largest


def _stem(stage):
    """The frozen stem of E2E or stage 1; None for later stages."""
    if hasattr(stage, "net"):
        return stage.net.stem
    return stage.modules["stem"] if "stem" in stage.modules else None


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _modules(stage) -> list:
    return [stage.net] if hasattr(stage, "net") else [stage.modules]


def measure(cfg: Config, size: tuple[int, int], device: torch.device) -> list[dict]:
    """One training step of every stage of ``cfg`` on a random slide of ``size``; one dict per stage."""
    stages = build_stages(cfg, 2, device)
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0)).to(device)
    rows = []
    for i, stage in enumerate(stages):
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        held, inputs = {}, {}
        hooks = _block_hooks(stage, held, inputs, cfg.train.recompute_activations)
        stem = _stem(stage)
        conv1 = [0]  # the largest output of the stem's first conv: per tile when the stem runs in tiles
        if stem is not None:
            hooks.append(stem[0].register_forward_hook(
                lambda m, a, o, c=conv1: c.__setitem__(0, max(c[0], _bytes(o)))))
        start = time.perf_counter()
        # Parameters and the input are counted as such, though a convolution also saves its weight and input.
        exclude = {_key(p) for m in _modules(stage) for p in m.parameters()} | {_key(x)}
        try:
            saved, (out, _) = _saved_bytes(lambda s=stage, h=x: s.train_step(h, 1), held, exclude)
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if not isinstance(exc, torch.OutOfMemoryError) and "can't allocate memory" not in str(exc):
                raise
            rows.append({"stage": i + 1, "oom": True})  # the CPU allocator's failure is a RuntimeError
            break
        finally:
            for hook in hooks:
                hook.remove()
        seconds = time.perf_counter() - start
        # Read now: _largest_block below reruns blocks on the device, and their activations are no part of the step.
        step_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
        state = state_bytes(_modules(stage))
        slide = _bytes(x)
        # A later stage's input is held by its caller all step; stage 1's slide only while the stem runs, but its
        # stem output all step: counted here when the blocks saved a copy of it instead (an fp32 map under bf16).
        first = next(iter(inputs.values()))
        kept = _bytes(first) if stem is not None and _key(first) not in held else 0
        row = {"stage": i + 1, "saved_activations": saved, "input": kept if stem is not None else slide, **state,
               "recompute_peak": _largest_block(inputs, cfg.train.precision == "bf16")
               if cfg.train.recompute_activations else 0,
               "step_s": seconds}
        backward = saved + row["recompute_peak"] + row["input"]
        # While the stem runs: the slide, the stem's whole output, and one tile's conv1 and bn1 outputs.
        row["stem_peak"] = slide + _bytes(next(iter(inputs.values()))) + 2 * conv1[0] if stem is not None else 0
        row["model_total"] = max(backward, row["stem_peak"]) + sum(state.values())
        if device.type == "cuda":
            # `before` holds every stage's weights (all were built on the device): add back this stage's own.
            row["cuda_max_allocated"] = step_peak - before + state["params"]
        del inputs
        rows.append(row)
        x = out  # the next stage's input, as the executors pass it (E2E has a single stage)
    return rows


def bench_memory(out_dir: Path, sizes: list[tuple[int, int]], overrides: list[str] = (),
                 device: str = "auto") -> dict:
    """E2E, K = 4 and K = 8 at every size; writes memory.json and memory.png into ``out_dir``."""
    dev = resolve_device(device)
    base = [*base_overrides(dev), "train.accumulate=1", *overrides]
    precision = load_config(None, base).train.precision
    configs = variant_configs(precision)
    report = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "precision": precision,
              "sizes": [], "complete": False}
    out_dir.mkdir(parents=True, exist_ok=True)
    total, done, start = len(sizes) * len(configs), 0, time.perf_counter()
    for size in sizes:
        entry = {"size": list(size)}
        report["sizes"].append(entry)
        for name, extra in configs.items():
            print(f"bench memory: {name} at {size[0]} x {size[1]} on {dev} ({done + 1}/{total}) ...", flush=True)
            entry[name] = measure(load_config(None, [*base, *extra]), size, dev)
            done += 1
            # Written after every configuration: a long run that is stopped keeps what it measured.
            (out_dir / "memory.json").write_text(json.dumps(report, indent=2))
            elapsed = time.perf_counter() - start
            left = elapsed / done * (total - done)
            print(f"bench memory: {done}/{total} done in {elapsed:.0f} s, about {left:.0f} s left", flush=True)
    report["complete"] = True
    (out_dir / "memory.json").write_text(json.dumps(report, indent=2))
    _plot(report, out_dir / "memory.png")
    return report


def variants(precision: str) -> list[tuple[str, str, list[str]]]:
    """The variants measured at ``precision``: the three, and an fp32 unfolded one unless that is fp32 already."""
    return VARIANTS + ([FP32] if precision != "fp32" else [])


def variant_configs(precision: str) -> dict[str, list[str]]:
    """Config name (e2e, k4, k8 with the variant's suffix) -> its overrides, for a run at ``precision``."""
    return {name + suffix: [*extra, *variant] for suffix, _, variant in variants(precision)
            for name, extra in METHODS.items()}


def _largest(rows: list[dict], key: str) -> float | None:
    if any(r.get("oom") for r in rows):
        return None
    return max(r[key] for r in rows) if rows and key in rows[0] else None


def _mb(value: float | None) -> str:
    return "OOM" if value is None else f"{value / _MB:,.0f}"


def _ratio(value: float | None, e2e: float | None) -> str:
    return "-" if value is None or e2e is None else f"{100 * value / e2e:.1f} %"


def format_memory(report: dict) -> str:
    """
    The paper's Table 2 layout: E2E and the largest stage at K = 4 and K = 8, for each variant (unfolded BN, folded
    BN, folded BN + recompute at the run's precision; unfolded in fp32 too when that is not fp32), with ratios to
    unfolded E2E at the run's precision and to E2E with the same options. Every row runs the stem in tiles.
    """
    keys = ["model_total"] + (["cuda_max_allocated"] if report["device"] != "cpu" else [])
    precision = report.get("precision", "fp32")  # (reports from before it was recorded ran fp32 on the CPU)
    lines = [f"device: {report['device']}; train.precision {precision} except where a row says fp32; the frozen "
             f"stem in tiles (stage.run_stem) in every row",
             "| size (5X px) | measure | E2E (MB) | K=4 largest stage (MB) | / unfolded E2E | / same E2E "
             "| K=8 largest stage (MB) | / unfolded E2E | / same E2E |",
             "|---|---|---|---|---|---|---|---|---|"]
    for entry in report["sizes"]:
        size = f"{entry['size'][0]} x {entry['size'][1]}"
        for key in keys:
            unfolded = _largest(entry["e2e"], key)
            for suffix, label, _ in variants(precision):
                if "e2e" + suffix not in entry:
                    continue
                own, k4, k8 = (_largest(entry[n + suffix], key) for n in ("e2e", "k4", "k8"))
                label = label if suffix == FP32[0] else f"{label}, {precision}"
                lines.append(f"| {size} | {key}, {label} | {_mb(own)} | {_mb(k4)} | {_ratio(k4, unfolded)} | "
                             f"{_ratio(k4, own)} | {_mb(k8)} | {_ratio(k8, unfolded)} | {_ratio(k8, own)} |")
    return "\n".join(lines)


def _plot(report: dict, path: Path) -> None:
    from distlocal.plots import memory_bars

    memory_bars(report, path)
