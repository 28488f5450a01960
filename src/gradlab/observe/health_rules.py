"""The health report: rules that map what a run logged (grad_norm/*, update_ratio/*, act/*) to verdicts.

    python scripts/grad_report.py logs/train/runs/<time>     # any finished run; also written at the end of fit

Each finding names the layer, the step range, the evidence and a likely fix; a run without a finding gets one
"healthy" finding that says what was checked. The rules, in order:
    non-finite   a gradient norm is NaN or inf
    exploding    the total gradient norm exceeds `exploding` (1e3), or grows `growth` (100x) from the first
                 quarter of the run to the last
    vanishing    a weight layer's median gradient norm is below `vanishing` (1e-3) times the largest of a layer after
                 it (the same definition as grad_norm's live warning: `vanishing` below)
    update ratio a weight's median ‖Δw‖/‖w‖ over the run is above `ratio_high` (0.1, 100x the usual 1e-3) or
                 below `ratio_low` (1e-5, 100x under it); biases and weights that start at 0 are left out
    saturated    a sigmoid/tanh layer's median saturated fraction (second half) is above `saturation` (0.3)
    dead units   a ReLU layer's median dead fraction (second half) is above `dead` (0.5)
    stopped      a weight layer's gradient norm in the last quarter fell below `stopped` (1e-3) times its first
                 quarter's, and that much further than the total norm did: it no longer learns while the rest
                 does (all layers falling together is a loss that converged)
    edge of stability  the sharpness (curv/*, callbacks=[default,curvature]) sat above the optimizer's stability
                 threshold 2/η ... (curvature_findings)
Medians over a window keep one noisy logging step from deciding a verdict. Parameters with requires_grad=False
are named once as `frozen` and judged by no rule; an instrument that failed during the run is listed under
`instrument_failures` (gradlab.observe.common).
"""

import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from rich.console import Console
from rich.table import Table

from gradlab.checkpoints.files import write_json
from gradlab.observe.events import Series

HEALTHY, FROZEN = "healthy", "frozen"  # verdicts that need no fix


@dataclass
class Thresholds:
    exploding: float = 1e3
    growth: float = 1e2
    vanishing: float = 1e-3
    ratio_high: float = 1e-1
    ratio_low: float = 1e-5
    saturation: float = 0.3
    dead: float = 0.5
    stopped: float = 1e-3


@dataclass
class Finding:
    verdict: str
    layer: str
    steps: tuple[int, int]
    evidence: str
    fix: str

    def as_row(self) -> list[str]:
        return [self.verdict, self.layer, f"{self.steps[0]}–{self.steps[1]}", self.evidence, self.fix]


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)
    steps: tuple[int, int] = (0, 0)
    thresholds: Thresholds = field(default_factory=Thresholds)
    instrument_failures: list[dict] = field(default_factory=list)  # gradlab.observe.common.Instrument.failure

    @property
    def healthy(self) -> bool:
        return all(f.verdict in (HEALTHY, FROZEN) for f in self.findings) and not self.instrument_failures

    def to_dict(self) -> dict:
        return {"healthy": self.healthy, "steps": list(self.steps), "thresholds": asdict(self.thresholds),
                "findings": [{**asdict(f), "steps": list(f.steps)} for f in self.findings],
                "instrument_failures": self.instrument_failures}

    def write_json(self, path: Path) -> None:
        write_json(path, self.to_dict())

    def markdown(self) -> str:
        lines = ["| verdict | layer | steps | evidence | fix |", "|---|---|---|---|---|"]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in f.as_row()) + " |" for f in self.findings]
        return "\n".join(lines)

    def print(self, title: str = "gradient health", console: Optional[Console] = None) -> None:
        table = Table(title=title, header_style="bold", show_lines=True)
        for col, width in (("verdict", 12), ("layer", 18), ("steps", 9), ("evidence", 48), ("fix", 40)):
            table.add_column(col, min_width=min(width, 12), max_width=width, overflow="fold")
        for f in self.findings:
            style = "green" if f.verdict in (HEALTHY, FROZEN) else "bold red" if f.verdict in ("non-finite", "exploding") \
                else "yellow"
            table.add_row(*f.as_row(), style=style)
        (console or Console(width=140)).print(table)


