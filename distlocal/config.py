"""
Typed configuration: dataclasses loaded from YAML, overridable with ``--set key=value``.

Every default lives here, once, with a comment saying what it does. Loading is strict: an unknown
key, a wrong type or an impossible value fails at once with a message naming the key and the fix.
What follows from K and the mode (the cut, e2e's single stage) is resolved on loading, so one key changed alone
still gives a whole config, and the resolved config records it.

Example::

    cfg = load_config("configs/demo.yaml", ["model.k=8", "model.rfr.enabled=false"])
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from distlocal.classifiers import check_choice
from distlocal.config_error import ConfigError
from distlocal.cut import stage_sizes

__all__ = ["Config", "ConfigError", "load_config", "config_from_dict", "config_to_dict", "save_config",
           "stage_replicas"]

# Residual blocks per backbone: the finest split possible is one block per stage.
BACKBONE_BLOCKS = {"resnet18": 8, "resnet34": 16, "resnet50": 16}
LAYERS = 4  # residual layer groups of every ResNet (layer1..layer4), each at its own stride

log = logging.getLogger(__name__)


# Each key's constraint stands beside it: choice(*options, default=first), positive(default) (> 0),
# non_negative(default) (>= 0), or checked(default, problem), where problem(key, value) is the error with its fix or
# None. Loading checks every key against its own (_validate_choices, _validate).
def choice(*options: str, default: str | None = None):
    return field(default=default or options[0], metadata={"choices": options})


def positive(default):
    return field(default=default, metadata={"problem": lambda key, v: f"config key '{key}' must be > 0, got {v}"
                                            if v <= 0 else None})


def non_negative(default):
    return field(default=default, metadata={"problem": lambda key, v: f"config key '{key}' must be >= 0, got {v}"
                                            if v < 0 else None})


def checked(default, problem: Callable[[str, Any], str | None]):
    return field(default=default, metadata={"problem": problem})


def _gpus_per_stage(key: str, value: float) -> str | None:
    if value < 0 and value != -1:
        return (f"{key}={value}; give a GPU count per stage (e.g. 1 or 0.5) or -1 for one GPU per stage when the "
                f"cluster has GPUs")
    return None


def _loaders(key: str, value: str | int) -> str | None:
    if value == "auto" or (isinstance(value, int) and value >= 1):
        return None
    return (f"{key}={value!r}; give a number of loader actors (at least 1, e.g. {key}=2), or auto to set it from the "
            f"measured read rate against the slowest stage's")


def _stream_tile(key: str, value: int | str) -> str | None:
    if value == "auto" or (isinstance(value, int) and value > 0):
        return None
    return (f"{key}={value!r}; give a tile side in slide pixels (e.g. 4096) or auto (the largest that fits "
            f"train.memory_gb)")


@dataclass
class RFRConfig:
    enabled: bool = True  # random feature reconstruction on stages 1..K-1; false for the ablation
    alpha: float = non_negative(1.0)  # weight of the L1 reconstruction loss: loss = CE + alpha * L1
    patches: int = positive(10)  # random locations sampled per slide
    patch_size: int = positive(128)  # patch side on stage-1 output; deeper stages shrink it with their stride


@dataclass
class ModelConfig:
    backbone: str = choice(*BACKBONE_BLOCKS, default="resnet34")
    k: int = 4  # number of gradient-isolated stages, 1 .. residual blocks of the backbone
    # reference: the paper's K=4/K=8 units | balanced: equal block counts | auto: profiled
    split: str = choice("reference", "balanced", "auto")
    # The cut, e.g. [2, 3, 5, 6]; empty: derived from model.split when the config loads (and so recorded in the
    # resolved config), or profiled by the trainer for split=auto. A K-long list: give it only with model.k.
    blocks_per_stage: list[int] = field(default_factory=list)
    mode: str = choice("local", "e2e")  # locally supervised stages | ordinary backprop baseline: one stage, K = 1
    pretrained: str = choice("imagenet", "none", default="none")  # torchvision weights, downloaded once | random init
    weights: str = ""  # path to a local backbone state dict; overrides `pretrained`
    first_conv_stride: int = positive(3)  # the paper widens the receptive field with stride 3 (torchvision: 2)
    # Strided-conv kernel of the classifiers (A_i and H) on a map of the backbone's layer1, layer2, layer3, layer4:
    # each classifier takes its stage's last block's layer, so these hold for any K. The reference's 9/9/7/5 are
    # made for 5X slides of thousands of pixels; small slides (demo, tests) need smaller ones to keep instances.
    classifier_kernels: list[int] = field(default_factory=lambda: [9, 9, 7, 5])
    # One kernel per stage (A_1..A_{K-1}, H), overriding classifier_kernels: a K-long list, so it fits one K only.
    # Older configs and checkpoints use it; new ones should set classifier_kernels. Empty: not used.
    aux_kernels: list[int] = field(default_factory=list)
    rfr: RFRConfig = field(default_factory=RFRConfig)
    # Streamed stages (model/stream.py): off: each stage holds its whole slide's activations | on: each stage (and
    # E2E) trains tile by tile with the same gradients, its device memory set by model.stream_tile, not the slide |
    # auto: a stage streams a slide only when its whole-slide step would not fit train.memory_gb (model/budget.py).
    stream: str = choice("off", "on", "auto")
    # model.stream on / auto: side, in slide pixels, of the region one tile's outputs cover (the same slide area at
    # every stage; each tile adds its footprint's halo). Smaller tiles: less device memory, more recomputed halo.
    # auto: each stage's largest tile that fits train.memory_gb, from a probe step's measured working set.
    stream_tile: int | str = checked(4096, _stream_tile)


@dataclass
class TrainConfig:
    executor: str = choice("local", "ray")  # local (one process) | ray (one actor per stage)
    epochs: int = non_negative(50)
    accumulate: int = positive(8)  # slides per optimizer step (batch size is 1: slides differ in size)
    # Ray executor: slides in the pipeline at once; 0: K + the replicas of the most replicated stage (K + 1 without
    # replicas: a stage with R replicas takes up to R slides at once).
    max_inflight: int = non_negative(0)
    precision: str = choice("fp32", "bf16")  # fp32 | bf16 (autocast)
    lr_backbone: float = positive(1e-5)  # backbone stages F_i
    lr_aux: float = positive(2e-5)  # auxiliary classifiers A_i, RFR units U_i and head H
    weight_decay: float = non_negative(1e-6)
    # Every stage's learning-rate schedule: plateau (lr x plateau_factor once the stage's own classifier's validation
    # plateau_metric has not improved for plateau_patience epochs) | step (lr x plateau_factor after each epoch
    # listed in lr_steps, whatever validation says).
    schedule: str = choice("plateau", "step")
    # acc | balanced_acc | auroc | loss (lower is better); empty: train.monitor's
    plateau_metric: str = choice("", "acc", "balanced_acc", "auroc", "loss")
    plateau_patience: int = non_negative(5)  # epochs without improvement before lr x plateau_factor
    # the lr's factor at a plateau, and at each of lr_steps
    plateau_factor: float = checked(0.1, lambda key, v: None if 0 < v < 1 else f"{key} must be in (0, 1), got {v}")
    lr_steps: list[int] = field(default_factory=list)  # schedule=step: epochs (1-based) after which lr drops
    # Validation metric for the best checkpoint and the plateau: acc | balanced_acc | auroc | loss (lower is better).
    # Ties go to the lower validation loss, then the later epoch (engine/selection.py).
    monitor: str = choice("acc", "balanced_acc", "auroc", "loss", default="auroc")
    seed: int = 0  # init, data order, augmentation and RFR locations all derive from it
    checkpoint_every: int = non_negative(0)  # also checkpoint every N optimizer steps; 0: at epoch ends only
    max_slides: int = non_negative(0)  # stop (and checkpoint) after this many training slides; 0: no limit
    # Keep only each residual block's input for backward and recompute the block there: a fraction of the
    # activation memory (`distlocal bench memory` measures it) for about a third more compute per stage.
    recompute_activations: bool = False
    # Run each frozen BatchNorm folded into the convolution before it: the same function (BatchNorm is a fixed
    # per-channel scale and shift in eval mode), about half the activations kept for backward, and faster.
    fold_batchnorm: bool = True
    # Device memory one stage may use, in GB, for model.stream=auto and model.stream_tile=auto: 0 is the device's
    # free memory on CUDA (when the stage is built), the host's available memory on a CPU (its cgroup's limit too).
    memory_gb: float = non_negative(0.0)
    # Host memory the slides' maps may use, in GB: a slide whose stage input and output maps, times the slides in
    # flight, exceed it is refused before training (engine/capacity.py). 0: the node's available memory.
    host_memory_gb: float = non_negative(0.0)
    device: str = checked("auto", lambda key, v: None if v in ("auto", "cpu", "cuda") or v.startswith("cuda:") else
                          f"{key}={v!r}; choose auto, cpu, cuda or cuda:N")  # auto: cuda if present
    # Ray executor: dtype of the activations between stages: auto (train.precision's, on any device) | fp32 | bf16
    activation_dtype: str = choice("auto", "fp32", "bf16")
    # Ray executor: nccl between GPUs, gloo between CPUs; a hop that cannot have it falls back to the object store
    transport: str = choice("object_store", "nccl", "gloo")
    # Ray executor: GPUs per stage actor; -1: 1 when the cluster has GPUs, else 0
    gpus_per_stage: float = checked(-1.0, _gpus_per_stage)
    # Ray executor: CPUs per stage actor (also its torch threads); 0: one each, or an equal share of the cluster's
    # CPUs when it has fewer than K (e.g. 0.5 for K = 4 on 2 cores). A value you set must fit, or the run stops.
    cpus_per_stage: float = non_negative(0.0)
    placement: str = choice("strict_pack", "pack", "spread")  # ray executor: strict_pack: one node; spread: across
    placement_timeout_s: float = positive(60.0)  # ray executor: give up placing the stages after this long
    max_restarts: int = non_negative(3)  # ray executor: stage failures survived (restart, reload, replay)
    # Ray executor: how long a recovery waits for Ray to restart a lost stage; a lost node's detection, re-placing its
    # bundle and a cold actor start elsewhere (working_dir download, imports, CUDA init) take minutes.
    recovery_timeout_s: float = positive(900.0)
    # Ray executor: data-parallel replicas of each stage, each an actor with its own device: one number for every
    # stage, or a list of K (the slow stage gets more). Their gradients are summed at each optimizer step, so R
    # replicas learn what one stage learns from the same slides. 1: no replicas.
    replicas: int | list[int] = 1
    # Ray executor: slide loader actors feeding stage 1 (slide i of an epoch from loader i mod N, so the order and
    # every tensor are the same whatever N), placed beside stage 1's replicas, then on the other stages' nodes.
    # auto: as many as deliver 1.2x the slowest stage's rate (the planner's profile) at one loader's measured read
    # rate on this run's first slides, at most one per CPU the stages leave (engine/loader_plan.py); logged with
    # the plan, and the count is written into the run's config.yaml. 1: one loader.
    loaders: str | int = checked(1, _loaders)
    # manual: model.k, the cut and train.replicas as given | auto: the planner chooses the cut (with
    # model.split=auto) and the replicas per stage that train fastest on train.gpus devices (engine/planner.py).
    plan: str = choice("manual", "auto")
    gpus: int = non_negative(0)  # train.plan=auto: devices to plan for; 0: every GPU of the cluster
    allreduce_gb_per_s: float = positive(10.0)  # train.plan=auto: all-reduce bandwidth assumed between replicas
    collective_timeout_s: float = positive(300.0)  # ray executor: a replica waiting this long in an all-reduce fails
    # Validation slides whose H attention heatmaps are plotted at the end (plots/attention/), taking the classes in
    # turn: as many as there are classes shows each one. 0: none.
    heatmaps: int = non_negative(3)


@dataclass
class DataConfig:
    manifest: str = ""  # CSV with slide_id,path,label,split[,patient_id]
    magnification: float = positive(5.0)  # slides are read at this magnification
    level: int | None = None  # force a pyramid level instead of choosing by magnification
    base_magnification: float | None = None  # for slides whose files carry no magnification
    # auto: per file, by what it is (DICOM folder or instance: dicom; NDPI, MRXS, SCN, Philips TIFF, BIF: openslide;
    # SVS, TIFF, OME-TIFF, PNG, JPEG: tifffile) | tifffile | openslide | dicom: that reader for every slide.
    reader: str = choice("auto", "tifffile", "openslide", "dicom")
    classes: list[str] = field(default_factory=list)  # class order; empty: sorted labels of the manifest
    mean: list[float] = field(default_factory=lambda: [0.6909, 0.4654, 0.6119])  # NSCLC, per channel
    std: list[float] = field(default_factory=lambda: [0.1786, 0.2102, 0.1795])
    augment: bool = True  # edge crop, flips, 90-degree rotations, colour jitter (train split only)
    on_error: str = choice("fail", "skip")  # fail | skip: what a bad slide does to training (skips are reported)
    prefetch: int = positive(2)  # slides loaded ahead of compute, bounding memory
    cache_dir: str = ""  # folder written by `distlocal prepare`: prepared slides are read from it


@dataclass
class TrackingConfig:
    enabled: bool = True  # false: no MLflow at all
    uri: str = ""  # empty: MLFLOW_TRACKING_URI, else a local SQLite store under run.dir
    experiment: str = "distlocal"
    flush_timeout_s: float = 30.0  # at the end, wait this long for unsent tracking data, then spill it to a file


@dataclass
class PredictConfig:
    # Largest input tile (pixels) a stage runs on at once in `distlocal predict`; bigger slides run as exact
    # overlapping tiles. 0: whole slides on the CPU, and on CUDA a size fitted to the free GPU memory.
    max_tile_pixels: int = non_negative(0)
    aux_heatmaps: bool = False  # also plot the attention of every auxiliary classifier A_i
    # The classifier that decides (distlocal/classifiers.py): best (the one that validated best, as the checkpoint
    # records) | H | A_i (runs stages 1..i only) | ensemble (mean probabilities of A_1 .. A_{K-1} and H). In training
    # it picks the best checkpoint too: by that classifier's validation metric (best: the best of any classifier's).
    classifier: str = "best"


@dataclass
class RunConfig:
    dir: str = "runs"  # every run gets RUN_DIR = dir/name (checkpoints, config, metrics)
    name: str = ""  # empty: a timestamp


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    run: RunConfig = field(default_factory=RunConfig)


def _check_type(key: str, value: Any, hint: Any) -> Any:
    """Return `value` as `hint` (ints pass as floats), or raise naming the key."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        *others, last = [a for a in args if a is not type(None)]
        for inner in others:  # e.g. int | list[int]: the first that fits
            try:
                return _check_type(key, value, inner)
            except ConfigError:
                pass
        return _check_type(key, value, last)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}; write e.g. {key}=[1,2,3]")
        (inner,) = typing.get_args(hint)
        return [_check_type(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-5 (no dot) as a string; users mean the number
            value = float(value)
        except ValueError:
            pass
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[hint]
    if not ok:
        raise ConfigError(f"config key '{key}' must be {hint.__name__}, got {value!r} ({type(value).__name__})")
    return float(value) if hint is float else value


def _build(cls: type, data: dict, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.')}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = list(fields)
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            fix = f"did you mean '{prefix}{close[0]}'?" if close else f"valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key '{prefix}{key}': {fix}")
        hint = hints[key]
        if isinstance(value, bool) and {"on", "off"} <= set(fields[key].metadata.get("choices", ())):
            value = "on" if value else "off"  # YAML 1.1 reads on / off (--set model.stream=on too) as booleans
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value or {}, f"{prefix}{key}.")
        else:
            kwargs[key] = _check_type(prefix + key, value, hint)
    return cls(**kwargs)


def _keys(section: Any, prefix: str = "") -> Iterator[tuple[str, Any, dict]]:
    """(key, value, its field's metadata) of every key of a config section, nested sections' keys included."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            yield from _keys(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value, f.metadata


def _validate_choices(cfg: Config) -> None:
    for key, value, meta in _keys(cfg):
        choices = meta.get("choices", ())
        if choices and value not in choices:
            raise ConfigError(f"config key '{key}' is {value!r}; choose one of: {', '.join(choices)}")
    blocks = BACKBONE_BLOCKS[cfg.model.backbone]
    if not 1 <= cfg.model.k <= blocks:
        raise ConfigError(
            f"model.k={cfg.model.k} is impossible for {cfg.model.backbone}: K must be between 1 and its {blocks} "
            f"residual blocks; set model.k to a value in 1..{blocks}"
        )


def _resolve(m: ModelConfig) -> None:
    """
    Derive what follows from K and the mode, so that one key changed alone (model.k, model.mode) still gives a
    whole config: e2e takes K = 1, the paper's split falls back to the balanced one where it is not defined, and
    the cut is written into model.blocks_per_stage.
    """
    blocks = BACKBONE_BLOCKS[m.backbone]
    if m.mode == "e2e":
        if m.k != 1:
            log.info("model.mode=e2e trains one network end to end: K=1 (model.k=%d does not apply)", m.k)
            m.blocks_per_stage = []  # a cut into model.k stages
        # One stage: nothing to cut or profile; a per-stage kernel list keeps its last, H's.
        m.k, m.split, m.aux_kernels = 1, "balanced", m.aux_kernels[-1:]
    if m.split == "reference" and (m.backbone != "resnet34" or m.k not in (4, 8)):
        log.info("model.split=reference is the paper's cut of resnet34 into K=4 or K=8 stages; %s at K=%d uses "
                 "model.split=balanced (equal blocks per stage) instead", m.backbone, m.k)
        m.split = "balanced"
    if not m.blocks_per_stage and (m.split != "auto" or m.k == 1):
        m.blocks_per_stage = stage_sizes(blocks, m.k, m.split)


def _validate(cfg: Config) -> None:
    m, d = cfg.model, cfg.data
    blocks = BACKBONE_BLOCKS[m.backbone]
    if m.blocks_per_stage and (len(m.blocks_per_stage) != m.k or min(m.blocks_per_stage) < 1
                               or sum(m.blocks_per_stage) != blocks):
        raise ConfigError(f"model.blocks_per_stage={m.blocks_per_stage} must be K={m.k} positive counts summing to "
                          f"{m.backbone}'s {blocks} residual blocks; or set model.blocks_per_stage=[] to derive it "
                          f"from model.split")
    if len(m.classifier_kernels) != LAYERS or min(m.classifier_kernels) < 1:
        raise ConfigError(f"model.classifier_kernels={m.classifier_kernels} needs {LAYERS} positive kernels, one per "
                          f"layer of the backbone (layer1..layer4), e.g. [9, 9, 7, 5]")
    if m.aux_kernels and (len(m.aux_kernels) != m.k or min(m.aux_kernels) < 1):
        raise ConfigError(f"model.aux_kernels={m.aux_kernels} gives one kernel per stage, so it needs K={m.k} positive "
                          f"kernels (A_1..A_{m.k - 1}, H); to change model.k alone, set model.aux_kernels=[] and "
                          f"model.classifier_kernels (one kernel per backbone layer, for any K)")
    for key, value, meta in _keys(cfg):  # each key's own bound or check, declared beside it
        problem = meta.get("problem") and meta["problem"](key, value)
        if problem:
            raise ConfigError(problem)
    _validate_schedule(cfg.train)
    if len(d.mean) != 3 or len(d.std) != 3 or min(d.std) <= 0:
        raise ConfigError(f"data.mean and data.std need 3 values (RGB), std > 0; got {d.mean} / {d.std}")
    problem = check_choice(cfg.predict.classifier, m.k)
    if problem:
        raise ConfigError(problem)


def _validate_schedule(t: TrainConfig) -> None:
    steps = t.lr_steps
    if t.schedule == "step" and (not steps or min(steps) < 1 or steps != sorted(set(steps))):
        raise ConfigError(f"train.schedule=step needs train.lr_steps: the epochs after which the lr drops, increasing "
                          f"and >= 1 (e.g. train.lr_steps=[30,40]); got {steps}")
    if t.schedule == "plateau" and steps:
        raise ConfigError(f"train.lr_steps={steps} applies to train.schedule=step; set train.schedule=step, or "
                          f"train.lr_steps=[] for the plateau schedule")


def stage_replicas(t: TrainConfig, k: int) -> list[int]:
    """train.replicas as one count per stage."""
    return [t.replicas] * k if isinstance(t.replicas, int) else list(t.replicas)


def _validate_replicas(cfg: Config) -> None:
    t, k = cfg.train, cfg.model.k
    replicas = stage_replicas(t, k)
    if len(replicas) != k:
        raise ConfigError(f"train.replicas={t.replicas} gives {len(replicas)} counts for K={k} stages; give one "
                          f"count per stage (a list of {k}) or one number for every stage, e.g. train.replicas=2")
    if min(replicas) < 1:
        raise ConfigError(f"train.replicas={t.replicas}: every stage needs at least 1 replica (1: no replicas)")
    if max(replicas) > 1 and t.executor != "ray":
        raise ConfigError(f"train.replicas={t.replicas} needs train.executor=ray (each replica is an actor with its "
                          f"own device); set train.executor=ray or train.replicas=1")
    if max(replicas) > 1 and t.transport != "object_store":
        raise ConfigError(f"train.transport={t.transport} carries activations between single stage actors; with "
                          f"train.replicas={t.replicas} set train.transport=object_store")
    if t.plan == "auto" and t.executor != "ray":
        raise ConfigError("train.plan=auto plans stage replicas on several devices, which needs train.executor=ray; "
                          "set train.executor=ray, or train.plan=manual")


def config_from_dict(data: dict) -> Config:
    """Build and validate a Config from nested dicts (as read from YAML)."""
    cfg = _build(Config, data or {}, "")
    _validate_choices(cfg)
    _resolve(cfg.model)
    _validate(cfg)
    _validate_replicas(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def _apply_override(data: dict, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"--set expects key=value (e.g. model.k=8), got {item!r}")
    key, raw = item.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    node = data
    *parents, last = key.strip().split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {item}: '{part}' is not a section")
    node[last] = value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> Config:
    """Load a YAML config (or the defaults when `path` is None) and apply `--set` overrides."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pass a YAML file such as configs/demo.yaml")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    for item in overrides:
        _apply_override(data, item)
    try:
        return config_from_dict(data)
    except ConfigError as exc:
        source = [str(path)] if path is not None else []
        source += ["--set overrides"] if overrides else []
        where = f" (from {' and '.join(source)})" if source else ""
        raise ConfigError(f"{exc}{where}") from None


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
