"""The random-kill campaign (scripts/kill_campaign.py) with a small N: SIGKILL mid-batch, in validation, in the test
stage or inside a checkpoint write, resume with ckpt_path=last, and end with the uninterrupted run's metrics."""

import pytest

from helpers import load_script


@pytest.mark.slow
def test_a_small_kill_campaign_loses_nothing(tmp_path, capsys):
    campaign = load_script("kill_campaign")
    # The kind with the fewest kills goes next: the first four are one of each kind.
    assert campaign.main(["--kills", "4", "--per-life", "4", "--seed", "3", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "4 kills in" in out and "all passed" in out
    for kind in ("batch", "val", "test", "ckpt"):
        assert f"| {kind} | 1 | 1 | 0 |" in out, out
