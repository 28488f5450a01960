"""A Hydra sweeper that lets Optuna choose each trial's hyperparameters (works with Optuna 2.10 to 5.x).

    python train.py -m hparams_search=cnn_optuna                            # conf/hparams_search/cnn_optuna.yaml
    python train.py -m hparams_search=cnn_optuna hydra.sweep.dir=<its sweep dir> +sweep.resume=true   # killed? go on
    python train.py -m hparams_search=cnn_optuna hydra.sweeper.n_trials=50 hydra/launcher=slurm hydra.sweeper.n_jobs=8 \
        hydra.sweeper.storage=sqlite:///cnn.db hydra.sweeper.study_name=cnn   # 8 trials at a time; rerun to resume

It reads the config of hydra-optuna-sweeper (`hydra.sweeper.params` in Hydra's sweep syntax, `direction`, `n_trials`,
`n_jobs`, `sampler`, `storage`, `study_name`, `max_failure_rate`): every release of that plugin pins optuna<3.
Search space, one line per parameter:
    optimizer.lr: tag(log, interval(1e-4, 1e-1))    float, log-uniform
    model.dropout_fc: interval(0.0, 0.5)            float, uniform (an interval is always of floats)
    model.hidden: range(64, 513, 64)                int 64..512 in steps of 64 (stop excluded, as in Python)
    optimizer: choice(adam, sgd)                    categorical (config groups too)
    model.hidden: choice([256,128], [512,256])      categorical over lists
    trainer.max_epochs: 5                           fixed
Command-line overrides win over `params` with the same key. Each batch of `n_jobs` trials is handed to the configured
Hydra launcher at once (one after another locally, in parallel under submitit); a failed trial is told to Optuna as
FAIL, and the sweep stops once more than `max_failure_rate` x `n_trials` trials have failed.

Resuming (gradlab.checkpoints.sweeps): without a `storage` the study lives in <sweep dir>/optuna.db. `n_trials` is the number of
finished trials (complete, pruned or failed by themselves) the study ends with, however many processes it took.
`+sweep.resume=true` marks the trials a dead sweep left RUNNING as FAIL (user attribute "interrupted") and enqueues
their values first; the retry runs in the dead trial's folder and continues from its checkpoint. A RUNNING trial whose
job did finish (a SLURM job outlives its sweep) is told the value in its metrics.json instead.
"""

import logging
import math
import os
from typing import Callable, Optional

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, Transformer
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

# A suggestion: trial -> this trial's value of one parameter, as override text (`0.003`, `adam`, `[256,128]`).
Suggest = Callable[[optuna.Trial], str]


def search_space(overrides: list[str]) -> dict[str, Suggest]:
    """One suggestion per override key, from Hydra's sweep syntax; later overrides of a key win."""
    space: dict[str, Suggest] = {}
    for override in OverridesParser.create().parse_overrides(overrides):
        space[override.get_key_element()] = _suggestion(override)
    return space


def _suggestion(override: Override) -> Suggest:
    name, text = override.get_key_element(), Override._get_value_element_as_str
    if not override.is_sweep_override():
        fixed = override.get_value_element_as_str()
        return lambda trial: fixed
    if override.is_interval_sweep():
        sweep = override.value()
        log_scale = "log" in sweep.tags
        return lambda trial: text(trial.suggest_float(name, sweep.start, sweep.end, log=log_scale))
    values = list(override.sweep_iterator(transformer=Transformer.encode))
    if override.is_range_sweep() and all(isinstance(v, int) for v in values) and not override.value().shuffle:
        step = values[1] - values[0] if len(values) > 1 else 1
        return lambda trial: text(trial.suggest_int(name, values[0], values[-1], step=step))
    # Optuna's choices must be plain values: a list choice such as [256,128] goes in as its text, and every choice
    # goes back into the override as Hydra wrote it.
    texts = list(override.sweep_iterator(transformer=Transformer.str))
    return lambda trial: texts[values.index(trial.suggest_categorical(name, values))]


def _objective(ret: JobReturn) -> Optional[float]:
    """The job's return value as a score, or None when the job failed or returned no finite number."""
    if ret.status != JobStatus.COMPLETED:
        return None
    value = ret.return_value
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


# A trial whose sweep process died while it ran: marked FAIL with this user attribute, and not counted as finished.
INTERRUPTED = "interrupted"


def finished(trial: optuna.trial.FrozenTrial) -> bool:
    """Counts towards n_trials: completed, pruned, or failed by itself (not killed with its sweep)."""
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
    return trial.state in done and INTERRUPTED not in trial.user_attrs


