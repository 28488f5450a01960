"""Sweeps through the real CLI on tiny IDX data: job dirs, failures, the report, Optuna, submitit, the SLURM config."""

import csv
import json
import os
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from helpers import ROOT, compose_config, run_cli, tiny_mnist_args

sys.path.insert(0, str(ROOT / "scripts"))
import sweep_report  # noqa: E402

SHORT = ["trainer.max_epochs=1", "trainer.log_every_n_steps=1"]


def only_sweep_dir(out: Path) -> Path:
    sweeps = list((out / "logs" / "train" / "multiruns").iterdir())
    assert len(sweeps) == 1, sweeps
    return sweeps[0]


def metrics_of(job_dir: Path) -> dict:
    return json.loads((job_dir / "metrics.json").read_text())


def events(job_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(job_dir / "tensorboard"))
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def lr_sweep(mnist_root, tmp_path_factory):
    """Three jobs; the middle one is planted to fail (a negative learning rate)."""
    out = tmp_path_factory.mktemp("sweep")
    proc = run_cli("train.py", "-m", *tiny_mnist_args(mnist_root, out), *SHORT, "optimizer.lr=1e-5,-1,0.003",
                   cwd=out)
    assert proc.returncode != 0  # Hydra re-raises the failure, once every job has run
    # ... as the user's one-paragraph error, not a traceback
    assert "optimizer.lr=-1: must be a number > 0" in proc.stderr and "Traceback" not in proc.stderr
    assert "the other jobs of the sweep ran" in proc.stderr
    return only_sweep_dir(out)


def test_multirun_gives_each_job_its_dir_metrics_events_and_hparams(lr_sweep):
    assert sorted(p.name for p in lr_sweep.iterdir() if p.is_dir()) == ["0", "1", "2"]
    for job, lr in (("0", 1e-5), ("2", 0.003)):
        metrics = metrics_of(lr_sweep / job)
        assert metrics["status"] == "completed" and f"optimizer.lr={lr:g}" in metrics["overrides"]
        acc = events(lr_sweep / job)
        val_acc = acc.Scalars("val/acc")
        # The curve keeps its real step: nothing was rewritten at step 0 for the HParams view.
        assert [e.step for e in val_acc] == [metrics["steps"] - 1]
        assert val_acc[0].value == pytest.approx(metrics["val/acc"])
        plugin = acc.PluginTagToContent("hparams")
        start = plugin_data_pb2.HParamsPluginData.FromString(plugin["_hparams_/session_start_info"])
        hparams = start.session_start_info.hparams
        assert hparams["optimizer.lr"].number_value == pytest.approx(lr)
        assert hparams["optimizer"].string_value == "adam" and hparams["model"].string_value == "cnn"
        experiment = plugin_data_pb2.HParamsPluginData.FromString(plugin["_hparams_/experiment"]).experiment
        assert {"val/acc", "test/acc"} <= {m.name.tag for m in experiment.metric_infos}
    # lr 1e-5 barely moves the weights in 7 steps; 3e-3 learns the tiny digits.
    assert metrics_of(lr_sweep / "0")["val/loss"] > metrics_of(lr_sweep / "2")["val/loss"]


def test_failed_job_is_recorded_and_the_next_job_still_ran(lr_sweep):
    failed = metrics_of(lr_sweep / "1")
    # Rejected by the config check or by torch.optim, whichever comes first: either way the job failed, not the sweep.
    assert failed["status"] == "failed" and "lr" in failed["error"] and "-1" in failed["error"]
    assert "optimizer.lr=-1" in failed["overrides"]
    assert metrics_of(lr_sweep / "2")["status"] == "completed"


