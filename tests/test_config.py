"""Config loading: strict keys and types, impossible values, overrides, round trip."""

import pytest

from distlocal.config import ConfigError
from distlocal.config_load import config_from_dict, config_to_dict, load_config, save_config


def test_defaults_hold_the_contract_keys():
    """Every key named in the design contract exists in the defaults."""
    d = config_to_dict(load_config())
    for key in ["model.k", "model.backbone", "model.split", "model.mode", "model.rfr.enabled", "model.rfr.alpha",
                "train.executor", "train.epochs", "train.accumulate", "train.max_inflight", "train.precision",
                "data.manifest", "data.magnification", "tracking.uri", "tracking.experiment", "run.dir"]:
        section, *rest = key.split(".")
        node = d[section]
        for part in rest:
            node = node[part]


def test_unknown_key_names_key_and_suggests_fix():
    """A misspelt key fails with the key and the closest valid one."""
    with pytest.raises(ConfigError, match=r"unknown config key 'model\.kk'.*did you mean 'model\.k'"):
        load_config(None, ["model.kk=4"])


def test_wrong_type_names_key():
    """A string where an int belongs fails naming the key."""
    with pytest.raises(ConfigError, match=r"'train\.epochs' must be int"):
        load_config(None, ["train.epochs=many"])


@pytest.mark.parametrize(("override", "pattern"), [
    ("model.k=0", r"model\.k=0 is impossible.*1\.\.16"),
    ("model.k=17", r"model\.k=17 is impossible"),
    ("model.rfr.alpha=-1", r"model\.rfr\.alpha' must be >= 0"),
    ("train.accumulate=0", r"train\.accumulate' must be > 0"),
    ("model.split=diagonal", r"model\.split.*choose one of"),
    ("train.executor=mpi", r"train\.executor.*choose one of: local, ray"),
    ("train.gpus_per_stage=-2", r"train\.gpus_per_stage=-2\.0; give a GPU count"),
    ("train.placement=anywhere", r"train\.placement.*strict_pack"),
    ("train.cpus_per_stage=-1", r"train\.cpus_per_stage' must be >= 0"),
    ("train.gpus=-1", r"^config key 'train\.gpus' must be >= 0, got -1 "),  # each key its own message
    ("train.allreduce_gb_per_s=0", r"^config key 'train\.allreduce_gb_per_s' must be > 0, got 0\.0 "),
    ("train.collective_timeout_s=-5", r"^config key 'train\.collective_timeout_s' must be > 0, got -5\.0 "),
    ("train.loaders=0", r"^train\.loaders=0; give a number of loader actors \(at least 1, e\.g\. train\.loaders=2\)"
                        r", or auto"),
    ("train.loaders=fast", r"^train\.loaders='fast'; give a number .* or auto to set it from the measured read rate"),
])
def test_impossible_values_fail(override, pattern):
    """Impossible values fail at once with the key in the message."""
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, ["model.split=balanced", override])


def test_reference_split_outside_k4_k8_falls_back_to_balanced():
    """The paper's split exists for K=4 and K=8; another K gets the balanced split, and the config records the cut."""
    m = load_config(None, ["model.k=3"]).model
    assert (m.k, m.split, m.blocks_per_stage) == (3, "balanced", [5, 5, 6])
    m = load_config(None, ["model.k=4"]).model
    assert (m.split, m.blocks_per_stage) == ("reference", [2, 3, 5, 6])


def test_e2e_takes_one_stage_from_any_k():
    """model.mode=e2e alone is K=1 whatever model.k, split and per-stage kernels the config had."""
    m = load_config(None, ["model.k=8", "model.aux_kernels=[3,3,3,3,3,2,2,1]", "model.mode=e2e"]).model
    assert (m.k, m.split, m.blocks_per_stage, m.aux_kernels) == (1, "balanced", [16], [1])


def test_a_hand_written_cut_must_match_k():
    """An explicit cut is K counts: changing K alone fails and names how to derive the cut instead."""
    with pytest.raises(ConfigError, match=r"model\.blocks_per_stage=\[2, 3, 5, 6\] must be K=8.*blocks_per_stage=\[\]"):
        load_config(None, ["model.blocks_per_stage=[2,3,5,6]", "model.k=8"])


def test_per_stage_kernels_of_older_configs_still_load():
    """An older config's aux_kernels (one per stage) loads as it was; with another K it points to classifier_kernels."""
    old = {"model": {"k": 4, "split": "reference", "aux_kernels": [3, 3, 2, 1]}, "train": {"cpus_per_stage": 1.0}}
    cfg = config_from_dict(old)
    assert (cfg.model.aux_kernels, cfg.train.cpus_per_stage) == ([3, 3, 2, 1], 1.0)
    with pytest.raises(ConfigError, match=r"needs K=8 positive kernels.*model\.classifier_kernels"):
        config_from_dict({"model": {**old["model"], "k": 8}})


@pytest.mark.parametrize("kernels", ["[3,3,2]", "[3,3,2,0]"])
def test_classifier_kernels_are_one_per_backbone_layer(kernels):
    """model.classifier_kernels holds one positive kernel for each of the four layers."""
    with pytest.raises(ConfigError, match=r"model\.classifier_kernels=.*needs 4 positive kernels"):
        load_config(None, [f"model.classifier_kernels={kernels}"])


def test_resnet18_bounds_k_by_its_blocks():
    """K is bounded by the chosen backbone's residual blocks (8 for resnet18)."""
    with pytest.raises(ConfigError, match="between 1 and its 8 residual blocks"):
        load_config(None, ["model.backbone=resnet18", "model.split=balanced", "model.k=9"])


def test_yaml_file_and_overrides(tmp_path):
    """A YAML file loads, and --set overrides win over it with YAML-typed values."""
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  k: 8\n  rfr:\n    enabled: true\ntrain:\n  epochs: 3\n")
    cfg = load_config(path, ["model.rfr.enabled=false", "data.mean=[0.5,0.5,0.5]"])
    assert (cfg.model.k, cfg.model.rfr.enabled, cfg.train.epochs, cfg.data.mean) == (8, False, 3, [0.5, 0.5, 0.5])


def test_error_names_the_file(tmp_path):
    """Errors from a file name that file."""
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"train\.epoch.*\(from .*bad\.yaml\)"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"train\.epoch.*\(from .*bad\.yaml and --set overrides\)"):
        load_config(path, ["model.k=4"])


def test_saved_config_round_trips(tmp_path):
    """A saved resolved config loads back to the same values."""
    cfg = load_config(None, ["model.k=8", "train.seed=7"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