def seeded(sampler_cfg: Optional[DictConfig], ordinal: int) -> Optional[optuna.samplers.BaseSampler]:
    """The configured sampler, seeded for the trial that is the study's `ordinal`-th counted one; None when the
    config has no seed. Optuna's samplers keep one random stream per process: a study resumed by a new process
    would draw its next trials from the start of that stream again (the first new random trial repeats trial 0's
    values). A fresh sampler per trial, seeded by (seed, ordinal), draws the same whether or not the study stopped
    in between; what the sampler learns from the study is in the storage, not in the sampler object."""
    if sampler_cfg is None or sampler_cfg.get("seed") is None:
        return None
    import numpy as np
    from hydra.utils import instantiate

    seed = int(np.random.SeedSequence([int(sampler_cfg.seed), ordinal]).generate_state(1)[0])
    return instantiate(sampler_cfg, seed=seed)


class OptunaSweeper(Sweeper):
    def __init__(self, sampler: Optional[optuna.samplers.BaseSampler] = None, direction: str = "maximize",
                 n_trials: int = 20, n_jobs: int = 1, storage: Optional[str] = None, study_name: Optional[str] = None,
                 max_failure_rate: float = 0.0, params: Optional[DictConfig] = None):
        if direction not in ("maximize", "minimize"):
            raise ValueError(f"hydra.sweeper.direction must be 'maximize' or 'minimize', not {direction!r}")
        if n_trials < 1 or n_jobs < 1 or not 0.0 <= max_failure_rate <= 1.0:
            raise ValueError("hydra.sweeper needs n_trials >= 1, n_jobs >= 1 and 0 <= max_failure_rate <= 1")
        self.sampler, self.direction = sampler, direction
        self.n_trials, self.n_jobs, self.max_failure_rate = n_trials, n_jobs, max_failure_rate
        self.storage, self.study_name = storage, study_name
        self.params = OmegaConf.to_container(params) if params is not None else {}
        self.config: Optional[DictConfig] = None
        self.launcher = None
        self.job_idx = 0

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)
        self.sampler_cfg = config.hydra.sweeper.get("sampler")

    def sweep(self, arguments: list[str]) -> list[JobReturn]:
        from gradlab.checkpoints import sweeps
        from gradlab.config.cli import fail
        from gradlab.errors import UserError

        sweep_dir = str(self.config.hydra.sweep.dir)
        try:
            resume, arguments = sweeps.split_resume_flag(list(arguments))
            definition = sweeps.definition(self.params, arguments)
            if resume:  # checked before anything is written: a refused resume leaves the sweep dir as it was
                sweeps.check_same_sweep(sweep_dir, definition)
                sweeps.check_not_running(sweep_dir)
            else:
                sweeps.refuse_to_overwrite(sweep_dir)
            state = sweeps.read_state(sweep_dir) if resume else {}
        except UserError as err:
            fail(str(err))
        os.makedirs(sweep_dir, exist_ok=True)
        if not resume:
            OmegaConf.save(self.config, os.path.join(sweep_dir, "multirun.yaml"))
        # Without a storage of its own the study lives in the sweep dir, so that the sweep can be resumed.
        storage = self.storage or state.get("storage") or f"sqlite:///{os.path.abspath(sweep_dir)}/optuna.db"
        study = optuna.create_study(study_name=self.study_name or state.get("study_name"), storage=storage,
                                    sampler=self.sampler, direction=self.direction, load_if_exists=True)
        state.update(kind="optuna", definition=definition, storage=storage, study_name=study.study_name,
                     n_trials=self.n_trials)
        launch = sweeps.new_launch(state, resume)
        sweeps.write_state(sweep_dir, state)
        retry_dirs = self._recover(study, sweep_dir, launch["jobs"]) if resume else {}
        sweeps.write_state(sweep_dir, state)
        space = search_space([f"{k}={v}" for k, v in self.params.items()] + list(arguments))
        done = sum(finished(t) for t in study.get_trials(deepcopy=False))
        log.info(f"Optuna study {study.study_name!r}: {done} of {self.n_trials} trials finished, {self.direction} the "
                 f"job's return value, {type(study.sampler).__name__}, storage {storage}")
        numbers = [int(j.dir) for j in sweeps.job_dirs(sweep_dir) if j.dir.isdigit()]
        self.job_idx = max(numbers) + 1 if numbers else 0
        returns: list[JobReturn] = []
        failed = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,)) if finished(t)]
        while done < self.n_trials:
            trials, batch, dirs = [], [], []
            for i in range(min(self.n_jobs, self.n_trials - done)):
                study.sampler = seeded(self.sampler_cfg, done + i) or study.sampler
                trial = study.ask()
                overrides = self._overrides(trial, space)
                # A retried trial runs again in its folder and continues from its checkpoint there.
                folder = retry_dirs.pop(sweeps.job_key(overrides), None)
                if folder is None:
                    folder, self.job_idx = str(self.job_idx), self.job_idx + 1
                trial.set_user_attr("job_dir", folder)
                action = launch["jobs"].get(folder, sweeps.NEW)  # a retry: as _recover found its folder
                launch["jobs"][folder] = action
                trials.append(trial)
                dirs.append(folder)
                batch.append(overrides + (sweeps.resume_overrides(folder, action == sweeps.RESUMED) if resume else []))
            sweeps.write_state(sweep_dir, state)
            self.validate_batch_is_legal(batch)
            first = dirs[0]
            results = self.launcher.launch(batch, initial_job_idx=int(first) if first.isdigit() else 0)
            for trial, ret in zip(trials, results):
                value, params = _objective(ret), dict(trial.params)
                if value is None:
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                    failed.append(ret)
                    log.warning(f"Trial {trial.number} failed: {_failure(ret)}")
                else:
                    study.tell(trial, value)
                    log.info(f"Trial {trial.number}: {value:.4f} with {params}")
            returns.extend(results)
            done += len(results)
            if len(failed) > self.max_failure_rate * self.n_trials:
                log.error(f"{len(failed)} of {done} trials failed (max_failure_rate={self.max_failure_rate}).")
                ret = next((r for r in failed if isinstance(r, JobReturn)), None)  # else: failed before a resume
                if ret is not None:
                    _ = ret.return_value  # re-raises the first failure with its traceback
                raise RuntimeError(f"trial failed: {_failure(ret)}" if ret else f"{len(failed)} trials failed")
        self._save_results(study)
        return returns

    def _recover(self, study: optuna.Study, sweep_dir: str, actions: dict) -> dict:
        """Trials left RUNNING by the sweep process that died. One whose job finished (its metrics.json says
        completed: under SLURM a job outlives its sweep) is told its value; the others are marked FAIL, with the
        reason in their user attributes, and their values are enqueued to be tried first. Returns, for those,
        their folders by overrides: the retry runs there and continues from the checkpoint it finds."""
        from gradlab.checkpoints import sweeps

        jobs = {j.dir: j for j in sweeps.job_dirs(sweep_dir)}
        metric = self.config.get("optimized_metric")
        retry: dict = {}
        for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            job = jobs.get(str(trial.user_attrs.get("job_dir")))
            value = sweeps.job_value(job.metrics, metric) if job is not None and job.complete else None
            if value is not None and math.isfinite(value):
                study.tell(trial.number, value)
                actions[job.dir] = sweeps.SKIPPED
                log.info(f"Trial {trial.number} finished while its sweep was down: {value:.4f} (from {job.dir}/)")
                continue
            # Optuna has no public setter for the attributes of a trial another process started.
            reason = "its sweep process died while it ran; its values are retried"
            study._storage.set_trial_user_attr(trial._trial_id, INTERRUPTED, reason)
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
            if job is not None:
                retry[sweeps.job_key(job.overrides)] = job.dir
                actions[job.dir] = sweeps.RESUMED if job.checkpoint else sweeps.NEW
            log.warning(f"Trial {trial.number} was interrupted ({job.dir if job else 'no folder'}): marked FAIL, "
                        f"its values {trial.params} retried first")
        return retry

    def _overrides(self, trial: optuna.Trial, space: dict[str, Suggest]) -> list[str]:
        return [f"{key}={suggest(trial)}" for key, suggest in space.items()]

    def _save_results(self, study: optuna.Study) -> None:
        complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        if not complete:
            log.warning("No trial completed: no best parameters.")
            return
        best = study.best_trial
        log.info(f"Best trial {best.number}: value {best.value}, parameters {best.params}")
        results = {"name": "optuna", "best_trial": best.number, "best_value": best.value, "best_params": best.params}
        OmegaConf.save(OmegaConf.create(results), f"{self.config.hydra.sweep.dir}/optimization_results.yaml")


def _failure(ret: JobReturn) -> str:
    if ret.status == JobStatus.FAILED:
        return f"{type(ret._return_value).__name__}: {ret._return_value}"
    return f"returned {ret._return_value!r}, not a finite number (is `optimized_metric` logged?)"
