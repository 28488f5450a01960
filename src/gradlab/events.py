"""Read scalars back from a run's TensorBoard event files, for plots, reports and tests."""

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

from gradlab.errors import UserError

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


def read_scalars(path: str | Path, prefix: str = "") -> dict[str, Series]:
    """{tag: [(step, value), ...]} for tags starting with `prefix`, in the order the run first logged them.

    Several event folders or files (a resumed run) are merged; where two hold the same step, the later wins.
    """
    merged: dict[str, dict[int, float]] = {}
    for folder in event_dirs(path):
        acc = EventAccumulator(str(folder), size_guidance={SCALARS: 0})  # 0: keep every point, no sampling
        acc.Reload()
        for tag in acc.Tags()[SCALARS]:
            if tag.startswith(prefix):
                merged.setdefault(tag, {}).update((e.step, e.value) for e in acc.Scalars(tag))
    return {tag: sorted(points.items()) for tag, points in merged.items()}
