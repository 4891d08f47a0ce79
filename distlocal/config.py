"""
Typed configuration: dataclasses loaded from YAML, overridable with ``--set key=value``.

Every default lives here, once, with a comment saying what it does, and each field's own check beside it. Loading
(YAML, overrides, the checks across keys, what follows from K and the mode) is config_load.py's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from distlocal.config_error import ConfigError

__all__ = ["Config", "ConfigError", "DataConfig", "ModelConfig", "PredictConfig", "RFRConfig", "RunConfig",
           "TrackingConfig", "TrainConfig", "stage_replicas"]

# Residual blocks per backbone: the finest split possible is one block per stage.
BACKBONE_BLOCKS = {"resnet18": 8, "resnet34": 16, "resnet50": 16}
LAYERS = 4  # residual layer groups of every ResNet (layer1..layer4), each at its own stride



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
    # model.stream on / auto, stage 1 (or E2E) reading its slide by region: keep: its frozen stem's map is computed
    # once and held in host memory for the step (3.6 bytes per slide pixel in bf16) | recompute: never held, each
    # region of it is computed again where it is read (forward, backward, RFR's crops): less host memory, the slide
    # decoded ~3 times.
    stream_stem: str = choice("keep", "recompute")


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


def stage_replicas(t: TrainConfig, k: int) -> list[int]:
    """train.replicas as one count per stage."""
    return [t.replicas] * k if isinstance(t.replicas, int) else list(t.replicas)
