"""Prediction: exact tiled inference, predictions.csv and heatmaps from a trained checkpoint, input errors."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from distlocal.cli import main
from distlocal.data import ManifestError
from distlocal.engine.trainer import Trainer
from distlocal.model import build_stages
from distlocal.model.tiling import footprint, tile_plan, tiled_forward
from distlocal.predict import Predictor


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])  # BasicBlock and Bottleneck
def test_tiled_inference_equals_whole_slide(make_cfg, backbone):
    """Every stage over overlapping tiles gives the whole-map output, on odd sizes, with many tiles per axis."""
    stages = build_stages(make_cfg(f"model.backbone={backbone}", "model.split=balanced", "model.k=4"), 2)
    # float64: tiles and the whole map sum the same products in other orders; fp32 rounding through 16 blocks
    # differs from one CPU to the next, float64's is far below the 1e-9 asked here.
    x = torch.randn(1, 3, 293, 261, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for stage in stages:
        features = torch.nn.Sequential(*([stage.modules["stem"]] if "stem" in stage.modules else []),
                                       stage.modules["backbone"]).eval().double()
        fp = footprint(features)
        with torch.no_grad():
            whole = features(x)
        # Three tiles per axis (a middle tile has neighbours on both sides); more cost seconds and prove no more.
        outputs = -(-min(whole.shape[2:]) // 3)
        side = 2 * (-(-fp.reach // fp.stride) * fp.stride) + outputs * fp.stride
        tiles = len(list(tile_plan(x.shape[2], fp, outputs))) * len(list(tile_plan(x.shape[3], fp, outputs)))
        with torch.no_grad():
            tiled = tiled_forward(features, x, side * side)
        assert tiles >= 9
        assert tiled.shape == whole.shape
        torch.testing.assert_close(tiled, whole, rtol=1e-9, atol=1e-11)
        x = whole


def test_tiles_too_small_name_the_key(make_cfg):
    stage = build_stages(make_cfg("model.k=4"), 2)[0]
    features = torch.nn.Sequential(stage.modules["stem"], stage.modules["backbone"]).eval()
    with pytest.raises(ValueError, match=r"predict\.max_tile_pixels"):
        tiled_forward(features, torch.zeros(1, 3, 200, 200), 100)


@pytest.fixture(scope="module")
def checkpoint(manifest, tmp_path_factory):
    from distlocal.config_load import load_config

    run_dir = tmp_path_factory.mktemp("run")
    cfg = load_config(None, ["train.device=cpu", "train.epochs=1", "model.k=4", "model.rfr.patch_size=24",
                             f"data.manifest={manifest}", "tracking.enabled=false", "train.heatmaps=0"])
    Trainer(cfg, run_dir).fit()
    return run_dir / "checkpoints" / "best"


def test_predict_writes_csv_heatmaps_and_matches_evaluation(checkpoint, manifest, tmp_path, capsys):
    """
    Manifest and bare slide inputs; the ensemble's probabilities are the mean of the trained stages' own eval_step
    ones; the recorded best classifier decides by default; tiling changes nothing.
    """
    slide = next(manifest.parent.glob("slides/*.tiff"))
    lone = tmp_path / "new_slide.tiff"
    lone.write_bytes(slide.read_bytes())
    out = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(checkpoint), "--out", str(out), str(manifest), str(lone),
                 "--set", "predict.aux_heatmaps=true", "--set", "predict.classifier=ensemble"]) == 0
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(rows) == 13
    assert rows[-1]["slide_id"] == "new_slide"
    assert rows[-1]["label"] == ""
    assert {r["correct"] for r in rows[:-1]} <= {"0", "1"}
    assert {r["classifier"] for r in rows} == {"ensemble"}
    assert all(abs(float(r["prob_class0"]) + float(r["prob_class1"]) - 1) < 1e-4 for r in rows)
    assert (out / "heatmaps" / "new_slide.png").stat().st_size > 1000  # H's attention: the ensemble's deepest
    assert sorted(p.name for p in (out / "heatmaps").glob("new_slide_*.png")) == [
        "new_slide_A_1.png", "new_slide_A_2.png", "new_slide_A_3.png"]
    summary = json.loads((out / "predictions.json").read_text())
    assert summary["labelled"] == 12
    assert (summary["classifier"], summary["stages_run"]) == ("ensemble", 4)
    assert "12 labelled" in capsys.readouterr().out

    from distlocal.data import SlideLoader, read_manifest
    from distlocal.engine.checkpoint import load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    stages = build_stages(ckpt.config, 2)
    for stage, state in zip(stages, ckpt.stages, strict=True):
        stage.load_state_dict(state)
    record = read_manifest(manifest).records[0]
    x = SlideLoader(ckpt.config.data, train=False).load(record)
    every = []
    for stage in stages:
        x, probs, _ = stage.eval_step(x)
        every.append(probs)
    assert float(rows[0]["prob_class1"]) == pytest.approx(float(torch.stack(every).mean(0)[1]), abs=1e-5)

    x = SlideLoader(ckpt.config.data, train=False).load(record)
    best = Predictor.load(checkpoint)
    recorded = ckpt.trainer["best_classifier"]
    assert best.choice.name == recorded
    depth = 4 if recorded == "H" else int(recorded[2:])
    torch.testing.assert_close(best(x)["probs"], every[depth - 1], rtol=1e-4, atol=1e-5)
    whole = Predictor.load(checkpoint, ["predict.classifier=H"])(x)["probs"]
    tiled = Predictor.load(checkpoint, ["predict.max_tile_pixels=6400", "predict.classifier=H"])(x)["probs"]
    torch.testing.assert_close(tiled, whole, rtol=1e-4, atol=1e-5)


def test_predict_by_region_writes_what_the_whole_slide_predict_writes(checkpoint, manifest, tmp_path):
    """
    With model.stream on, or a slide larger than one tile, predict reads the slide by region (stage 1's tiles read
    their own regions, as a streamed training's do) and writes the whole-slide predict's probabilities and heatmap.
    fp32: tiles sum the same products as the whole map in other orders (~1e-7 relative per layer), far below 1e-5.
    """
    from pathlib import Path

    import numpy as np

    from distlocal.plots import _pyplot

    slide = str(next(manifest.parent.glob("slides/*.tiff")))
    runs = {"whole": [], "stream": ["model.stream=on", "predict.max_tile_pixels=6400"],
            "tiles": ["predict.max_tile_pixels=6400"]}
    rows, pictures, plt = {}, {}, _pyplot()
    for name, overrides in runs.items():
        out = tmp_path / name
        assert main(["predict", "--checkpoint", str(checkpoint), "--out", str(out), slide,
                     *[a for o in overrides for a in ("--set", o)]]) == 0
        rows[name] = next(csv.DictReader((out / "predictions.csv").open()))
        pictures[name] = plt.imread(out / "heatmaps" / f"{Path(slide).stem}.png")
    assert int(rows["whole"]["height"]) * int(rows["whole"]["width"]) > 6400  # so the others read by region
    for name in ("stream", "tiles"):
        for key in ("prob_class0", "prob_class1", "height", "width"):
            assert float(rows[name][key]) == pytest.approx(float(rows["whole"][key]), abs=1e-5)
        assert pictures[name].shape == pictures["whole"].shape
        assert np.abs(pictures[name] - pictures["whole"]).mean() < 1e-3  # the attention within fp32 rounding


def test_predict_input_errors(checkpoint, tmp_path, capsys):
    """A missing slide, a file that is no slide and a folder that is no checkpoint: exit 2, the path and the fix."""
    (tmp_path / "notes.txt").write_text("x")
    cases = [([str(checkpoint)], tmp_path / "missing.tiff", r"missing.tiff does not exist; give slide files"),
             ([str(checkpoint)], tmp_path / "notes.txt", r"neither a manifest (.csv) nor a slide"),
             ([str(tmp_path)], tmp_path / "notes.txt", r"no checkpoint at")]
    for ckpt, item, message in cases:
        assert main(["predict", "--checkpoint", *ckpt, "--out", str(tmp_path / "out"), str(item)]) == 2
        assert message in capsys.readouterr().err


def test_predict_refuses_duplicate_slide_ids(manifest):
    """Outputs are named by slide id: the same slide twice would overwrite its heatmap."""
    from distlocal.predict import slide_records

    assert len(slide_records([str(manifest)], ["class0", "class1"])) == 12
    with pytest.raises(ManifestError, match=r"slide ids \['slide_0000'"):
        slide_records([str(manifest), str(manifest)], ["class0", "class1"])
