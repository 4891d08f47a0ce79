"""
distlocal bench pipeline [--config CONFIG] [--set key=value ...] [--slides N] [--size H W] [--epochs N]
                         [--replicas 2,1 | --plan auto]
distlocal bench io [--size H W] [--base-magnification 20] [--repeats 3] [--ways W1,W2]
distlocal bench memory [--sizes HxW,HxW] [--device auto|cpu|cuda] [--set key=value ...] [--stream [--stream-tile PX]
                       [--step HxW]]
distlocal bench inference [SLIDE_OR_MANIFEST ...] [--sizes HxW,HxW] [--mode deployed|memory] [--workers N]
                          [--checkpoint PATH] [--batch N] [--repeats 3]
distlocal bench loading [MANIFEST] [--slides N] [--size H W] [--loaders 1,2,4] [--threads 1,2] [--cache DIR]
distlocal bench magnification [--slides N] [--size H W] [--seeds N] [--epochs N] [--set key=value ...] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", choices=["pipeline", "io", "memory", "inference", "loading", "magnification"],
                   help="pipeline: Ray executor against the local executor; io: reading a large slide to 5X against "
                        "decoding it in full; memory: one training step, end to end against every stage at K=4/8; "
                        "inference: whole-slide prediction against patch-based GABMIL (the paper's Table 3); loading: "
                        "slides/s the Ray loaders deliver, from originals and the cache, against loaders and threads, "
                        "and the count train.loaders=auto picks for stage rates up to 50 slides/s; "
                        "magnification: local K=4 and E2E, both streamed, at 5X and 10X on slides whose evidence is "
                        "one 10X pixel across (synth --task fine), --seeds runs each, with 95 %% CIs")
    p.add_argument("inputs", nargs="*", metavar="SLIDE_OR_MANIFEST",
                   help="inference: slide files or manifests to time (default: synthetic slides of --sizes)")
    p.add_argument("--config", help="YAML config; default: synthetic slides, resnet18, K=2, one thread per stage")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--slides", type=int, default=20, help="synthetic training slides when no manifest is given")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                   help="synthetic slide size: at 5X for pipeline (default 384 384) and magnification (48 48), at "
                        "the base magnification for io (default 40000 40000)")
    p.add_argument("--base-magnification", type=float, default=20.0,
                   help="io, inference: the scan magnification of the synthetic slide files written")
    p.add_argument("--mode", choices=["deployed", "memory"], default="deployed",
                   help="inference: deployed (default): from the slide file to the prediction, the patch baseline as "
                        "CLAM reading tiles through OpenSlide, then the compute race on the 5X images in memory; "
                        "memory: the compute race only, synthetic slides rendered in memory")
    p.add_argument("--workers", type=int, help="inference: the patch baseline's DataLoader workers (default: 8 on "
                   "CUDA as CLAM, 1 on a CPU)")
    p.add_argument("--repeats", type=int, default=3, help="io, inference: runs per way (the median is reported)")
    p.add_argument("--ways", default=None, help="io: comma-separated ways to run (default: the six 5X reads; "
                                                "prepare_base,whole_base: a prepare at the scan's magnification by "
                                                "region against the whole read)")
    p.add_argument("--sizes", help="memory, inference: synthetic slide sizes at 5X, e.g. 1024x1024,2048x1536 "
                   "(default on CPU: 1024x1024,2048x1536 for memory, 2048x2048,4096x3072 for inference; on CUDA: "
                   "the paper's 8698x7496,12223x10057,23849x10257)")
    p.add_argument("--stream", action="store_true", help="memory: streamed stages (model.stream=on) at K=4 and E2E "
                   "at --sizes (measured; default 768x1536,3072x6144: 16x the pixels, as 5X to 20X), the "
                   "paper's slides at 5X, 10X and 20X computed from them; writes memory_stream.json and .png")
    p.add_argument("--stream-tile", type=int, default=512, help="memory --stream: model.stream_tile (slide pixels)")
    p.add_argument("--step", help="memory --stream: instead, one real streamed K=4 training step of a slide of this "
                   "size (HxW px, read by region: e.g. 95396x41028, the paper's largest slide at 20X), each stage's "
                   "seconds, model bytes, CUDA peak and host maps; writes stream_step.json")
    p.add_argument("--stream-methods", default="k4,e2e", help="memory --stream: what to measure streamed: k4, e2e "
                   "(E2E's halo is 672 px: small tiles recompute most of each tile)")
    p.add_argument("--device", default="auto", help="memory, inference: auto (CUDA when present), cpu or cuda")
    p.add_argument("--checkpoint", help="inference: time this trained model (default: the config's, random weights)")
    p.add_argument("--classifiers", help="inference: also time ours deciding by each of these predict.classifier "
                   "choices, e.g. A_1,A_2,H,ensemble (A_i runs stages 1..i only: the early exit's time per slide)")
    p.add_argument("--batch", type=int, default=0, help="inference: GABMIL tiles per feature batch "
                   "(default 32 on CPU, 256 on CUDA)")
    p.add_argument("--epochs", type=int, default=0,
                   help="pipeline: also time a whole run of N epochs with validation and test (each phase's wait for "
                        "its first result, the run against its slowest stage's busy time)")
    p.add_argument("--replicas", help="pipeline: also run with these replicas per stage, e.g. 2,1 (stage 1 twice)")
    p.add_argument("--plan", choices=["auto"], help="pipeline: also run the planner's replicas on train.gpus devices "
                   "(default K+1), planned from the stage times measured alone")
    p.add_argument("--seeds", type=int, default=2, help="magnification: training runs per arm (train.seed 0..N-1)")
    p.add_argument("--loaders", default="1,2,4", help="loading: loader counts (train.loaders) to time")
    p.add_argument("--threads", default="1,2", help="loading: threads per loader (data.prefetch) to time")
    p.add_argument("--cache", help="loading: the manifest's prepare cache (default: prepared into --out/cache)")
    p.add_argument("--out", default="runs/bench", help="folder for pipeline.json, or io.json and io.png")


_DEFAULTS = ["model.backbone=resnet18", "model.k=2", "model.split=balanced", "model.aux_kernels=[3,1]",
             "model.rfr.patch_size=32", "train.executor=ray", "train.cpus_per_stage=1", "data.augment=false",
             "tracking.enabled=false"]


def _inference(args: argparse.Namespace) -> int:
    from distlocal.bench import base_overrides
    from distlocal.bench.deployed import format_deployed, write_bench_slides
    from distlocal.bench.inference import bench_inference, format_inference, slide_images, synthetic_images
    from distlocal.bench.memory import PAPER_SIZES
    from distlocal.config import ConfigError
    from distlocal.config_load import load_config
    from distlocal.model import resolve_device
    from distlocal.predict import slide_records

    device = resolve_device(args.device)
    cfg = load_config(args.config, [*base_overrides(device), *args.overrides])
    if args.workers is not None and args.workers < 0:
        raise ConfigError(f"--workers {args.workers}: give 0 (tiles read in the main process) or more")
    default = PAPER_SIZES if device.type == "cuda" else [(2048, 2048), (4096, 3072)]
    sizes = _sizes(args.sizes) if args.sizes else default
    records = None
    if args.inputs:
        records = slide_records(args.inputs, cfg.data.classes)
        images = slide_images(records, cfg)
    elif args.mode == "deployed":  # real pyramidal files, so both pipelines read what they read on a scanner's
        records = write_bench_slides(Path(args.out) / "slides", sizes, args.base_magnification)
        images = slide_images(records, cfg)
    else:
        images = synthetic_images(sizes)
    classifiers = [c.strip() for c in args.classifiers.split(",")] if args.classifiers else []
    report = bench_inference(Path(args.out), images, cfg, args.repeats, args.batch, args.checkpoint, args.overrides,
                             records=records if args.mode == "deployed" else None, workers=args.workers,
                             classifiers=classifiers)
    if report["deployed"]:
        print(format_deployed(report))
    print(format_inference(report))
    plots = "inference.png" + (" and inference_deployed.png" if report["deployed"] else "")
    print(f"wrote {Path(args.out) / 'inference.json'} and {plots} in {args.out}")
    return 0


def _loading(args: argparse.Namespace) -> int:
    from distlocal.bench.loading import bench_loading, format_loading
    from distlocal.config_load import load_config
    from distlocal.data import read_manifest
    from distlocal.data.prepare import prepare_slides
    from distlocal.engine.placement import connect
    from distlocal.slides import write_synthetic_dataset

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_config(args.config, args.overrides).data
    if args.inputs:
        records = read_manifest(args.inputs[0], data.classes or None).records
    else:  # synthetic pyramidal files at 20X whose 5X crop is --size
        manifest = write_synthetic_dataset(out / "loading_slides", slides=args.slides, classes=2,
                                           size=tuple(args.size or (384, 384)), seed=0)
        records = read_manifest(manifest).records
    cache = args.cache
    if cache is None:
        cache = out / "loading_cache"
        prepare_slides(records, cache, data)
    if os.environ.get("RAY_ADDRESS"):
        connect()
    else:  # a Ray of its own: another Ray on this machine (a run, a test) would share the CPUs being timed
        import ray

        ray.init(address="local", include_dashboard=False, configure_logging=False)
    result = bench_loading(records, data, cache, _counts(args.loaders, "--loaders"), _counts(args.threads, "--threads"))
    (out / "loading.json").write_text(json.dumps(result, indent=2))
    print(format_loading(result))
    print(f"wrote {out / 'loading.json'}")
    return 0


def _counts(text: str, flag: str) -> list[int]:
    from distlocal.config import ConfigError

    try:
        counts = [int(v) for v in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise ConfigError(f"{flag} {text!r}: give whole numbers of at least 1, comma-separated, e.g. 1,2,4")
    return counts


def _sizes(text: str) -> list[tuple[int, int]]:
    from distlocal.config import ConfigError

    try:
        sizes = [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or any(len(s) != 2 or min(s) < 64 for s in sizes):
        raise ConfigError(f"--sizes {text!r}: give HxW pairs of at least 64 px, comma-separated, "
                          "e.g. 1024x1024,2048x1536")
    return sizes


def run(args: argparse.Namespace) -> int:
    from distlocal.config import ConfigError

    if args.inputs and args.what not in ("inference", "loading"):
        raise ConfigError(f"bench {args.what} takes no slide arguments (got {args.inputs[:3]}); only bench inference "
                          "and bench loading time given slides")
    if args.what == "inference":
        return _inference(args)
    if args.what == "loading":
        return _loading(args)
    if args.what == "magnification":
        from distlocal.bench.magnification import bench_magnification, format_magnification

        report = bench_magnification(Path(args.out), args.slides, tuple(args.size or (48, 48)), args.seeds,
                                     args.epochs or 4, args.overrides)
        print(format_magnification(report))
        print(f"wrote {Path(args.out) / 'magnification.json'} and {Path(args.out) / 'magnification.png'}")
        return 0
    if args.what == "memory" and args.stream and args.step:
        from distlocal.bench.stream_step import bench_stream_step, format_stream_step

        sizes = _sizes(args.step)
        if len(sizes) != 1:
            raise ConfigError(f"--step {args.step!r}: give one size, HxW (e.g. 95396x41028)")
        size = sizes[0]
        report = bench_stream_step(Path(args.out), size, args.stream_tile, args.overrides, args.device)
        print(format_stream_step(report))
        print(f"wrote {Path(args.out) / 'stream_step.json'}")
        return 0
    if args.what == "memory" and args.stream:
        from distlocal.bench.stream_memory import bench_stream_memory, format_stream_memory

        sizes = _sizes(args.sizes) if args.sizes else [(768, 1536), (3072, 6144)]
        methods = tuple(m.strip() for m in args.stream_methods.split(","))
        if not methods or not set(methods) <= {"k4", "e2e"}:
            raise ConfigError(f"--stream-methods {args.stream_methods!r}: choose k4, e2e or both (k4,e2e)")
        if len(sizes) < 2:
            raise ConfigError(f"--sizes {args.sizes!r}: bench memory --stream needs two sizes or more (a line "
                              f"through them computes the paper's), e.g. 768x1536,3072x6144")
        report = bench_stream_memory(Path(args.out), sizes, args.stream_tile, args.overrides, args.device, methods)
        print(format_stream_memory(report))
        print(f"wrote {Path(args.out) / 'memory_stream.json'} and {Path(args.out) / 'memory_stream.png'}")
        return 0
    if args.what == "memory":
        from distlocal.bench.memory import PAPER_SIZES, bench_memory, format_memory
        from distlocal.model import resolve_device

        default = PAPER_SIZES if resolve_device(args.device).type == "cuda" else [(1024, 1024), (2048, 1536)]
        report = bench_memory(Path(args.out), _sizes(args.sizes) if args.sizes else default, args.overrides,
                              args.device)
        print(format_memory(report))
        print(f"wrote {Path(args.out) / 'memory.json'} and {Path(args.out) / 'memory.png'}")
        return 0
    if args.what == "io":
        from distlocal.bench.io import BASE_WAYS, WAYS, bench_io, format_io

        ways = tuple(args.ways.split(",")) if args.ways else WAYS
        unknown = sorted(set(ways) - set(WAYS + BASE_WAYS))
        if unknown:
            raise ValueError(f"bench io --ways: unknown way(s) {unknown}; choose from {', '.join(WAYS + BASE_WAYS)}")
        result = bench_io(args.out, tuple(args.size or (40000, 40000)), args.base_magnification, args.repeats, ways)
        print(format_io(result))
        print(f"plot: {Path(args.out) / 'io.png'}")
        return 0
    from distlocal.bench.pipeline import bench_pipeline, format_result
    from distlocal.config_load import load_config
    from distlocal.slides import write_synthetic_dataset

    out = Path(args.out)
    cfg = load_config(args.config, [*([] if args.config else _DEFAULTS), *args.overrides])
    if not cfg.data.manifest:  # a whole run needs validation and test slides too
        splits = (0.6, 0.2, 0.2) if args.epochs else (1.0, 0.0, 0.0)
        manifest = write_synthetic_dataset(out / "slides", slides=args.slides, classes=2,
                                           size=tuple(args.size or (384, 384)), seed=0, splits=splits)
        cfg = load_config(args.config, [*([] if args.config else _DEFAULTS), *args.overrides,
                                        f"data.manifest={manifest}"])
    replicas = [int(r) for r in args.replicas.split(",")] if args.replicas else None
    if replicas and len(replicas) != cfg.model.k:
        raise ConfigError(f"--replicas {args.replicas} gives {len(replicas)} counts for K={cfg.model.k} stages; "
                          f"give one per stage, e.g. --replicas {','.join(['2'] + ['1'] * (cfg.model.k - 1))}")
    result = bench_pipeline(cfg, out, replicas=replicas, plan=args.plan == "auto")
    print(json.dumps(result, indent=2))
    print(format_result(result))
    if "replicas" in result:
        from distlocal.bench.pipeline import format_replicas

        print(format_replicas(result))
    if args.epochs:
        from distlocal.bench.whole_run import bench_whole_run, format_whole_run

        whole = bench_whole_run(cfg, out, args.epochs)
        print(format_whole_run(whole))
        print(f"wrote {out / 'pipeline.json'} and {out / 'whole_run.json'}")
    return 0
