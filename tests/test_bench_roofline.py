"""scripts/bench_roofline.py: its arithmetic (FLOP counts against hand counts, rates and fractions), not its timings."""

import itertools
import json

import pytest
import torch

from helpers import load_script, write_mnist

roofline = load_script("bench_roofline")


def test_linear_step_flops_are_three_matmuls():
    # y = x W^T + b: forward 2*B*in*out; backward dW = dy^T x and dx = dy W, the same again each.
    B, n_in, n_out = 5, 7, 3
    net = torch.nn.Linear(n_in, n_out)
    case = {"net": net, "inputs": (torch.randn(B, n_in, requires_grad=True),), "target": torch.randn(B, n_out),
            "loss": torch.nn.MSELoss(), "opt": torch.optim.SGD(net.parameters(), lr=0.1)}
    assert roofline.step_flops(case) == 2 * B * n_in * n_out * 3
    assert net.weight.grad is None  # counting leaves no gradient behind


def test_cnn_step_flops_match_a_hand_count():
    def conv(c_in, c_out, side):  # 2 * multiply-adds of a 3x3 convolution with `side` x `side` outputs
        return 2 * c_in * 9 * c_out * side * side

    forward = conv(1, 32, 26) + conv(32, 64, 24) + 2 * 9216 * 128 + 2 * 128 * 10
    # Backward: weight gradients and input gradients, each as dear as forward, except that the image needs none.
    per_sample = 3 * forward - conv(1, 32, 26)
    case = roofline.cnn_case(4)
    assert roofline.step_flops(case) == 4 * per_sample
    assert per_sample == 71_565_312  # 71.6 MFLOP a sample, conv2 ~89% of it
    assert 3 * conv(32, 64, 24) / per_sample == pytest.approx(0.89, abs=0.01)


def test_gemm_rate_is_two_n_cubed_over_the_best_time(monkeypatch):
    ticks = itertools.count()
    monkeypatch.setattr(roofline.time, "perf_counter", lambda: 0.5 * next(ticks))  # every product takes 0.5 s
    assert roofline.gemm_rate(16, reps=2) == 2 * 16 ** 3 / 0.5


def test_loop_rows_are_rates_over_gemm():
    clock = {"batch": 32, "samples": 320, "step_s": 0.1, "iteration_s": 0.125, "train_epoch_s": 2.0,
             "epoch_s": 4.0, "gemm": 1e9}
    rows = roofline.loop_rows(clock, flops_per_sample=1e6)
    assert rows["step in the loop"]["rate"] == pytest.approx(32e6 / 0.1)
    assert rows["whole epoch (with validation)"]["rate"] == pytest.approx(320e6 / 4.0)
    for row in rows.values():
        assert row["fraction"] == pytest.approx(row["rate"] / 1e9)


@pytest.mark.slow
def test_a_tiny_run_reports_consistent_figures(tmp_path, capsys):
    write_mnist(tmp_path / "data", n_train=200, n_test=10)
    out = tmp_path / "r.json"
    result = roofline.main(["--data", str(tmp_path / "data"), "--dataset", "mnist", "--tiny", "--rounds", "1",
                            "--steps", "1", "--gemm-n", "64", "--probe-every", "2", "--json", str(out),
                            "data.val_size=40", "data.batch_size=32"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    for row in result["plain"].values():
        assert row["fraction"] == pytest.approx(row["rate"] / result["gemm_fp32"], rel=0.5)  # medians of 1 round
        assert row["flops_per_sample"] == row["flops_per_step"] / 8
    clock = result["train_py"]
    assert (clock["steps"], clock["batch"], clock["samples"]) == (5, 32, 160)  # 160 training images, batch 32
    assert 0 < clock["val_s"] < clock["epoch_s"]
    step = result["loop"]["step in the loop"]
    assert step["rate"] == pytest.approx(71_565_312 * 32 / clock["step_s"])
    assert step["fraction"] == pytest.approx(step["rate"] / clock["gemm"])
    assert "avx" in capsys.readouterr().out  # the instruction sets are printed (every x86-64 CPU here has AVX)
