"""What the GRADIENTS tab shows: gradlab runs under TensorBoard's logdir, their per-layer families, downsampled.

Every run is read through gradlab's one event reader (`gradlab.observe.events.RunReader`), kept between requests, so a
live run's refresh costs the events written since the last one. Nothing outside the logdir is ever read: a run
is named by its event folder relative to the logdir and looked up in the listing, never joined onto a path.
"""

import base64
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
from tensorboard.compat.proto.event_pb2 import Event

from gradlab.checkpoints.files import (
    strict_json,  # health.json's NaN policy, for the live report too
)
from gradlab.observe.events import RunReader
from gradlab.observe.health_rules import (
    diagnose,
)

EVENTS = "events.out.tfevents."
TAGS = ("grad_norm/", "act/", "grad_noise/")  # a run holding any of these is a gradlab run
PEEK = 5000  # event records read from the start of a file to find out: the instruments log from the first steps


@dataclass(frozen=True)
class Family:
    key: str
    prefix: str       # the tag family (a contract: see the instrument callbacks)
    title: str
    log: bool         # a log y axis: the family spans orders of magnitude
    only: tuple = ()  # layer names kept (empty: all but `skip`)
    skip: tuple = ()


# One chart each, in this order; per-layer families list their layers in the order the run logged them, which
# is the model's parameter (or module) order: input layer first.
FAMILIES = [
    Family("grad_norm", "grad_norm/", "gradient L2 norm per layer", True, skip=("total", "total_after_clip")),
    Family("grad_total", "grad_norm/", "total gradient norm (before and after clipping)", True,
           only=("total", "total_after_clip")),
    Family("update_ratio", "update_ratio/", "update ratio ‖Δw‖/‖w‖ per layer (shaded: healthy 1e-4 .. 1e-2)", True),
    Family("param_norm", "param_norm/", "parameter L2 norm ‖w‖ per layer", True),
    Family("act_saturation", "act/saturation/", "saturated fraction per activation layer", False),
    Family("act_dead", "act/dead/", "dead ReLU units (fraction) per activation layer", False),
    Family("act_mean", "act/mean/", "activation mean", False),
    Family("act_std", "act/std/", "activation std", True),
    Family("noise_b_simple", "grad_noise/b_simple/", "gradient noise scale B_simple per layer", True),
    Family("noise_snr", "grad_noise/snr/", "gradient noise/signal √(tr Σ / B‖g‖²) per layer", True),
    Family("noise_trace_cov", "grad_noise/trace_cov/", "per-example gradient variance tr(Σ) per layer", True),
    Family("noise_signal", "grad_noise/signal/", "true-gradient signal ‖G‖² per layer", True),
    # The curvature callback (gradlab.observe.curvature, callbacks=[default,curvature]): the sharpness beside the
    # optimizer's stability threshold (2/η for plain SGD), and the Hessian trace per layer (it can be negative).
    Family("sharpness", "curv/", "sharpness (top Hessian eigenvalue) against the stability threshold 2/η", True,
           only=("sharpness", "precond_sharpness", "threshold")),
    Family("curv_trace", "curv/trace/", "Hessian trace per layer (Hutchinson)", False, skip=("total",)),
    Family("param_dist", "param_dist/", "distance from initialization ‖θ − θ₀‖ / ‖θ₀‖ per layer", True),
]
BAND = ("update_ratio_log10/band_low", "update_ratio_log10/band_high")  # logged by the grad_norm callback
# Which charts a health verdict (gradlab.observe.health_rules) is drawn on.
VERDICT_CHARTS = {"non-finite": ["grad_norm"], "exploding": ["grad_norm", "grad_total"],
                  "vanishing": ["grad_norm"], "stopped learning": ["grad_norm"],
                  "update ratio too big": ["update_ratio"], "update ratio too small": ["update_ratio"],
                  "saturated": ["act_saturation"], "dead units": ["act_dead"], "edge of stability": ["sharpness"]}


