"""`make demo` cannot rot: the demo script runs end to end on its small cohort, as a user would run it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.demo

REPO = Path(__file__).resolve().parents[1]


def test_small_demo_runs_end_to_end(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "examples/run_demo.py"), "--small", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "demo finished in" in proc.stdout
    # offline the demo says plainly that it fell back to random weights; online it used the pretrained ones
    pretrained = (tmp_path / "features/20x_256px_0px/resnet18/h5_files").is_dir()
    assert pretrained != ("RANDOM encoder weights" in proc.stdout)
    record = json.loads((tmp_path / "predictions/demo_gmmamba/holdout.json").read_text())
    assert abs(sum(record["probabilities"].values()) - 1) < 1e-6
    assert (tmp_path / "predictions/demo_gmmamba/holdout_heatmap.png").exists()
    assert (tmp_path / "runs/demo_gmmamba/summary.csv").exists() and (tmp_path / "runs/demo_abmil/summary.csv").exists()
    assert 0 <= record["top10_on_annotation"] <= 1  # the lesions' ground truth reached predict
    assert (tmp_path / "report.html").stat().st_size > 10_000
    table = proc.stdout[proc.stdout.index("top-10 attention on lesions"):]
    assert "gmmamba" in table and "abmil" in table and "external: AUC (95% CI)" in table
    metrics = json.loads((tmp_path / "predictions/demo_gmmamba/metrics.json").read_text())
    assert metrics["slide"]["n"] == 4 and set(metrics["slide"]["metrics"]["auc"]) >= {"value", "ci"}
    comparison = json.loads((tmp_path / "comparisons/demo_abmil__vs__demo_gmmamba_predictions.json").read_text())
    assert comparison["n"] == 4 and "p_value" in comparison["balanced_accuracy"]
