"""The GRADIENTS tab's backend, through TensorBoard's own server on loopback: the plugin is listed and served, the
layer order is the model's parameter order, values equal the event files' (read raw, record by record),
downsampling keeps a planted spike, a live run's new steps arrive, path traversal is refused; the entry point;
RunReader's incremental reading against a fresh read."""

import base64
import http.client
import importlib
import json
import subprocess
import sys
import time
import urllib.parse
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import tomllib
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.plugins.base_plugin import TBPlugin
from tensorboard.summary.writer.event_file_writer import EventFileWriter
from torch import nn

from gradlab.models.classifier import ClassifierModule
from gradlab.models.cnn import MnistCNN
from gradlab.observe.activations import ActivationMonitor
from gradlab.observe.events import RunReader, read_scalars
from gradlab.observe.grad_norm import GradNormMonitor
from gradlab.observe.health import HealthReport
from gradlab_tensorboard.data import downsample
from helpers import ROOT
from test_tb_instruments import free_port

PLUGIN = "/data/plugin/gradients"


def raw_scalars(folder: Path) -> dict[str, dict[int, float]]:
    """Every simple_value in the folder's event files, record by record: no EventAccumulator, no RunReader."""
    out: dict[str, dict[int, float]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        for record in RawEventFileLoader(str(path)).Load():
            event = Event.FromString(record)
            for v in event.summary.value:
                if v.HasField("simple_value"):
                    out.setdefault(v.tag, {})[event.step] = v.simple_value
    return out


def write_events(folder: Path, rows: list[tuple[int, dict[str, float]]]) -> None:
    """One event per step holding every tag's value, as gradlab's writer logs them."""
    writer = EventFileWriter(str(folder))
    for step, values in rows:
        writer.add_event(Event(step=step, wall_time=time.time(),
                               summary=Summary(value=[Summary.Value(tag=t, simple_value=v) for t, v in values.items()])))
    writer.close()


def spiky_rows(steps: range, spike_step: int, dip_step: int) -> list[tuple[int, dict[str, float]]]:
    """Three layers of smooth gradient norms; layer b spikes to 1e3 at one step and dips to 1e-6 at another."""
    rows = []
    for s in steps:
        values = {f"grad_norm/{n}": 1.0 + 0.1 * np.sin(s / 50 + k) for k, n in enumerate("abc")}
        if s == spike_step:
            values["grad_norm/b"] = 1e3
        if s == dip_step:
            values["grad_norm/b"] = 1e-6
        rows.append((s, values))
    return rows


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    """A real (tiny, in-process) CNN fit with the instruments and the health report, a long synthetic run with a
    planted spike, and a folder of events without gradlab's tags."""
    root = tmp_path_factory.mktemp("logdir")
    torch.manual_seed(0)
    module = ClassifierModule(MnistCNN(), nn.NLLLoss(), num_classes=10, optimizer=partial(torch.optim.SGD, lr=0.05))
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    cnn = root / "cnn"
    trainer = pl.Trainer(logger=TensorBoardLogger(str(cnn), name="tensorboard", version=""), default_root_dir=str(cnn),
                         callbacks=[GradNormMonitor(log_every_n_steps=1), ActivationMonitor(log_every_n_steps=1),
                                    HealthReport(out_dir=str(cnn))],
                         max_steps=4, log_every_n_steps=1, accelerator="cpu", enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0)
    trainer.fit(module, loader)
    write_events(root / "spiky", spiky_rows(range(5000), spike_step=3137, dip_step=1234))
    write_events(root / "other", [(s, {"train/loss": 1.0 / (s + 1)}) for s in range(5)])
    params = [n.removeprefix("net.") for n, _ in module.named_parameters()]
    return root, params


@pytest.fixture(scope="module")
def server(logdir):
    root, params = logdir
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gradlab_tensorboard", "--logdir", str(root), "--host",
                             "127.0.0.1", "--port", str(port), "--load_fast=false", "--reload_interval", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if request(port, "/data/plugins_listing")[0] == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"TensorBoard did not come up: "
                                     f"{proc.stderr.read().decode()[-2000:] if proc.poll() is not None else 'timeout'}")
            time.sleep(0.5)
        yield port, root, params
    finally:
        proc.kill()
        proc.wait(timeout=30)


