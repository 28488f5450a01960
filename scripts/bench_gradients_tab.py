"""Scale check of the GRADIENTS tab: 200 layers x 10,000 logged steps must render in under 2 s in headless Chromium.

    python scripts/bench_gradients_tab.py                          # 200 layers x 10,000 steps, 3 page loads
    python scripts/bench_gradients_tab.py --layers 50 --steps 2000

Writes a synthetic run (grad_norm/<layer> for every layer at every step, one event per step as gradlab's writer
logs them, a spike planted at one step), starts TensorBoard with the tab, and times: the backend's first read of
the run (every event parsed once), a warm /data request (downsampled to the chart width: min and max per
bucket), and the page: from navigation until every chart and the heat map are drawn, and the tab's own
fetch-and-draw time. Prints a table with the CPU model.
"""

import argparse
import base64
import json
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.summary.writer.event_file_writer import EventFileWriter

sys.path.insert(0, str(Path(__file__).parent))
import gradients_tab as tab  # noqa: E402
from gradlab.run.precision import cpu_model


def write_run(folder: Path, layers: int, steps: int) -> None:
    """Norms falling with depth (a staircase, as in a vanishing run), noisy, one spike in the middle layer."""
    rng = np.random.default_rng(0)
    names = [f"grad_norm/layers.fc{i}.weight" for i in range(layers)]
    base = 10.0 ** np.linspace(-6, 0, layers)
    writer = EventFileWriter(str(folder), max_queue_size=1000)
    for step in range(steps):
        values = base * rng.lognormal(0, 0.3, layers)
        if step == steps // 3:
            values[layers // 2] = 1e3
        writer.add_event(Event(step=step, wall_time=time.time(), summary=Summary(
            value=[Summary.Value(tag=t, simple_value=float(v)) for t, v in zip(names, values)])))
    writer.close()



def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=200)
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--loads", type=int, default=3, help="page loads timed")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        logdir = Path(tmp)
        t = time.perf_counter()
        write_run(logdir / "big", args.layers, args.steps)
        rows.append(("write the run's events (not the tab)", time.perf_counter() - t))
        with tab.tensorboard(logdir, timeout=900, load_fast="auto") as base:
            url = f"{base}/data/plugin/gradients/data?run=big&buckets=1200"
            t = time.perf_counter()
            with urllib.request.urlopen(url, timeout=600) as r:
                json.loads(r.read())
            rows.append(("backend: first read of every event + /data", time.perf_counter() - t))
            t = time.perf_counter()
            with urllib.request.urlopen(url, timeout=600) as r:
                body = r.read()
            view = json.loads(body)
            rows.append((f"backend: warm /data ({len(body) / 1e6:.1f} MB JSON)", time.perf_counter() - t))
            points = sum(len(base64.b64decode(s["steps"])) // 8  # float64 steps, base64 in the JSON
                         for f in view["families"] for s in f["series"])
            with tab.chromium(1400, 1000) as driver:
                for load in range(args.loads):
                    driver.switch_to.default_content()
                    driver.get("about:blank")
                    seconds = tab.open_tab(driver, base)
                    fetch, draw = driver.execute_script("return [window.gradients.fetchMs, window.gradients.drawMs]")
                    rows.append((f"page load {load + 1}: navigation to drawn (TensorBoard's own UI included)",
                                 seconds))
                    rows.append((f"page load {load + 1}: the tab's fetch of /data", fetch / 1e3))
                    rows.append((f"page load {load + 1}: the tab's drawing (heat map, every chart)", draw / 1e3))
    print(f"GRADIENTS tab, {args.layers} layers x {args.steps:,} steps = {args.layers * args.steps:,} values, "
          f"{points:,} points drawn after downsampling; {cpu_model()}\n")
    print(f"| {'what':<72} | seconds |\n| {'-' * 72} | ------: |")
    for what, seconds in rows:
        print(f"| {what:<72} | {seconds:7.2f} |")


if __name__ == "__main__":
    main()
