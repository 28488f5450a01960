"""Small files of a run (metrics.json, health.json, lr_find.json), written whole or not at all. Light on imports:
Hydra's job callback (gradlab.run.job_record) writes a failed job's record with it before torch is loaded."""

import json
import math
import os


def strict_json(data: dict) -> dict:
    """`data` as strict JSON takes it, by the one NaN policy: NaN and inf are not JSON (json.dump would write
    NaN/Infinity, which strict parsers reject), so such a value becomes null and is named, with its value, under a
    top-level "nonfinite" map keyed by its path:
    {"train/loss": null, ..., "nonfinite": {"train/loss": "inf", "findings.0.value": "nan"}}."""
    bad: dict[str, str] = {}

    def finite(value, where: str):
        if isinstance(value, float) and not math.isfinite(value):
            bad[where] = repr(value)
            return None
        if isinstance(value, dict):
            return {k: finite(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [finite(v, f"{where}.{i}") for i, v in enumerate(value)]
        return value

    data = finite(data, "")
    return {**data, "nonfinite": bad} if bad else data


def write_json(path, data: dict) -> None:
    """The one JSON writer of a run's files (metrics.json, health.json, lr_find.json), by the one NaN policy
    (`strict_json`): written beside the target, then swapped in, so a reader never sees half a file."""
    data = strict_json(data)
    path = str(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True, allow_nan=False)
    os.replace(tmp, path)
