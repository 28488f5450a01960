"""gradlab installs as a library: `pip install --no-deps --target <dir> .` (offline; the dependencies are the ones
already installed), then the entry point imported from that install, not from this checkout, observes a user's
module. Proves the package list and package data of pyproject.toml."""

import os
import shutil
import subprocess
import sys

import pytest

from helpers import ROOT

USER_SCRIPT = '''
import json, sys, torch, lightning as L
import gradlab.observe
from torch import nn
from gradlab.observe import Observatory
assert gradlab.observe.__file__.startswith(sys.argv[1]), gradlab.observe.__file__

class Lit(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2))
    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 4), torch.randint(0, 2, (16,))),
                                   batch_size=4)
trainer = L.Trainer(max_steps=3, log_every_n_steps=1, accelerator="cpu", enable_progress_bar=False,
                    enable_checkpointing=False, default_root_dir=sys.argv[2],
                    callbacks=Observatory(grad_noise={"log_every_n_steps": 1}))
trainer.fit(Lit(), data)
print(json.dumps(json.load(open(sys.argv[2] + "/health.json"))))
'''


@pytest.mark.slow
def test_pip_install_then_observe_a_user_module(tmp_path):
    target = tmp_path / "site"
    # A copy of what a source distribution holds: building in place would leave build/ in the checkout.
    source = tmp_path / "source"
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    build = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                            "--no-index", "--target", str(target), str(source)],
                           capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert build.returncode == 0, build.stdout + build.stderr
    assert (target / "gradlab" / "data" / "sample" / "README.md").exists()  # package data came along
    script = tmp_path / "user.py"
    script.write_text(USER_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)  # the installed copy, ahead of the editable install of the checkout
    run = subprocess.run([sys.executable, str(script), str(target), str(tmp_path / "run")], capture_output=True,
                         text=True, timeout=300, cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    report = run.stdout.strip().splitlines()[-1]
    assert '"instrument_failures": []' in report and '"findings"' in report
