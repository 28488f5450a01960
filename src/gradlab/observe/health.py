"""The health report (gradlab.observe.health_rules) at the end of fit: printed as a table, written to <run>/health.json and
logged as TensorBoard text (TEXT tab, tag `health/report`).

    python train.py callbacks.health.dead=0.5          # thresholds: see gradlab.observe.health_rules.Thresholds
    python train.py callbacks.health=null              # no report
    python scripts/grad_report.py logs/train/runs/<time>   # the same report for any finished run
"""

from pathlib import Path
from typing import Optional

import lightning.pytorch as pl

from gradlab.observe.common import Instrument, failures
from gradlab.observe.events import RunReader
from gradlab.observe.health_rules import Report, Thresholds, diagnose
from gradlab.observe.writer import flush, log_dir, log_text

TAG = "health/report"


class HealthReport(Instrument):
    """out_dir: where health.json goes (the run dir); None: the trainer's default_root_dir. The other arguments
    are the rules' thresholds (gradlab.observe.health_rules.Thresholds). An instrument that failed during the run
    (gradlab.observe.common) is listed under `instrument_failures` in health.json."""

    name = "health"

    def __init__(self, out_dir: Optional[str] = None, **thresholds: float):
        self.out_dir = out_dir
        self.thresholds = Thresholds(**thresholds)
        self.report: Optional[Report] = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        folder = log_dir(trainer)
        if not trainer.is_global_zero:
            return
        broken = failures(trainer)
        scalars = {}
        if folder is not None:
            flush(trainer)
            scalars = RunReader(folder).scalars()
        if not any(t.startswith(("grad_norm/", "act/")) for t in scalars) and not broken:
            return  # the instruments were off (callbacks.grad_norm=null ...): nothing to judge
        self.report = diagnose(scalars, self.thresholds, frozen=frozen(pl_module))
        self.report.instrument_failures = broken
        out = Path(self.out_dir or trainer.default_root_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.report.write_json(out / "health.json")
        if folder is not None:
            log_text(trainer, TAG, self.report.markdown(), trainer.global_step)
        flush(trainer)
        self.report.print(f"gradient health (also in {out / 'health.json'})")


def frozen(pl_module: pl.LightningModule) -> list[str]:
    """Parameters with requires_grad=False: no gradient by design, named as frozen in the report."""
    return [name for name, p in pl_module.named_parameters() if not p.requires_grad]
