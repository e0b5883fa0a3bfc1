"""`python -m experiments.bench_train --smoke` runs the three models end to end and writes its files."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # 55 s on 2 CPU cores; the benchmark is for GPUs
def test_smoke_run_writes_results_with_ratios(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "experiments.bench_train", "--smoke", f"--out-dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    files = sorted(os.listdir(tmp_path))
    assert len(files) == 2 and files[0].endswith("_smoke.json") and files[1].endswith("_smoke.md")
    data = json.load(open(tmp_path / files[0]))
    assert data["smoke"] and data["batch"] == 8 and "jax" in data["versions"] and data["date"]
    assert [row["model"] for row in data["rows"]] == ["resnet50", "rednet50", "cednet50"]
    base = data["rows"][0]["images_per_sec"]
    for row in data["rows"]:
        assert row["images_per_sec"] > 0
        assert row["speed_vs_resnet50"] == pytest.approx(row["images_per_sec"] / base)
    assert "| cednet50 |" in open(tmp_path / files[1]).read()


def test_refuses_to_measure_without_a_gpu():
    result = subprocess.run([sys.executable, "-m", "experiments.bench_train"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "no GPU" in result.stderr and "--smoke" in result.stderr
