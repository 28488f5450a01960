"""The backprop walkthrough and the activations picture: their ✔ marks and curves hold against independent math."""

import os
import subprocess
import sys

import pytest
import torch

from helpers import ROOT, load_script


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "backprop_walkthrough.py"), *args],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "160"})


@pytest.mark.parametrize("args", [[], ["--chain-rule", "2"], ["--chain-rule", "-0.7"], ["--fix"]])
def test_every_mark_is_a_check(args):
    proc = run(*args)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "✔" in proc.stdout and "✘" not in proc.stdout


def test_a_wrong_number_is_caught():
    """The ✔ is real: a hand formula off by a little (a sigmoid slope 1e-9 too big) turns into ✘ and exit 1."""
    walk = load_script("backprop_walkthrough")
    checks = walk.Checks()
    x = torch.linspace(-2, 2, 5, dtype=torch.float64)
    right = torch.sigmoid(x) * (1 - torch.sigmoid(x))
    assert "✔" in checks.mark("σ'", right, *walk.sigmoid_slopes(x)) and not checks.failed
    assert "✘" in checks.mark("σ' + 1e-9", right + 1e-9, *walk.sigmoid_slopes(x))
    assert walk.report(checks) == 1


def test_walkthrough_numbers_are_the_math(capsys):
    """The step's loss falls, and the chain rule's product is 6x(x² + 1)² written independently here."""
    walk = load_script("backprop_walkthrough")
    assert walk.main(["--chain-rule", "1.5"]) == 0
    out = capsys.readouterr().out
    assert f"{6 * 1.5 * (1.5 ** 2 + 1) ** 2:.6f}" in out  # 49.921875 at x = 1.5
    assert walk.main([]) == 0
    out = capsys.readouterr().out
    before, after = (float(v) for v in out.split("The loss went from ")[1].split(":")[0].split(" to "))
    assert after < before


def test_activation_derivatives_match_the_closed_forms(tmp_path):
    act = load_script("activations")
    data = act.curves(4.0, points=401)
    x = data["sigmoid"]["x"]
    s = 1 / (1 + torch.exp(-x))
    closed = {"sigmoid": s * (1 - s), "tanh": 1 - torch.tanh(x) ** 2, "relu": (x > 0).double(),
              "leaky relu": torch.where(x > 0, 1.0, act.SLOPE).double()}
    for name, expected in closed.items():
        assert torch.allclose(data[name]["dy"], expected, atol=1e-12), name
    # the shading marks where the derivative is small: saturated sigmoid units pass < 3% of the gradient
    sat = data["sigmoid"]["saturated"]
    assert sat.any() and bool((data["sigmoid"]["dy"][sat] < 0.03).all())
    assert act.main(["--out", str(tmp_path / "act.png"), "--range", "3"]) == 0
    assert (tmp_path / "act.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