def request(port: int, path: str) -> tuple[int, bytes]:
    """GET `path` exactly as written: http.client sends it unnormalized (no `..` folded away by the client)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def get_json(port: int, route: str, **params):
    status, body = request(port, f"{PLUGIN}/{route}" + ("?" + urllib.parse.urlencode(params) if params else ""))
    assert status == 200, body[:500]
    return json.loads(body)


def family(view: dict, key: str) -> dict[str, dict[int, float]]:
    """{layer: {step: value}} of one family, decoded from the route's base64 columns (float64 steps, float32 values)."""
    (fam,) = [f for f in view["families"] if f["key"] == key]
    column = lambda text, dtype: np.frombuffer(base64.b64decode(text), dtype).tolist()  # noqa: E731
    return {s["layer"]: dict(zip(map(int, column(s["steps"], "<f8")), column(s["values"], "<f4")))
            for s in fam["series"]}


def test_tab_is_listed_and_its_frontend_served(server):
    port, _, _ = server
    listing = json.loads(request(port, "/data/plugins_listing")[1])
    assert listing["gradients"]["enabled"] and listing["gradients"]["tab_name"] == "GRADIENTS"
    assert listing["gradients"]["loading_mechanism"] == {"type": "IFRAME",
                                                         "module_path": f"{PLUGIN}/static/index.js"}
    static = ROOT / "src" / "gradlab_tensorboard" / "static"
    for name in ("index.js", "style.css", "uPlot.iife.min.js", "uPlot.min.css"):
        status, body = request(port, f"{PLUGIN}/static/{name}")
        assert status == 200 and body == (static / name).read_bytes(), name


def test_runs_are_the_gradlab_runs_with_their_verdict(server):
    port, root, _ = server
    runs = {r["run"]: r["healthy"] for r in get_json(port, "runs")}
    health = json.loads((root / "cnn" / "health.json").read_text())
    # "other" has events but none of gradlab's tags; "spiky" has no health.json yet (a live run): unknown here,
    # judged by the rules on its scalars when it is shown
    assert runs == {"cnn/tensorboard": health["healthy"], "spiky": None}
    assert get_json(port, "data", run="spiky")["health"]["source"] == "provisional"


def test_layer_order_is_the_parameter_order_and_values_equal_the_event_files(server):
    port, root, params = server
    view = get_json(port, "data", run="cnn/tensorboard")
    raw = raw_scalars(root / "cnn" / "tensorboard")
    assert not view["downsampled"]
    for key, prefix in (("grad_norm", "grad_norm/"), ("update_ratio", "update_ratio/"), ("param_norm", "param_norm/")):
        series = family(view, key)
        assert list(series) == params, key  # input layer first, as model.named_parameters()
        for layer, points in series.items():
            assert points == raw[prefix + layer]  # float32 in the file and in the route: the same number
    acts = family(view, "act_dead")
    assert acts and all(points == raw[f"act/dead/{layer}"] for layer, points in acts.items())
    assert view["health"] == {**json.loads((root / "cnn" / "health.json").read_text()), "source": "health.json"}
    assert view["band"] == pytest.approx([1e-4, 1e-2])  # the healthy update-ratio band the run logged


def test_downsampling_keeps_a_planted_spike_and_dip(server):
    port, _, _ = server
    view = get_json(port, "data", run="spiky", buckets=100)
    assert view["downsampled"] and view["steps"] == [0, 4999]
    b = family(view, "grad_norm")["b"]
    assert len(b) <= 200 and b[3137] == 1e3 and b[1234] == pytest.approx(1e-6)
    zoom = family(get_json(port, "data", run="spiky", buckets=100, lo=3100, hi=3199), "grad_norm")["b"]
    assert sorted(zoom) == list(range(3100, 3200)) and zoom[3137] == 1e3  # 100 steps in 100 buckets: every point


