"""bench inference: the patch-based GABMIL baseline (tiling, features, attention) and the Table 3 report."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from distlocal.bench import inference
from distlocal.bench.inference import bench_inference, format_inference, synthetic_images
from distlocal.bench.patch_mil import PatchMIL, tile_slide
from distlocal.cli import main
from distlocal.slides import write_synthetic_dataset

_SMALL = ["model.backbone=resnet18", "model.k=2", "model.split=balanced", "model.aux_kernels=[3,1]"]


def _glass(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(238 + rng.normal(0, 2, (height, width, 3)), 0, 255).astype(np.uint8)


def test_tile_slide_keeps_tissue_tiles_and_pads_the_edges_with_glass():
    """A 500 x 300 slide is a 3 x 2 grid of 224 px tiles; only tiles at least a quarter tissue are kept."""
    image = _glass(500, 300)
    image[260:, 100:] = (205, 110, 170)  # pink tissue in the lower right
    tiles, positions, grid = tile_slide(image)
    assert grid == 6
    # (1, 0) ~40 % and (1, 1) ~28 % tissue; the bottom row's tiles are mostly padding (< 15 %)
    assert positions.tolist() == [[1, 0], [1, 1]]
    assert tiles.shape == (2, 224, 224, 3)
    assert tiles.dtype == np.uint8
    np.testing.assert_array_equal(tiles[0], image[224:448, 0:224])
    np.testing.assert_array_equal(tiles[1][:, :76], image[224:448, 224:300])
    assert (tiles[1][:, 76:] == 255).all()


def test_tile_slide_without_tissue_keeps_one_tile():
    tiles, positions, grid = tile_slide(_glass(448, 448))
    assert (len(tiles), grid) == (1, 4)
    assert positions.shape == (1, 2)


def test_patch_features_do_not_depend_on_the_batch_and_gabmil_attends_over_tiles():
    """Batched, device-normalised features equal the ResNet on each tile normalised by hand."""
    mean, std = [0.6, 0.5, 0.6], [0.2, 0.25, 0.2]
    model = PatchMIL.build("resnet18", 3, torch.device("cpu"), False, batch=2, mean=mean, std=std)
    tiles = np.random.default_rng(0).integers(0, 256, (5, 224, 224, 3), dtype=np.uint8)
    features = model.extract(tiles)
    assert features.shape == (5, 512)
    model.batch = 5
    torch.testing.assert_close(model.extract(tiles), features, rtol=1e-4, atol=1e-5)
    x = torch.from_numpy(tiles[3]).permute(2, 0, 1).float() / 255
    x = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    with torch.no_grad():
        torch.testing.assert_close(model.features(x[None])[0], features[3], rtol=1e-4, atol=1e-4)
        logits, attention = model.classifier(features)
    assert logits.shape == (1, 3)
    assert attention.shape == (5,)
    assert attention.sum().item() == pytest.approx(1.0, abs=1e-5)


def test_bench_inference_on_synthetic_slides_reports_table_3(make_cfg, tmp_path, monkeypatch):
    """Medians of the repeats, tile counts from the grid, the speed gain and the JSON / PNG outputs."""
    monkeypatch.setattr(inference, "CPU_TILE_PIXELS", 365 * 365)  # only the first slide is larger: also tiled
    images = synthetic_images([(460, 300), (256, 512)])
    assert images[0]["image"].shape == (460, 300, 3)
    report = bench_inference(tmp_path, images, make_cfg(*_SMALL, "model.pretrained=none"), repeats=3,
                             classifiers=["A_1", "ensemble"])
    assert [e["size"] for e in report["images"]] == [[460, 300], [256, 512]]
    for entry in report["images"]:
        g, o = entry["gabmil"], entry["ours"]
        h, w = entry["size"]
        assert g["grid_tiles"] == math.ceil(h / 224) * math.ceil(w / 224)
        assert 1 <= g["tiles"] <= g["grid_tiles"]
        runs = entry["runs"]["gabmil"]
        assert len(runs) == 3
        assert min(r["features_s"] for r in runs) <= g["features_s"] <= max(r["features_s"] for r in runs)
        assert g["total_s"] >= g["features_s"] > 0
        assert o["total_s"] >= o["forward_s"] > 0
        assert entry["speed_gain"] == pytest.approx(g["total_s"] / o["total_s"])
    first, second = report["images"]
    assert first["ours"]["tiled_pixels"] == 365 * 365
    assert len(first["runs"]["ours_tiled"]) == 3
    assert "tiled_total_s" not in second["ours"]  # 256 x 512 is not larger than a tile
    # Early exit: A_1 runs stage 1 of 2 only, so it computes less than H; the ensemble computes both classifiers
    early = second["by_classifier"]
    assert list(early) == ["A_1", "ensemble"]
    assert (early["A_1"]["stages_run"], early["ensemble"]["stages_run"]) == (1, 2)
    assert early["A_1"]["gflop"] < second["ours"]["gflop"] < early["ensemble"]["gflop"]
    assert early["A_1"]["speed_gain"] == pytest.approx(second["gabmil"]["total_s"] / early["A_1"]["total_s"])
    saved = json.loads((tmp_path / "inference.json").read_text())
    assert saved["backbone"] == "resnet18"
    assert saved["k"] == 2
    assert (tmp_path / "inference.png").stat().st_size > 5000
    table = format_inference(report)
    for row in ("| Tiling |", "| Features |", "| Prediction |", "| Total |", "| Tiles (tissue / grid) |"):
        assert row in table
    assert "460 x 300: GABMIL | Ours | Speed gain |" in table
    assert f"{report['images'][1]['speed_gain']:.1f}x" in table
    assert "(365² px tiles)" in table
    assert "| Ours deciding by A_1 (stages 1..1), total | - |" in table


def test_bench_inference_command_times_slides_of_a_manifest(tmp_path, capsys):
    """Slides are read as predict reads them (tissue crop at 5X), and the read time is reported apart."""
    manifest = write_synthetic_dataset(tmp_path / "slides", slides=2, classes=2, size=(480, 400), seed=0)
    out = tmp_path / "bench"
    sets = [arg for key in _SMALL for arg in ("--set", key)]
    assert main(["bench", "inference", str(manifest), "--mode", "memory", "--repeats", "1", "--device", "cpu",
                 "--out", str(out), *sets]) == 0
    report = json.loads((out / "inference.json").read_text())
    assert (len(report["images"]), report["deployed"]) == (2, [])
    assert all(e["read_s"] > 0 for e in report["images"])
    assert "| Read (both, not in total) |" in capsys.readouterr().out


def test_bench_inference_input_errors_name_the_problem(tmp_path, capsys):
    assert main(["bench", "inference", str(tmp_path / "missing.tiff"), "--out", str(tmp_path)]) == 2
    assert "missing.tiff does not exist" in capsys.readouterr().err
    assert main(["bench", "io", "slide.tiff", "--out", str(tmp_path)]) == 2
    assert "only bench inference" in capsys.readouterr().err
    assert main(["bench", "inference", "--sizes", "300x300", "--checkpoint", str(tmp_path / "nope"),
                 "--out", str(tmp_path)]) == 2
    assert "nope" in capsys.readouterr().err


def test_bench_inference_deployed_times_both_pipelines_from_the_written_file(tmp_path, capsys):
    """Deployed (the default): synthetic slides become SVS files; both tables, from the file and in memory."""
    out = tmp_path / "bench"
    sets = [arg for key in _SMALL for arg in ("--set", key)]
    assert main(["bench", "inference", "--sizes", "480x400", "--repeats", "1", "--workers", "0", "--device", "cpu",
                 "--out", str(out), *sets]) == 0
    assert (out / "slides" / "synthetic_480x400_20x_seed0.svs").is_file()
    report = json.loads((out / "inference.json").read_text())
    (entry,) = report["deployed"]
    g, o = entry["gabmil"], entry["ours"]
    assert (g["level"], g["read_size"], report["workers"]) == (1, 224, 0)
    assert g["total_s"] == pytest.approx(g["tiling_s"] + g["features_s"] + g["prediction_s"])
    assert o["total_s"] >= o["read_s"] + o["forward_s"] > 0
    assert entry["size"] == report["images"][0]["size"]  # the compute race runs on the crop ours read
    printed = capsys.readouterr().out
    assert "| Read (file to 5X tissue crop) | (in features) |" in printed
    assert "480x400: CLAM + GABMIL | Ours | Speed gain |" in printed
    assert "In memory:" in printed
    assert (out / "inference_deployed.png").stat().st_size > 5000  # the file-to-prediction table as a plot