def downsample(steps: np.ndarray, values: np.ndarray, lo: float, hi: float, buckets: int):
    """Points of one series for a chart `buckets` pixels wide over steps [lo, hi]: every point when they fit,
    else the min and the max of each bucket, in step order, so a one-step spike survives.

    Returns (steps, values, downsampled)."""
    keep = (steps >= lo) & (steps <= hi)
    steps, values = steps[keep], values[keep]
    if len(steps) <= 2 * buckets:
        return steps, values, False
    edges = np.linspace(lo, hi, buckets + 1)
    which = np.clip(np.searchsorted(edges, steps, side="right") - 1, 0, buckets - 1)  # bucket of each point
    starts = np.flatnonzero(np.r_[True, which[1:] != which[:-1]])  # first point of every non-empty bucket
    finite = np.where(np.isfinite(values), values, np.nan)
    # NaN-aware argmin/argmax per bucket: reduceat on values with NaN pushed out of the way
    big, small = np.where(np.isnan(finite), -np.inf, finite), np.where(np.isnan(finite), np.inf, finite)
    idx = np.arange(len(values))
    pick = []
    for reduce, arr in ((np.maximum, big), (np.minimum, small)):
        best = reduce.reduceat(arr, starts)
        owner = np.repeat(best, np.diff(np.r_[starts, len(arr)]))
        hit = np.where(arr == owner, idx, len(arr))
        pick.append(np.minimum.reduceat(hit, starts))  # the first point of the bucket holding its extreme
    chosen = np.unique(np.concatenate(pick))
    chosen = chosen[chosen < len(values)]
    return steps[chosen], values[chosen], True


class Run:
    """One run: its reader, its series as arrays (re-converted only for tags that changed)."""

    def __init__(self, name: str, folder: Path, logdir: Path):
        self.name, self.folder, self.logdir = name, folder, logdir
        self.reader = RunReader(folder)
        self.arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._converted: dict[str, tuple[list, int]] = {}  # tag -> (the reader's list, points converted)
        self._provisional: Optional[dict] = None  # the rules on the scalars so far, until something new arrives
        self._gradlab = False

    def refresh(self) -> None:
        changed = self.reader.update()
        if changed:
            self._provisional = None
        for tag in (t for t in self.reader.series if t in changed):  # the run's tag order: input layer first
            series = self.reader.series[tag]
            held, done = self._converted.get(tag, (None, 0))
            new = series[done:] if held is series else series  # the reader appended in place: convert the tail
            steps = np.fromiter((s for s, _ in new), np.int64, len(new))
            values = np.fromiter((v for _, v in new), np.float64, len(new))
            if held is series:
                steps, values = np.concatenate([self.arrays[tag][0], steps]), np.concatenate([self.arrays[tag][1], values])
            self.arrays[tag] = (steps, values)
            self._converted[tag] = (series, len(series))

    @property
    def is_gradlab(self) -> bool:
        """Whether the run's events hold gradlab's tags: what was read, else a peek at the files' first records
        (cheap: TensorBoard asks on every reload whether the tab has data, before anyone opens it)."""
        if not self._gradlab:
            self._gradlab = any(t.startswith(TAGS) for t in self.arrays) or _peek(self.folder)
        return self._gradlab

    def saved_health(self) -> Optional[dict]:
        """health.json of the run (beside the event folder or one above it, inside the logdir); None without."""
        for folder in (self.folder, self.folder.parent):
            path = folder / "health.json"
            if folder.resolve().is_relative_to(self.logdir.resolve()) and path.is_file():
                try:
                    return {**json.loads(path.read_text()), "source": "health.json"}
                except (OSError, ValueError):
                    return None  # half-written
        return None

    def health(self) -> Optional[dict]:
        """health.json of the run (beside the event folder or one above it, inside the logdir); for a live run,
        without one yet, the same rules on what was logged so far, marked provisional."""
        saved = self.saved_health()
        if saved is not None:
            return saved
        if not any(t.startswith("grad_norm/") for t in self.arrays):
            return None
        if self._provisional is None:
            report = diagnose(self.reader.series)
            self._provisional = {**strict_json(report.to_dict()), "source": "provisional"}
        return self._provisional

    def view(self, lo: Optional[float], hi: Optional[float], buckets: int) -> dict:
        """Every family's layers and downsampled series over steps [lo, hi] (None: the whole run)."""
        self.refresh()
        all_steps = [a[0] for a in self.arrays.values() if len(a[0])]
        first = min(int(s[0]) for s in all_steps) if all_steps else 0
        last = max(int(s[-1]) for s in all_steps) if all_steps else 0
        lo = first if lo is None else lo
        hi = last if hi is None else hi
        families, shrunk = [], False
        for fam in FAMILIES:
            layers = [t[len(fam.prefix):] for t in self.reader.series if t.startswith(fam.prefix)]
            layers = [n for n in layers if (n in fam.only if fam.only else n not in fam.skip) and "/" not in n]
            if not layers:
                continue
            series = []
            for layer in layers:
                s, v, cut = downsample(*self.arrays[fam.prefix + layer], lo, hi, buckets)
                shrunk |= cut
                series.append({"layer": layer, "steps": _b64(s, "<f8"), "values": _b64(v, "<f4")})
            families.append({"key": fam.key, "title": fam.title, "log": fam.log, "depth": not fam.only,
                             "series": series})
        band = [10 ** self.arrays[t][1][-1] for t in BAND if t in self.arrays and len(self.arrays[t][1])]
        return {"run": self.name, "steps": [first, last], "range": [lo, hi], "buckets": buckets,
                "downsampled": shrunk, "families": families, "band": band if len(band) == 2 else None,
                "health": self.health(), "verdict_charts": VERDICT_CHARTS}


