"""Read scalars back from a run's TensorBoard event files, for plots, reports and tests.

The one reader for finished and live runs: `read_scalars(run_dir)` reads everything once; a `RunReader` kept
by a callback reads only what was appended since its last call (TensorBoard's EventAccumulator goes on from
where it stopped), so a live run's picture or report costs the new events, not the whole file again.
"""

import logging
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import (
    SCALARS,
    EventAccumulator,
)

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
    """Scalars of one run folder, re-read incrementally on every `scalars()` call.

    Only what the accumulators read since the last call is merged in: a live run's new steps are appended to the
    series kept here, so a reader polled by a dashboard costs the new events, not the whole run again.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._accumulators: dict[Path, EventAccumulator] = {}
        self._seen: dict[tuple[Path, str], tuple[int, object]] = {}  # (folder, tag) -> (events merged, last one)
        # {tag: merged series, sorted by step}, in the order the run first logged the tags; read-only outside
        self.series: dict[str, Series] = {}

    def scalars(self, prefix: str = "") -> dict[str, Series]:
        """{tag: [(step, value), ...]} for tags starting with `prefix`, in the order the run first logged them.

        Several event folders or files (a resumed run) are merged; where two hold the same step, the later wins.
        """
        self.update()
        return {tag: list(s) for tag, s in self.series.items() if tag.startswith(prefix)}

    def update(self) -> set[str]:
        """Read what was appended since the last call; the tags that changed."""
        folders = event_dirs(self.path)
        events: dict[str, list[tuple[Path, list]]] = {}  # tag -> [(folder, its events)], folders in order
        changed = set()
        for folder in folders:
            acc = self._accumulators.get(folder)
            if acc is None:
                acc = self._accumulators[folder] = EventAccumulator(str(folder), size_guidance={SCALARS: 0})
            acc.Reload()  # 0 above: keep every point, no sampling
            for tag in acc.Tags()[SCALARS]:
                got = acc.Scalars(tag)
                events.setdefault(tag, []).append((folder, got))
                done, last = self._seen.get((folder, tag), (0, None))
                if len(got) != done or (done and got[done - 1] is not last):
                    changed.add(tag)
        for tag in (t for t in events if t in changed):  # first-logged order for new tags, not the set's
            per_folder = events[tag]
            series = self.series.get(tag)
            new = self._appended(tag, per_folder)
            if series is not None and new is not None and (not series or not new or new[0][0] > series[-1][0]):
                series.extend(new)  # the live case: new steps after the last, in the last folder that has the tag
            else:
                merged: dict[int, float] = {}
                for _, got in per_folder:
                    merged.update((e.step, e.value) for e in got)
                self.series[tag] = sorted(merged.items())
            for folder, got in per_folder:
                self._seen[(folder, tag)] = (len(got), got[-1] if got else None)
        return changed

    def _appended(self, tag: str, per_folder: list[tuple[Path, list]]) -> Series | None:
        """The new (step, value) pairs when only the last folder holding `tag` grew, in rising steps; else None."""
        for folder, got in per_folder[:-1]:
            done, last = self._seen.get((folder, tag), (0, None))
            if len(got) != done or (done and got[done - 1] is not last):
                return None
        folder, got = per_folder[-1]
        done, last = self._seen.get((folder, tag), (0, None))
        if len(got) < done or (done and got[done - 1] is not last):
            return None  # the accumulator dropped events (a restarted run's orphaned steps): merge again
        new = [(e.step, e.value) for e in got[done:]]
        return new if all(a[0] < b[0] for a, b in zip(new, new[1:])) else None


def read_scalars(path: str | Path, prefix: str = "") -> dict[str, Series]:
    """All scalars of a run (see RunReader.scalars)."""
    return RunReader(path).scalars(prefix)
