"""A Hydra sweeper that lets Optuna choose each trial's hyperparameters (works with Optuna 2.10 to 5.x).

    python train.py -m hparams_search=cnn_optuna                            # conf/hparams_search/cnn_optuna.yaml
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
"""

import logging
import math
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

    def sweep(self, arguments: list[str]) -> list[JobReturn]:
        space = search_space([f"{k}={v}" for k, v in self.params.items()] + list(arguments))
        study = optuna.create_study(study_name=self.study_name, storage=self.storage, sampler=self.sampler,
                                    direction=self.direction, load_if_exists=True)
        log.info(f"Optuna study {study.study_name!r}: {self.n_trials} trials, {self.direction} the job's return "
                 f"value, {type(study.sampler).__name__}, storage {self.storage or 'in memory'}")
        returns: list[JobReturn] = []
        failed: list[JobReturn] = []
        while len(returns) < self.n_trials:
            trials = [study.ask() for _ in range(min(self.n_jobs, self.n_trials - len(returns)))]
            batch = [self._overrides(trial, space) for trial in trials]
            self.validate_batch_is_legal(batch)
            results = self.launcher.launch(batch, initial_job_idx=self.job_idx)
            self.job_idx += len(results)
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
            if len(failed) > self.max_failure_rate * self.n_trials:
                log.error(f"{len(failed)} of {len(returns)} trials failed (max_failure_rate={self.max_failure_rate}).")
                _ = failed[0].return_value  # re-raises the first failure with its traceback
                raise RuntimeError(f"trial failed: {_failure(failed[0])}")
        self._save_results(study)
        return returns

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
