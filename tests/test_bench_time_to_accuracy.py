"""scripts/bench_time_to_accuracy.py end to end on a tiny Fashion-MNIST in the real IDX format (gzipped, train
only, as the shared copy is): both recipes run, and the report's seconds and ratios are those of the curves the
processes wrote, read back."""

import gzip
import re
import subprocess
import sys

import numpy as np
import pytest

from helpers import ROOT, fake_digits, write_idx


@pytest.mark.slow
def test_the_benchmark_reports_the_seconds_its_curves_hold(tmp_path):
    raw = tmp_path / "data" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    images, labels = fake_digits(1100, seed=0)  # 500 held out (--val-size) + 600 to train on
    for name, array in (("train-images-idx3-ubyte", images), ("train-labels-idx1-ubyte", labels)):
        write_idx(tmp_path / name, array)
        with open(tmp_path / name, "rb") as f_in, gzip.open(raw / f"{name}.gz", "wb") as f_out:
            f_out.write(f_in.read())
    work, plot = tmp_path / "work", tmp_path / "tta.png"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_time_to_accuracy.py"), "--data", str(tmp_path / "data"),
         "--peer-epochs", "2", "--every", "0.5", "--val-size", "500", "--precisions", "32-true", "--target", "0.5",
         "--workdir", str(work), "--plot", str(plot), "trainer.max_epochs=2"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    import json

    peer = [json.loads(line) for line in (work / "peer.jsonl").read_text().splitlines()]
    ours = [json.loads(line) for line in (work / "ours-32-true.jsonl").read_text().splitlines()]
    assert len(peer) == 4 and len(ours) == 4  # 2 epochs, an evaluation every half epoch
    assert [p["samples"] for p in ours] == sorted(p["samples"] for p in ours)
    first = next(p for p in ours if p["acc"] >= 0.5)  # the patches are learnable: 50% is reached
    whole = peer[-1]
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| gradlab mnist_fast"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert float(cells[1]) == pytest.approx(first["s"], abs=0.051)
    assert float(cells[2]) == pytest.approx(first["cpu_s"], abs=0.051)
    wall_ratio, cpu_ratio = (float(x) for x in re.findall(r"\*\*([\d.]+)x\*\*", cells[3]))
    assert wall_ratio == pytest.approx(whole["s"] / first["s"], abs=0.006)
    assert cpu_ratio == pytest.approx(whole["cpu_s"] / first["cpu_s"], abs=0.006)
    assert plot.stat().st_size > 10_000 and np.frombuffer(plot.read_bytes()[:8], np.uint8)[1:4].tobytes() == b"PNG"