# ---- one definition of vanishing and exploding: the live warning (grad_norm) and the report use these ----------
def vanishing(norms: dict[str, float], threshold: float) -> list[str]:
    """Weight layers (input first) whose gradient norm is below `threshold` times the largest of a layer after them.

    Judging each layer against what reaches the layers above it, not the first against the last only, keeps a
    residual network's skips (which carry the gradient past a block) and a small output layer from misleading."""
    names = [n for n in norms if _is_weight(n) and math.isfinite(norms[n])]
    out, downstream = [], 0.0
    for name in reversed(names):
        if downstream > 0 and norms[name] < threshold * downstream:
            out.append(name)
        downstream = max(downstream, norms[name])
    return out[::-1]


def exploding(norm: float, threshold: float) -> bool:
    """A gradient norm (a layer's, or the total) above `threshold`."""
    return math.isfinite(norm) and norm > threshold


def _is_weight(name: str) -> bool:
    return "weight" in name or "bias" not in name.rsplit(".", 1)[-1]


# ---- the rules, in the order of the module docstring ---------------------------------------------------------
def diagnose(scalars: dict[str, Series], thresholds: Optional[Thresholds] = None,
             frozen: Sequence[str] = ()) -> Report:
    """The report of one run's scalars ({tag: [(step, value), ...]}, as gradlab.observe.events reads them).

    frozen: parameters with requires_grad=False (no gradient by design): named as frozen, judged by no rule."""
    th = thresholds or Thresholds()
    grads = _family(scalars, "grad_norm/", exclude=("total", "total_after_clip"))
    all_steps = sorted({s for series in grads.values() for s, _ in series})
    span = (all_steps[0], all_steps[-1]) if all_steps else (0, 0)
    report = Report(steps=span, thresholds=th)
    for rule in RULES:
        report.findings += rule(scalars, grads, th)
    if not report.findings:
        report.findings.append(_healthy(scalars, grads, span))
    if frozen:
        shown = ", ".join(frozen[:6]) + (f" and {len(frozen) - 6} more" if len(frozen) > 6 else "")
        report.findings.append(Finding(FROZEN, shown, span, f"{len(frozen)} parameters with requires_grad=False "
                                       "get no gradient by design", "nothing to fix (unfreeze them to train them)"))
    return report


def non_finite(scalars, grads, th) -> list[Finding]:
    out = []
    for name, series in grads.items():
        bad = [s for s, v in series if not math.isfinite(v)]
        if bad:
            out.append(Finding("non-finite", name, (bad[0], bad[-1]),
                               f"grad_norm is NaN/inf at {len(bad)} of {len(series)} logging steps",
                               "lower optimizer.lr, clip (trainer.gradient_clip_val=1.0), check the inputs and the "
                               "loss for NaN; callbacks.grad_norm.on_nonfinite=stop keeps the last good weights"))
    return out


def exploding_rule(scalars, grads, th) -> list[Finding]:
    total = [(s, v) for s, v in scalars.get("grad_norm/total", []) if math.isfinite(v)]
    if not total:
        return []
    peak_step, peak = max(total, key=lambda p: p[1])
    first, last = _quarter(total, 0), _quarter(total, -1)
    if exploding(peak, th.exploding):
        worst = max(grads, key=lambda n: dict(grads[n]).get(peak_step, 0.0) or 0.0)
        return [Finding("exploding", worst, (peak_step, peak_step),
                        f"total gradient norm {peak:.3g} at step {peak_step} (> {th.exploding:g}); "
                        f"largest layer there: {worst}",
                        "lower optimizer.lr or clip gradients (trainer.gradient_clip_val=1.0)")]
    if len(total) >= 8 and _median(first) > 0 and _median(last) / _median(first) > th.growth:
        return [Finding("exploding", "total", (last[0][0], last[-1][0]),
                        f"total gradient norm grew {_median(last) / _median(first):.3g}x from the first "
                        f"quarter of the run (median {_median(first):.3g}) to the last ({_median(last):.3g})",
                        "lower optimizer.lr, add a scheduler, or clip (trainer.gradient_clip_val=1.0)")]
    return []


