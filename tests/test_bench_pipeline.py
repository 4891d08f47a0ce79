"""`distlocal bench pipeline` on a real local Ray: both executors timed on the same slides."""

import json

import pytest


def test_bench_pipeline_reports_rates_busy_fractions_and_the_ideal_bound(local_ray, tmp_path, capsys):
    """`distlocal bench pipeline` measures both executors on the same slides and writes pipeline.json."""
    from distlocal.cli import main

    assert main(["bench", "pipeline", "--slides", "6", "--size", "96", "96", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "pipeline.json").read_text())
    assert result["local_slides_per_s"] > 0
    assert result["ray_slides_per_s"] > 0
    assert result["ideal_speedup"] == pytest.approx(sum(result["stage_s"]) / max(result["stage_s"]))
    assert len(result["busy_fraction"]) == 2
    assert all(0 < b <= 1.0 for b in result["busy_fraction"])
    assert "| K | in flight | slides |" in capsys.readouterr().out
