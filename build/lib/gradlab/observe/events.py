"""Read scalars back from a run's TensorBoard event files, for plots, reports and tests.

The one reader for finished and live runs: `read_scalars(run_dir)` reads everything once; a `RunReader` kept
by a callback reads only what was appended since its last call (TensorBoard's EventAccumulator goes on from
where it stopped), so a live run's picture or report costs the new events, not the whole file again.
"""

import logging
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

from gradlab.errors import UserError

# The accumulator logs "No path found after <file>" at INFO each time it reaches the end of a live file.
logging.getLogger("tensorboard").setLevel(logging.WARNING)

Series = list[tuple[int, float]]  # (step, value), sorted by step


def event_dirs(path: str | Path) -> list[Path]:
    """Every folder under `path` (itself included) that holds TensorBoard event files."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist. Pass a run folder such as logs/train/runs/<date>_<time>.")
    files = [path] if path.is_file() else sorted(path.rglob("events.out.tfevents.*"))
    dirs = sorted({f.parent for f in files if f.name.startswith("events.out.tfevents.")})
    if not dirs:
        raise UserError(f"No TensorBoard event files (events.out.tfevents.*) under {path}. Runs write them "
                        "into <run>/tensorboard/ when the tensorboard logger is on (logger=tensorboard).")
    return dirs


class RunReader:
    """Scalars of one run folder, re-read incrementally on every `scalars()` call."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._accumulators: dict[Path, EventAccumulator] = {}

    def scalars(self, prefix: str = "") -> dict[str, Series]:
        """{tag: [(step, value), ...]} for tags starting with `prefix`, in the order the run first logged them.

        Several event folders or files (a resumed run) are merged; where two hold the same step, the later wins.
        """
        merged: dict[str, dict[int, float]] = {}
        for folder in event_dirs(self.path):
            acc = self._accumulators.get(folder)
            if acc is None:
                acc = self._accumulators[folder] = EventAccumulator(str(folder), size_guidance={SCALARS: 0})
            acc.Reload()  # 0 above: keep every point, no sampling
            for tag in acc.Tags()[SCALARS]:
                if tag.startswith(prefix):
                    merged.setdefault(tag, {}).update((e.step, e.value) for e in acc.Scalars(tag))
        return {tag: sorted(points.items()) for tag, points in merged.items()}


def read_scalars(path: str | Path, prefix: str = "") -> dict[str, Series]:
    """All scalars of a run (see RunReader.scalars)."""
    return RunReader(path).scalars(prefix)
