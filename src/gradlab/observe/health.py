"""The health report (gradlab.observe.health_rules) at the end of fit: printed as a table, written to <run>/health.json and
logged as TensorBoard text (TEXT tab, tag `health/report`).

    python train.py callbacks.health.dead=0.5          # thresholds: see gradlab.observe.health_rules.Thresholds
    python train.py callbacks.health=null              # no report
    python scripts/grad_report.py logs/train/runs/<time>   # the same report for any finished run
"""

from pathlib import Path
from typing import Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from gradlab.observe.events import RunReader
from gradlab.observe.health_rules import Report, Thresholds, diagnose
from gradlab.observe.writer import flush, log_dir, log_text

TAG = "health/report"


class HealthReport(Callback):
    """out_dir: where health.json goes (the run dir); None: the trainer's default_root_dir. The other arguments
    are the rules' thresholds (gradlab.observe.health_rules.Thresholds)."""

    def __init__(self, out_dir: Optional[str] = None, **thresholds: float):
        self.out_dir = out_dir
        self.thresholds = Thresholds(**thresholds)
        self.report: Optional[Report] = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        folder = log_dir(trainer)
        if not trainer.is_global_zero or folder is None:
            return
        flush(trainer)
        scalars = RunReader(folder).scalars()
        if not any(t.startswith(("grad_norm/", "act/")) for t in scalars):
            return  # the instruments were off (callbacks.grad_norm=null ...): nothing to judge
        self.report = diagnose(scalars, self.thresholds)
        out = Path(self.out_dir or trainer.default_root_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.report.write_json(out / "health.json")
        log_text(trainer, TAG, self.report.markdown(), trainer.global_step)
        flush(trainer)
        self.report.print(f"gradient health (also in {out / 'health.json'})")