def vanishing_rule(scalars, grads, th) -> list[Finding]:
    medians = {name: _median(series) for name, series in grads.items() if _is_weight(name)}
    weak = vanishing(medians, th.vanishing)
    if not weak:
        return []
    names = [n for n in medians if math.isfinite(medians[n])]
    first = weak[0]
    later = names[names.index(first) + 1:]
    top = max(later, key=lambda n: medians[n])
    chain = ", ".join(f"{n} {medians[n]:.1e}" for n in names[:: max(1, len(names) // 4)])
    steps = [s for s, _ in grads[first]]
    more = f"; {len(weak)} layers in all" if len(weak) > 1 else ""
    return [Finding("vanishing", first, (steps[0], steps[-1]),
                    f"median gradient norm {medians[first]:.2g} is {medians[first] / medians[top]:.1e} x that of "
                    f"{top} ({medians[top]:.2g}), a layer after it{more}; input to output: {chain}",
                    "relu or leaky_relu with Kaiming init (model.activation=relu), batch norm "
                    "(model.batch_norm=true), fewer layers or residual connections")]


def update_ratio(scalars, grads, th) -> list[Finding]:
    too: dict[str, list] = {"big": [], "small": []}  # (layer, median, window) per direction, input layer first
    for name, series in _family(scalars, "update_ratio/").items():
        start = scalars.get(f"param_norm/{name}")
        if not _is_weight(name) or (start and start[0][1] == 0):
            continue  # a bias, or a weight that starts at 0 (a zero-initialized head, a class token): large by design
        window = series  # the whole run: a too-big step shows most in the first steps, before |w| grows
        r = _median(window)
        if window and math.isfinite(r) and (r > th.ratio_high or r < th.ratio_low):
            too["big" if r > th.ratio_high else "small"].append((name, r, window))
    out = []
    for direction, layers in too.items():
        if not layers:
            continue
        # One finding for all layers that share the verdict, not one per layer.
        names = [n for n, _, _ in layers]
        layer = ", ".join(names) if len(names) <= 3 else f"{names[0]} … {names[-1]} ({len(names)} layers)"
        lo, hi = min(layers, key=lambda t: t[1]), max(layers, key=lambda t: t[1])
        window = layers[0][2]
        spread = f"{lo[1]:.2g} ({lo[0]})" if lo is hi else f"{lo[1]:.2g} ({lo[0]}) to {hi[1]:.2g} ({hi[0]})"
        if direction == "big":
            out.append(Finding("update ratio too big", layer, (window[0][0], window[-1][0]),
                               f"median ‖Δw‖/‖w‖ over the run {spread}; healthy ~1e-3, flagged above "
                               f"{th.ratio_high:g}: each step rewrites {hi[1]:.0%} of a layer",
                               f"lower optimizer.lr about {hi[1] / 1e-3:.0f}x, or warm it up (scheduler=onecycle)"))
        else:
            out.append(Finding("update ratio too small", layer, (window[0][0], window[-1][0]),
                               f"median ‖Δw‖/‖w‖ over the run {spread}; healthy ~1e-3, flagged below "
                               f"{th.ratio_low:g}: the layer barely moves",
                               "raise optimizer.lr, or fix a gradient that vanishes upstream (see above)"))
    return out


def _activation_rule(stat: str, verdict: str, fix: str):
    def rule(scalars, grads, th) -> list[Finding]:
        limit = getattr(th, stat)
        out = []
        for layer, series in _family(scalars, f"act/{stat}/").items():
            window = _half(series)
            v = _median(window)
            if window and v > limit:
                out.append(Finding(verdict, layer, (window[0][0], window[-1][0]),
                                   f"median {stat} fraction {v:.0%} over the second half (> {limit:.0%})", fix))
        return out
    rule.__name__ = verdict.replace(" ", "_")
    return rule


saturated = _activation_rule("saturation", "saturated",
                             "smaller init or inputs, batch norm before the activation, or relu; lower optimizer.lr")
dead_units = _activation_rule("dead", "dead units",
                              "lower optimizer.lr, leaky_relu (model.activation=leaky_relu), Kaiming init, or "
                              "batch norm")


def _drop(series: Series) -> Optional[tuple[float, float]]:
    """(first quarter's median, last quarter's) of a series' finite values; None when too short to tell."""
    finite = [(s, v) for s, v in series if math.isfinite(v)]
    if len(finite) < 8:
        return None
    return _median(_quarter(finite, 0)), _median(_quarter(finite, -1))


def stopped(scalars, grads, th) -> list[Finding]:
    # Judged against the whole network: when every gradient falls together the loss has converged (a model that
    # fits its data), not one layer stopped. A layer stops when it falls `stopped` times further than the total.
    total = _drop(scalars.get("grad_norm/total", []))
    converged = total[1] / total[0] if total and total[0] > 0 else 1.0
    out = []
    for name, series in grads.items():
        drop = _drop(series) if _is_weight(name) else None
        if drop is None:
            continue
        early, late = drop
        if early > 0 and late < th.stopped * early * min(converged, 1.0):
            window = _quarter([(s, v) for s, v in series if math.isfinite(v)], -1)
            out.append(Finding("stopped learning", name, (window[0][0], window[-1][0]),
                               f"gradient norm fell from {early:.2g} (first quarter) to {late:.2g} (last quarter)"
                               f", the whole network's by {converged:.2g}x",
                               "dead or saturated units feed it (see the act/* charts), or the lr schedule hit 0"))
    return out


def edge_of_stability(scalars, grads, th) -> list[Finding]:
    return curvature_findings(scalars)


RULES = (non_finite, exploding_rule, vanishing_rule, update_ratio, saturated, dead_units, stopped, edge_of_stability)


def _healthy(scalars, grads, span) -> Finding:
    ratios = _family(scalars, "update_ratio/")
    ratio_meds = [r for r in (_median(s) for n, s in ratios.items() if _is_weight(n)) if math.isfinite(r)]
    parts = [f"{len(grads)} parameters over steps {span[0]}–{span[1]}: all gradient norms finite"]
    if ratio_meds:
        parts.append(f"update ratios {min(ratio_meds):.1e}–{max(ratio_meds):.1e}")
    if any(t.startswith("act/") for t in scalars):
        parts.append("no layer saturated or dead above the thresholds")
    return Finding(HEALTHY, "all", span, "; ".join(parts), "nothing to fix")


def curvature_findings(scalars: dict[str, Series]) -> list[Finding]:
    """Readings where the sharpness that counts for the optimizer (λ_max(H), or λ_max(P⁻¹H) for Adam) sat above
    its stability threshold (curv/edge > 1, gradlab.observe.curvature), with the lr that would have kept it below."""
    edge = [(s, v) for s, v in scalars.get("curv/edge", []) if math.isfinite(v)]
    above = [(s, v) for s, v in edge if v > 1]
    if not above:
        return []
    lrs = dict(scalars.get("curv/max_stable_lr", []))
    bound = min((lrs[s] for s, _ in above if s in lrs and math.isfinite(lrs[s])), default=math.nan)
    peak_step, peak = max(above, key=lambda p: p[1])
    pre = "curv/precond_sharpness" in scalars
    what = "preconditioned sharpness λ_max(P⁻¹H)" if pre else "sharpness λ_max(H)"
    threshold = "(2+2β₁)/(η(1−β₁))" if pre else "2/η ((2+2β)/η with momentum)"
    fix = (f"lower optimizer.lr to <= {bound:.3g} (the largest lr whose threshold clears the sharpness measured "
           "there), or warm it up (scheduler=onecycle); full-batch GD hovers at the edge by itself (Cohen et al. "
           "2021): the loss then falls non-monotonically") if math.isfinite(bound) else "lower optimizer.lr"
    return [Finding("edge of stability", "all", (above[0][0], above[-1][0]),
                    f"{what} above its threshold {threshold} at {len(above)} of {len(edge)} readings, up to "
                    f"{peak:.3g}x the threshold at step {peak_step}", fix)]


def _family(scalars: dict[str, Series], prefix: str, exclude: tuple[str, ...] = ()) -> dict[str, Series]:
    return {t[len(prefix):]: s for t, s in scalars.items()
            if t.startswith(prefix) and t[len(prefix):] not in exclude and s}


def _finite(values) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def _median(series) -> float:
    values = _finite(v for _, v in series)
    return statistics.median(values) if values else math.nan


def _half(series: Series) -> Series:
    return series[len(series) // 2:]


def _quarter(series: Series, which: int) -> Series:
    k = max(1, len(series) // 4)
    return series[:k] if which == 0 else series[-k:]
