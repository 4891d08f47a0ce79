"""bench memory: the bytes a training step holds, counted on the real modules; local stages need far less."""

from __future__ import annotations

import json
import math

import torch

from distlocal.bench.memory import _saved_bytes, bench_memory, format_memory, variant_configs


def test_saved_bytes_counts_each_storage_once():
    """Autograd saves a matmul's inputs; the same tensor saved twice counts once."""
    a = torch.randn(256, 256, requires_grad=True)
    b = torch.randn(256, 256, requires_grad=True)
    saved, _ = _saved_bytes(lambda: (a @ b).sum())
    assert saved == 2 * 256 * 256 * 4
    saved, _ = _saved_bytes(lambda: (a @ a).sum())
    assert saved == 256 * 256 * 4
    saved, _ = _saved_bytes(lambda: (a @ b).sum(), exclude={b.untyped_storage().data_ptr()})  # e.g. a weight
    assert saved == 256 * 256 * 4


def test_bench_memory_stages_hold_a_fraction_of_end_to_end(tmp_path, capsys):
    """At 384 x 320: every stage at K = 4 and K = 8 holds less than end to end, K = 8 less than K = 4."""
    report = bench_memory(tmp_path, [(384, 320)], ["model.rfr.patch_size=32", "model.aux_kernels=[]"], "cpu")
    entry = report["sizes"][0]
    assert [len(entry[n]) for n in ("e2e", "k4", "k8")] == [1, 4, 8]
    e2e = entry["e2e"][0]["model_total"]
    largest = {n: max(r["model_total"] for r in entry[n]) for n in ("k4", "k8")}
    assert largest["k8"] < largest["k4"] < e2e
    assert entry["e2e"][0]["saved_activations"] > max(r["saved_activations"] for r in entry["k4"])
    # parameters add up: the stages together hold the end-to-end network plus their auxiliary models
    assert sum(r["params"] for r in entry["k4"]) > entry["e2e"][0]["params"]
    # the slide is not kept for backward (the frozen stem saves nothing); a later stage's input is
    assert entry["k4"][0]["input"] == entry["e2e"][0]["input"] == 0
    slide = 384 * 320 * 3 * 4  # counted while the stem runs: with its output and conv1 and bn1 outputs, 5.7x
    assert entry["k4"][0]["stem_peak"] > 5 * slide
    assert entry["k4"][0]["model_total"] >= entry["k4"][0]["stem_peak"]
    assert entry["k4"][1]["stem_peak"] == 0
    assert entry["k4"][1]["input"] > 0
    # folded BatchNorm, and folded with recomputed activations: every configuration holds less, same parameters
    for name in ("e2e", "k4", "k8"):
        for variant in ("fold", "rc"):
            largest = max(r["model_total"] for r in entry[f"{name}_{variant}"])
            assert largest < max(r["model_total"] for r in entry[name])
            assert [r["params"] for r in entry[f"{name}_{variant}"]] == [r["params"] for r in entry[name]]
        assert all(r["recompute_peak"] > 0 for r in entry[f"{name}_rc"])
        assert all(r["recompute_peak"] == 0 for r in entry[name] + entry[f"{name}_fold"])
    assert entry["e2e_fold"][0]["saved_activations"] < 0.7 * entry["e2e"][0]["saved_activations"]  # no RFR there
    table = format_memory(report)
    assert "| 384 x 320 | model_total, unfolded BN, fp32 |" in table  # labelled with what ran: fp32 on the CPU
    assert "| 384 x 320 | model_total, folded BN + recompute, fp32 |" in table
    assert "e2e_fp32" not in entry  # fp32 already: no second fp32 row
    written = json.loads((tmp_path / "memory.json").read_text())
    assert written["device"] == "cpu"
    assert written["complete"]  # written after every configuration, marked complete at the end
    assert (tmp_path / "memory.png").stat().st_size > 5000


