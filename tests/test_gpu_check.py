"""scripts/gpu_check.py, the one prepared GPU run, on the CPU paths it can run here (the GPU itself: docs/benchmarks.md)."""

import json
import subprocess
import sys

import pytest

from helpers import ROOT


@pytest.mark.slow
def test_gpu_check_runs_its_sections_on_cpu_and_writes_the_table(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--out", str(tmp_path), "--device",
                           "cpu", "--quick", "--only", "mlp", "cuda"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads((tmp_path / "gpu_check.json").read_text())["rows"]
    assert [status for _, _, status in rows] == ["ok", "ok"]
    mlp = next(figures for name, figures, _ in rows if name.startswith("mlp"))
    assert mlp.count("x;") + mlp.count("x (") == 2  # one manual/autograd ratio per network
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| section | result | status |" in table and table.count("| ok |") == 2


def test_gpu_check_refuses_cuda_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():  # on a GPU machine the script runs for real: scripts/gpu_check.sh
        return
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--device cpu" in proc.stderr