def _b64(values: np.ndarray, dtype: str) -> str:
    """A column as base64 of little-endian binary: steps as float64, values as float32, the precision TensorBoard
    stores (so the page shows the event file's exact number). Text JSON of half a million floats cost seconds to
    write; this costs milliseconds. NaN and inf stay what they are; the page draws them as gaps."""
    return base64.b64encode(np.asarray(values, dtype=dtype).tobytes()).decode("ascii")


def _peek(folder: Path) -> bool:
    """Whether the first PEEK records of the folder's event files hold one of gradlab's tags."""
    for path in sorted(folder.glob(EVENTS + "*")):
        try:
            for i, record in enumerate(RawEventFileLoader(str(path)).Load()):
                if i >= PEEK:
                    break
                if any(v.tag.startswith(TAGS) for v in Event.FromString(record).summary.value):
                    return True
        except Exception:  # a truncated or foreign file: not ours to judge
            continue
    return False


class Runs:
    """The gradlab runs under one logdir, found by walking it for event files; readers kept between requests."""

    def __init__(self, logdir: str):
        self.logdir = Path(logdir) if logdir else None
        self._runs: dict[str, Run] = {}

    def _walk(self) -> dict[str, Run]:
        if self.logdir is None or not self.logdir.is_dir():
            return {}
        found = {}
        for folder, _, files in os.walk(self.logdir):
            if any(f.startswith(EVENTS) for f in files):
                rel = Path(folder).relative_to(self.logdir).as_posix()
                found[rel] = self._runs.get(rel) or Run(rel, Path(folder), self.logdir)
        self._runs = found
        return found

    def listing(self) -> dict[str, Run]:
        """{name: run} of every folder under the logdir whose events hold gradlab's tags, by name; nothing read
        beyond a peek at each file's start (a run is read when it is shown)."""
        return {name: run for name, run in sorted(self._walk().items()) if run.is_gradlab}

    def get(self, name: Optional[str]) -> Optional[Run]:
        """The run called `name` in the listing; None for any other string (`../x`, `/etc`, ...)."""
        run = self._walk().get(name) if name else None
        if run is not None:
            run.refresh()
        return run if run is not None and run.is_gradlab else None