def test_a_bf16_run_labels_its_rows_and_adds_an_fp32_row():
    """Under bf16 (CUDA's default) each row says bf16, and an unfolded fp32 row is measured for the paper's Table 2."""
    configs = variant_configs("bf16")
    assert configs["e2e_fp32"][-2:] == ["train.fold_batchnorm=false", "train.precision=fp32"]
    assert "k8_fp32" in configs
    assert "e2e_fp32" not in variant_configs("fp32")
    rows = {name: [{"stage": 1, "model_total": 2**20 * (2 if "fp32" in name else 1)}] for name in configs}
    table = format_memory({"device": "GPU", "precision": "bf16", "sizes": [{"size": [8, 8], **rows}]})
    assert "| 8 x 8 | model_total, unfolded BN, bf16 | 1 | 1 | 100.0 % |" in table
    assert "| 8 x 8 | model_total, unfolded BN, fp32 | 2 | 2 | 200.0 % | 100.0 % |" in table


def test_bench_memory_stream_rows_and_a_stage_flat_against_the_slide(tmp_path):
    """
    Bench memory --stream at two small sizes (3 and 6 tiles of 192 px): every row; each stage's peak in its tiles'
    and chunks' reruns and in its global part's autograd is the same at both (the tile sets it, not the slide), so
    the largest stage is too, measured and computed up to 20X.
    """
    from distlocal.bench.stream_memory import bench_stream_memory, format_stream_memory

    sizes = [(192, 576), (192, 1152)]
    report = bench_stream_memory(tmp_path, sizes, 192, ["model.backbone=resnet18", "model.rfr.patch_size=16",
                                                        "model.classifier_kernels=[3,3,2,1]"], "cpu", ("k4",))
    small, large = (m["rows"] for m in report["measured"]["k4"])
    assert len(small) == len(large) == 4
    assert all(r["streamed"] for r in small + large)
    for a, b in zip(small, large, strict=True):
        assert a["tile"] == b["tile"] > 0, a["stage"]  # the slide doubles, a tile's rerun does not
        assert a["global"] == b["global"] > 0, a["stage"]  # nor the MLP and RFR's crops (z stays in host memory)
    largest = [max(r["model_total"] for r in rows) for rows in (small, large)]
    assert largest[1] == largest[0]
    assert not any(r["streamed"] for r in report["time"]["k4"]["whole"])
    assert len(report["computed"]) == 9  # the paper's three slides at 5X, 10X, 20X
    assert report["computed"][-1]["size"] == [4 * 23849, 4 * 10257]
    assert len({max(r["model_total"] for r in entry["k4"]) for entry in report["computed"]}) == 1  # 5X to 20X: flat
    assert "| 23849 x 10257 | 20X | 95396 x 41028 |" in format_stream_memory(report)
    assert (tmp_path / "memory_stream.png").stat().st_size > 5000


def test_bench_stream_step_trains_every_stage_of_a_slide_read_by_region(tmp_path, capsys):
    """
    `bench memory --stream --step HxW`: one streamed K=4 step of a slide that stage 1 reads region by region, each
    stage on the previous one's output; the table and stream_step.json give each stage's seconds, bytes and map.
    """
    from distlocal.cli import main

    assert main(["bench", "memory", "--stream", "--step", "300x200", "--stream-tile", "96", "--device", "cpu",
                 "--set", "model.backbone=resnet18", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "stream_step.json").read_text())
    shapes = [r["output_shape"] for r in report["stages"]]
    assert all(r["streamed"] for r in report["stages"])
    # ResNet18 K=4 (balanced: one layer a stage): 64 channels at 1/6 (the stem's stride), then halving each stage
    assert shapes == [[1, 64, 50, 34], [1, 128, 25, 17], [1, 256, 13, 9], [1, 512, 7, 5]]
    assert [r["host_output_gb"] for r in report["stages"]] == [math.prod(s) * 4 / 1e9 for s in shapes]
    assert "| 4 | yes |" in capsys.readouterr().out
    assert main(["bench", "memory", "--stream", "--step", "300x200,400x400", "--out", str(tmp_path)]) == 2
    assert "--step '300x200,400x400': give one size" in capsys.readouterr().err
