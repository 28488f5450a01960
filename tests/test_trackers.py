"""MLflow and W&B get what TensorBoard gets: read back through MLflow's own client and W&B's own record format."""

import json
import struct
import sys
from pathlib import Path

import pytest

# requirements.txt installs MLflow; a GPU machine's own Python (scripts/gpu_check.sh runs `pytest -m cuda` there)
# may lack it, and this module then reports as skipped instead of failing the collection of the CUDA tests.
MlflowClient = pytest.importorskip("mlflow.tracking", reason="MLflow is not installed").MlflowClient

from gradlab.config import rules as config
from gradlab.errors import UserError
from gradlab.observe.events import read_scalars
from helpers import compose_config, only_run_dir, run_cli, tiny_mnist_args

EVERY_STEP = ["trainer.max_epochs=1", "trainer.log_every_n_steps=1", "callbacks.grad_norm.log_every_n_steps=1",
              "callbacks.throughput.window_size=2"]


def one_run(out: Path) -> Path:
    run_dir = only_run_dir(out)
    return run_dir


def assert_same_series(tb: list[tuple[int, float]], other: list[tuple[int, float]], tag: str) -> None:
    # TensorBoard stores float32; MLflow and W&B keep the float64 they were given.
    assert [s for s, _ in other] == [s for s, _ in tb], tag
    assert [v for _, v in other] == pytest.approx([v for _, v in tb], rel=1e-6, abs=1e-12), tag


@pytest.fixture(scope="module")
def tracked_run(mnist_root, tmp_path_factory):
    """One tiny real CNN run with logger=many (TensorBoard + CSV + MLflow) plus W&B, every metric at every step."""
    out = tmp_path_factory.mktemp("tracked")
    proc = run_cli("train.py", *tiny_mnist_args(mnist_root, out), *EVERY_STEP, "logger=[many,wandb]", cwd=out,
                   env={"WANDB_SILENT": "true"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, one_run(out)


@pytest.mark.slow
def test_many_loggers_mlflow_holds_every_tensorboard_series(tracked_run, tmp_path):
    out, run_dir = tracked_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    tb = read_scalars(run_dir / "tensorboard")

    client = MlflowClient(f"sqlite:///{out}/logs/mlflow.db")
    experiment = client.get_experiment_by_name("train/runs")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == run_dir.name and run.info.status == "FINISHED"
    # Every TensorBoard series, gradient instruments and throughput included, is in MLflow with the same points.
    grad_tags = [t for t in tb if t.startswith("grad_norm/")]
    assert "grad_norm/conv1.weight" in grad_tags and "grad_norm/total" in grad_tags
    assert any(t.startswith("update_ratio/") for t in tb) and "train/device/samples_per_sec" in tb
    assert set(tb) <= set(run.data.metrics), set(tb) - set(run.data.metrics)
    for tag, series in tb.items():
        history = client.get_metric_history(run.info.run_id, tag)
        assert_same_series(series, sorted((m.step, m.value) for m in history), tag)
    assert len(tb["grad_norm/conv1.weight"]) == metrics["steps"]  # one point per optimizer step
    # The resolved config as params; the results as tags and artifacts.
    assert run.data.params["optimizer.lr"] == "0.001" and run.data.params["model.net._target_"].endswith("MnistCNN")
    assert run.data.tags["best_checkpoint"] == metrics["best_checkpoint"]
    local = client.download_artifacts(run.info.run_id, "metrics.json", str(tmp_path))
    assert json.loads(Path(local).read_text()) == metrics
    # The CSV logger of logger=many has the same gradient columns.
    header = (run_dir / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert set(grad_tags) <= set(header)


@pytest.mark.slow
def test_mlflow_sweep_is_one_experiment_with_a_run_per_job(mnist_root, tmp_path):
    out = tmp_path / "out"
    proc = run_cli("train.py", "-m", *tiny_mnist_args(mnist_root, out), "logger=mlflow", "trainer.max_steps=2",
                   "test=false", "optimizer.lr=0.01,0.002", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = (out / "logs" / "train" / "multiruns").iterdir()
    client = MlflowClient(f"sqlite:///{out}/logs/mlflow.db")
    experiment = client.get_experiment_by_name(f"train/multiruns/{sweep.name}")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted((r.info.run_name, r.data.params["optimizer.lr"]) for r in runs) == [("0", "0.01"), ("1", "0.002")]
    for r in runs:
        assert len(client.get_metric_history(r.info.run_id, "grad_norm/total")) == 1  # step 0 (logs every 50)


# ---- Weights & Biases, offline ------------------------------------------------------------------------------
def wandb_records(path: Path):
    """The records of a .wandb file, decoded with wandb's own protobuf schema (`wandb_internal_pb2.Record`).

    The file is W&B's transaction log in LevelDB's log format: a 7-byte header (":W&B", 0xBEE1, version), then
    32 KiB blocks of chunks (crc32 u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32 * 1024
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1)
    pos, parts = 7, []
    while pos + 7 <= len(data):
        left = block - pos % block
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (kind == 0 and length == 0):  # the rest of a block is padding
            pos += left
            continue
        parts.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record


@pytest.mark.slow
def test_wandb_offline_run_files_hold_the_same_series(tracked_run):
    _, run_dir = tracked_run
    (wandb_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")  # offline, inside the run folder
    history: dict[str, dict[int, float]] = {}  # as events.read_scalars: a step logged twice keeps its later value
    config_keys, summary = set(), {}
    for record in wandb_records(wandb_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            for key, value in row.items():
                history.setdefault(key, {})[row["trainer/global_step"]] = value
        elif kind == "run":
            config_keys |= {i.key for i in record.run.config.update}
            assert record.run.display_name == run_dir.name
        elif kind == "config":
            config_keys |= {i.key for i in record.config.update}
        elif kind == "summary":
            summary.update({i.key: json.loads(i.value_json) for i in record.summary.update})
    tb = read_scalars(run_dir / "tensorboard")
    assert "grad_norm/conv1.weight" in tb and set(tb) <= set(history), set(tb) - set(history)
    for tag, series in tb.items():
        # W&B's history rows carry the step as the metric trainer/global_step.
        assert_same_series(series, sorted(history[tag].items()), tag)
    assert {"optimizer.lr", "model.net._target_", "trainer.max_epochs"} <= config_keys
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert summary["best_checkpoint"] == metrics["best_checkpoint"]
    assert summary["test/acc"] == pytest.approx(metrics["test/acc"])


def test_wandb_missing_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # how Python marks a module as not importable
    cfg = compose_config("train", ["logger=wandb", f"paths.root_dir={tmp_path}"], tmp_path)
    with pytest.raises(UserError, match=r"logger\.wandb\._target_=.*WandbLogger needs the wandb package.*pip install wandb"):
        config.check(cfg)
    monkeypatch.delitem(sys.modules, "wandb")
    config.check(cfg)  # installed: no complaint