def test_report_table_csv_and_plot_match_the_metrics_files(lr_sweep, tmp_path, capsys):
    assert sweep_report.main([str(lr_sweep), "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    with open(tmp_path / "sweep_report.csv") as f:
        rows = list(csv.DictReader(f))
    completed = sorted(("0", "2"), key=lambda j: -metrics_of(lr_sweep / j)["val/acc"])
    assert [r["job"] for r in rows] == [*completed, "1"]  # best first, the failed job last
    for row in rows[:2]:
        metrics = metrics_of(lr_sweep / row["job"])
        for key in ("val/acc", "val/loss", "test/acc", "wall_time_s"):
            assert float(row[key]) == metrics[key], key
        assert row["status"] == "completed"
        assert f"optimizer.lr={row['optimizer.lr']}" in metrics["overrides"]
        assert f"| {row['job']} | {row['optimizer.lr']} | {metrics['val/acc']:.4f} |" in printed
    failed = rows[2]
    assert (failed["status"], failed["val/acc"], failed["optimizer.lr"]) == ("failed", "", "-1")
    assert failed["error"] == metrics_of(lr_sweep / "1")["error"]
    assert "| job | optimizer.lr | val/acc |" in printed  # swept key, then the sweep's optimized_metric
    assert "3 jobs, 1 not completed" in printed
    png = (tmp_path / "sweep_report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_report_on_a_folder_without_jobs_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sweep_report.main([str(tmp_path)])
    assert exit_info.value.code == 2
    assert ".hydra/overrides.yaml" in capsys.readouterr().err


def test_optuna_search_runs_its_trials_and_keeps_the_best(mnist_root, tmp_path):
    proc = run_cli("train.py", "hparams_search=cnn_optuna", "hydra.sweeper.n_trials=2",
                   *tiny_mnist_args(mnist_root, tmp_path), *SHORT, "trainer.limit_train_batches=3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = only_sweep_dir(tmp_path)  # a multirun without -m: the search config sets hydra.mode
    space = yaml.safe_load((ROOT / "conf" / "hparams_search" / "cnn_optuna.yaml").read_text())
    assert "optimizer.lr" in space["hydra"]["sweeper"]["params"]
    trials = {}
    for job in ("0", "1"):
        metrics = metrics_of(sweep / job)
        values = dict(o.split("=", 1) for o in metrics["overrides"])
        assert 1e-4 <= float(values["optimizer.lr"]) <= 1e-2
        assert 0.0 <= float(values["model.dropout_fc"]) <= 0.6
        assert values["model.hidden"] in {"64", "128", "256"}
        assert values["data.batch_size"] == "32"  # the command line wins over the search space
        trials[job] = (metrics["val/acc_best"], values)
    assert trials["0"][1]["optimizer.lr"] != trials["1"][1]["optimizer.lr"]

    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    best_job = max(trials, key=lambda j: trials[j][0])
    assert results["best_value"] == pytest.approx(trials[best_job][0])
    for key, value in results["best_params"].items():
        assert float(trials[best_job][1][key]) == pytest.approx(float(value)), key


def test_search_space_syntax_samples_the_declared_distributions():
    from hydra_plugins.gradlab_optuna_sweeper.optuna_sweeper import search_space

    space = search_space(["lr=tag(log, interval(1e-4, 1e-1))", "p=interval(0.0, 0.5)", "h=range(64, 513, 64)",
                          "opt=choice(adam, sgd)", "seed=1", "seed=7"])
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    samples = [{k: s(t) for k, s in space.items()} for t in (study.ask() for _ in range(300))]  # override text
    lrs = sorted(float(s["lr"]) for s in samples)
    assert 1e-4 <= lrs[0] and lrs[-1] <= 1e-1
    assert 1e-3 < lrs[150] < 1e-2  # log-uniform: the median is near 10^-2.5 (uniform would put it near 0.05)
    assert all(0.0 <= float(s["p"]) <= 0.5 for s in samples)
    assert {s["h"] for s in samples} == {str(h) for h in range(64, 513, 64)}  # stop excluded, as in Python and Hydra
    assert {s["opt"] for s in samples} == {"adam", "sgd"}
    assert {s["seed"] for s in samples} == {"7"}  # fixed; the later override wins


def test_list_choices_go_back_into_the_override_as_lists():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from hydra_plugins.gradlab_optuna_sweeper.optuna_sweeper import search_space

    suggest = search_space(["model.hidden=choice([256,128],[64])"])["model.hidden"]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    texts = {suggest(study.ask()) for _ in range(30)}
    assert texts == {"[256,128]", "[64]"}
    parsed = OverridesParser.create().parse_overrides([f"model.hidden={t}" for t in sorted(texts)])
    assert [o.value() for o in parsed] == [[256, 128], [64]]  # lists again, not strings


@pytest.mark.slow
def test_submitit_local_launcher_runs_the_job_in_its_own_process(mnist_root, tmp_path):
    proc = run_cli("train.py", "-m", "hydra/launcher=submitit_local", *tiny_mnist_args(mnist_root, tmp_path),
                   *SHORT, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = only_sweep_dir(tmp_path)
    assert metrics_of(sweep / "0")["status"] == "completed"
    (job_folder,) = [p for p in (sweep / ".submitit").iterdir() if any(p.iterdir())]
    assert (job_folder / f"{job_folder.name}_0_result.pkl").exists()
    logs = "".join((job_folder / f"{job_folder.name}_0_log.{kind}").read_text() for kind in ("out", "err"))
    assert "Restoring states from the checkpoint" in logs  # Lightning's log lines go where Hydra's logging prints


def test_slurm_launcher_config_reaches_the_sbatch_script(tmp_path, monkeypatch):
    """Every documented key of hydra/launcher=slurm, through the real launcher, into the script submitit submits."""
    import submitit
    from hydra.utils import instantiate

    fake_bin = tmp_path / "bin"  # submitit's SLURM executor only checks that srun exists
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 1\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}:{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    keys = {"partition": "gpu", "account": "proj42", "qos": "high", "nodes": 2, "gpus_per_node": 4,
            "cpus_per_task": 6, "mem_gb": 100, "timeout_min": 90, "signal_delay_s": 150}
    cfg = compose_config("train", ["hydra/launcher=slurm", "trainer=ddp", f"paths.root_dir={tmp_path}",
                                   *(f"hydra.launcher.{k}={v}" for k, v in keys.items())], hydra=True)
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)

    class Submitted(Exception):
        pass

    def capture(executor, *args, **kwargs):
        raise Submitted(executor)

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", capture)
    with pytest.raises(Submitted) as submitted:
        launcher.launch([["seed=1"]], initial_job_idx=0)
    script = submitted.value.args[0]._executor._make_submission_file_text("python -m submitit.core._submit x", "0")
    flags = {line.split("=", 1)[0]: line.split("=", 1)[1] for line in script.splitlines()
             if line.startswith("#SBATCH --") and "=" in line}
    assert flags["#SBATCH --partition"] == "gpu" and flags["#SBATCH --account"] == "proj42"
    assert flags["#SBATCH --qos"] == "high" and flags["#SBATCH --nodes"] == "2"
    assert flags["#SBATCH --gpus-per-node"] == "4" and flags["#SBATCH --ntasks-per-node"] == "4"
    assert flags["#SBATCH --cpus-per-task"] == "6" and flags["#SBATCH --mem"] == "100GB"
    assert flags["#SBATCH --time"] == "90"
    # Lightning's requeue signal, sent signal_delay_s before the limit; submitit's USR2 never.
    assert flags["#SBATCH --signal"] == "USR1@150" and "USR2" not in script
    assert "\ntrap '' USR1\n" in script  # the batch shell outlives a USR1 meant for the training (scancel --full)
    assert launcher.params["max_num_timeout"] == 0


def test_ddp_trainer_takes_its_shape_from_the_slurm_allocation(monkeypatch):
    """What sbatch --nodes=2 --ntasks-per-node=4 sets is what trainer=ddp asks for, and Lightning agrees."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4")
    monkeypatch.setenv("SLURM_NNODES", "2")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    cfg = compose_config("train", ["trainer=ddp"], hydra=True)
    assert (cfg.trainer.devices, cfg.trainer.num_nodes) == (4, 2)
    assert SLURMEnvironment.detect() and SLURMEnvironment().auto_requeue
    SLURMEnvironment().validate_settings(num_devices=cfg.trainer.devices, num_nodes=cfg.trainer.num_nodes)
    with pytest.raises(ValueError):
        SLURMEnvironment().validate_settings(num_devices=1, num_nodes=1)
    # Every rank (srun task) of the job resolves the same run dir, without ${now:}.
    assert cfg.hydra.run.dir.endswith("/runs/4242")
