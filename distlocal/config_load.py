"""
Loading configs: YAML and ``--set key=value`` overrides into the typed dataclasses of config.py, strictly.

An unknown key, a wrong type or an impossible value fails at once with a message naming the key and the fix (each
field's own check sits beside it in config.py; the checks across keys are here). What follows from K and the mode
(the cut, e2e's single stage) is resolved on loading, so one key changed alone still gives a whole config, and the
resolved config records it.

Example::

    cfg = load_config("configs/demo.yaml", ["model.k=8", "model.rfr.enabled=false"])
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from distlocal.classifiers import check_choice
from distlocal.config import (
    BACKBONE_BLOCKS,
    LAYERS,
    Config,
    ModelConfig,
    TrainConfig,
    stage_replicas,
)
from distlocal.config_error import ConfigError
from distlocal.cut import stage_sizes

__all__ = ["config_from_dict", "config_to_dict", "load_config", "save_config"]

log = logging.getLogger(__name__)


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
