"""bench magnification: four arms (5X / 10X x local / E2E, streamed) trained and scored on the same fine-task slides."""

from __future__ import annotations

import json

from distlocal.cli import main


def test_bench_magnification_runs_its_arms_end_to_end(tmp_path, capsys, monkeypatch):
    """
    One seed, tiny slides, K=2, one epoch, two of the four arms (each magnification and each mode once: the other
    two are the same code with the other pairing): each trains streamed, is scored on the test split; the PNG.
    """
    monkeypatch.setattr("distlocal.bench.magnification.ARMS", [(5, "e2e"), (10, "local")])
    out = tmp_path / "bench"
    assert main(["bench", "magnification", "--slides", "8", "--size", "24", "24", "--seeds", "1", "--epochs", "1",
                 "--set", "model.k=2", "--set", "model.classifier_kernels=[1,1,1,1]", "--out", str(out)]) == 0
    report = json.loads((out / "magnification.json").read_text())
    assert [(a["magnification"], a["mode"]) for a in report["arms"]] == [(5, "e2e"), (10, "local")]
    assert report["test_slides"] == 2
    for arm in report["arms"]:
        assert 0.0 <= arm["acc_ci"][0] <= arm["acc"] <= arm["acc_ci"][1] <= 1.0, arm
    for run in report["runs"]:
        cfg = json.loads((out / "runs" / f"{run['mode']}_{run['magnification']}x_seed0" / "summary.json").read_text())
        assert cfg["completed"]
    assert (out / "magnification.png").stat().st_size > 0
    assert "| local 10X |" in capsys.readouterr().out
