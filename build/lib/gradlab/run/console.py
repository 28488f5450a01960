"""Console output a person can read: each log line once, and no advertisements.

Lightning gives its `lightning` logger a stderr handler of its own, and the same records also reach the root
logger, where Hydra's job logging prints them to stdout and writes them to the run's train.log: every INFO line
appeared twice on the console. Once Hydra's handlers are in place, Lightning's own is removed, so each line prints
once (and still lands in train.log). Lightning also logs, at INFO, tips for its cloud services ("💡 Tip: ...
litlogger", "... litmodels"); a filter drops them. And Lightning 2.6's own pytree code trips a FutureWarning of
torch's that no user can act on, and Lightning hints at srun wherever SLURM is installed; both are silenced by their
exact text.
"""

import logging
import warnings

ADVERT_PREFIXES = ("💡 Tip:",)
# The logger behind Lightning's rank_zero_info, which prints the tips.
RANK_ZERO_LOGGER = "lightning.pytorch.utilities.rank_zero"


class DropAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(ADVERT_PREFIXES)


def tidy_lightning_logging() -> None:
    """Call once Lightning is imported (it adds its handler on import); safe to call again."""
    lightning = logging.getLogger("lightning")
    if logging.getLogger().handlers:  # Hydra's console + train.log: the records still propagate there
        for handler in list(lightning.handlers):
            if type(handler) is logging.StreamHandler:
                lightning.removeHandler(handler)
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning)
    # Printed on every machine with SLURM installed, also where srun is not meant (a local run beside a cluster):
    # hydra/launcher=slurm is gradlab's way onto the cluster, and it starts every rank with srun.
    warnings.filterwarnings("ignore", message=r"The `srun` command is available on your system but is not used")
    rank_zero = logging.getLogger(RANK_ZERO_LOGGER)
    if not any(isinstance(f, DropAdverts) for f in rank_zero.filters):
        rank_zero.addFilter(DropAdverts())