def test_downsample_min_max_per_bucket_against_brute_force():
    rng = np.random.default_rng(0)
    steps = np.arange(0, 30000, 3)
    values = rng.lognormal(size=len(steps))
    values[rng.integers(0, len(values), 20)] = np.nan
    s, v, cut = downsample(steps, values, 0, 29997, 64)
    assert cut and len(s) <= 128 and np.all(np.diff(s) > 0)
    edges = np.linspace(0, 29997, 65)
    for k in range(64):  # every bucket's min and max are kept, found again by brute force
        inside = (steps >= edges[k]) & ((steps < edges[k + 1]) | (k == 63))
        kept = v[(s >= edges[k]) & ((s < edges[k + 1]) | (k == 63))]
        assert np.nanmax(values[inside]) in kept and np.nanmin(values[inside]) in kept


def test_a_live_run_shows_new_steps_on_the_next_request(server):
    port, root, _ = server
    live = root / "live"
    write_events(live, spiky_rows(range(10), spike_step=-1, dip_step=-1))
    before = family(get_json(port, "data", run="live"), "grad_norm")["a"]
    write_events(live, spiky_rows(range(10, 15), spike_step=-1, dip_step=-1))  # a second file, as on resume
    after = family(get_json(port, "data", run="live"), "grad_norm")
    assert sorted(before) == list(range(10)) and sorted(after["a"]) == list(range(15))
    raw = raw_scalars(live)
    assert all(after[layer] == raw[f"grad_norm/{layer}"] for layer in "abc")  # the appended tail converted right


@pytest.mark.parametrize("path", [
    "/static/../plugin.py", "/static/%2e%2e/plugin.py", "/static/..%2fplugin.py", "/static/../../../../etc/passwd",
    "/static//etc/passwd", "/static/%2fetc%2fpasswd", "/static/", "/static/nonexistent.js",
    "/data?run=..", "/data?run=../cnn/tensorboard", "/data?run=%2Fetc%2Fpasswd", "/data?run=cnn/tensorboard/..",
    "/data?run=cnn/tensorboard&buckets=%2Fetc", "/data?run=cnn/tensorboard&lo=nan", "/data",
])
def test_path_traversal_and_unknown_runs_are_refused(server, path):
    port, root, _ = server
    status, body = request(port, PLUGIN + path)
    assert status in (400, 404), (path, status)
    assert b"import" not in body and b"root:" not in body  # neither plugin.py's source nor /etc/passwd


def test_absolute_run_path_is_refused(server):
    port, root, _ = server
    status, _ = request(port, f"{PLUGIN}/data?" + urllib.parse.urlencode({"run": str(root / "cnn" / "tensorboard")}))
    assert status == 404


def test_entry_point_is_declared_and_resolves_to_the_plugin():
    """TensorBoard loads `tensorboard_plugins` entry points (default.get_dynamic_plugins); importlib.metadata sees
    this one only after `pip install -e .`, so read pyproject.toml and resolve it the way the loader does."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (target,) = project["project"]["entry-points"]["tensorboard_plugins"].values()
    module, _, attr = target.partition(":")
    plugin = getattr(importlib.import_module(module), attr)
    assert issubclass(plugin, TBPlugin) and plugin.plugin_name == "gradients"
    assert "static/*" in project["tool"]["setuptools"]["package-data"][module.split(".")[0]]


def test_run_reader_reads_only_new_events_and_equals_a_fresh_read(tmp_path):
    """A live run (appended twice) and a resumed one (a second folder overlapping steps): the kept reader's
    series equal a fresh reader's, and update() names only the tags that changed."""
    reader = RunReader(tmp_path)
    write_events(tmp_path / "a", [(s, {"x": s, "y": -s}) for s in range(5)])
    assert reader.update() == {"x", "y"} and reader.scalars() == read_scalars(tmp_path)
    kept = reader.series["x"]
    assert reader.update() == set()  # nothing new: nothing re-merged
    write_events(tmp_path / "a", [(s, {"x": s}) for s in range(5, 8)])
    assert reader.update() == {"x"} and reader.series["x"] is kept  # appended in place, not rebuilt
    write_events(tmp_path / "b", [(s, {"x": 100 + s, "z": 1.0}) for s in range(6, 10)])  # resumed from step 6
    assert reader.update() == {"x", "z"}
    assert reader.scalars() == read_scalars(tmp_path)
    assert dict(reader.series["x"])[6] == 106  # the later folder wins
    assert list(reader.series) == ["x", "y", "z"]  # first-logged order
