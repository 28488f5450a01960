"""Checks of the composed config before anything heavy is imported, so that a typo costs a second.

    python train.py optimizer.lr=-1      # error: optimizer.lr=-1: must be a number > 0 ... (exit 2, ~1 s)

`check(cfg)` runs on every entry point (train.py, eval.py, predict.py) right after Hydra composes and
before Lightning is imported: types and ranges of the known keys, cross-checks, required values.
Hydra itself rejects unknown keys and group options (gradlab.config.cli adds "did you mean").
`check_after_import(cfg)` runs once the heavy modules are imported: every `_target_` must import and
accept the keys given to it, which catches a mistyped key inside a YAML file, and `ckpt_path` must be a
readable checkpoint.
"""

import difflib
import fnmatch
import importlib.util
import inspect
from typing import Any, Callable, Iterator, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

from gradlab.errors import UserError

# The metric names every part of gradlab uses (checkpoint monitors, early stopping, sweeps, the HParams columns,
# sweep reports), and the prefixes of the instruments' tags (gradlab.observe), which can be monitored too.
METRICS = ("train/loss", "train/acc", "val/loss", "val/acc", "val/acc_best", "test/loss", "test/acc")
METRIC_PREFIXES = ("grad_norm/", "param_norm/", "update_ratio/", "act/", "grad_noise/", "curv/", "param_dist/", "optim/",
                   "grad_tests/")
# "auto" (gradlab.run.precision): bf16-mixed where the CPU or GPU computes bfloat16 natively, else 32-true.
PRECISIONS = ("64-true", "64", "32-true", "32", "16-mixed", "16", "bf16-mixed", "bf16", "16-true", "bf16-true",
              "transformer-engine", "transformer-engine-float16", "auto")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
# Targets that need a package of their own, beyond their module's (which Lightning has without them), and how to
# install it: `logger=wandb` without wandb fails here, in a second, instead of after the data is loaded.
NEEDS = {"lightning.pytorch.loggers.WandbLogger": ("wandb", "pip install wandb"),
         "lightning.pytorch.loggers.MLFlowLogger": ("mlflow", "pip install mlflow"),
         "gradlab.run.trackers.MLFlowLogger": ("mlflow", "pip install mlflow")}
# Hydra's own keys, which instantiate consumes.
NOT_ARGUMENTS = {"_target_", "_partial_", "_convert_", "_recursive_", "_args_"}


# ---- value checks: (holds?, what is allowed) ----------------------------------------------------------------
def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


Check = tuple[Callable[[Any], bool], str]
POSITIVE: Check = (lambda v: _num(v) and v > 0, "a number > 0")
NON_NEGATIVE: Check = (lambda v: _num(v) and v >= 0, "a number >= 0")
FRACTION: Check = (lambda v: _num(v) and 0 <= v < 1, "a number in [0, 1)")
OPEN_FRACTION: Check = (lambda v: _num(v) and 0 < v < 1, "a number in (0, 1)")
INT: Check = (_int, "an integer")
COUNT: Check = (lambda v: _int(v) and v >= 1, "an integer >= 1")
COUNT_OR_NULL: Check = (lambda v: v is None or (_int(v) and v >= 1), "an integer >= 1, or null")
NON_NEG_INT: Check = (lambda v: _int(v) and v >= 0, "an integer >= 0")
BOOL: Check = (lambda v: isinstance(v, bool), "true or false")
BOOL_OR_NULL: Check = (lambda v: v is None or isinstance(v, bool), "true, false or null")
SIZES: Check = (lambda v: COUNT[0](v) or (isinstance(v, list) and len(v) > 0 and all(COUNT[0](x) for x in v)),
                "an integer >= 1 (or a non-empty list of them)")
BATCHES: Check = (lambda v: v is None or (_int(v) and v >= 0) or (isinstance(v, float) and 0 <= v <= 1),
                  "an integer >= 0 (batches) or a fraction in [0, 1]")
METRIC: Check = (lambda v: v is None or v in METRICS or str(v).startswith(METRIC_PREFIXES),
                 f"one of {', '.join(METRICS)}, or an instrument's tag starting with {', '.join(METRIC_PREFIXES)}")


def _one_of(*choices: Any) -> Check:
    return (lambda v: v in choices, "one of " + ", ".join(map(str, choices)))


# First matching pattern wins; patterns are fnmatch globs over dotted key paths (`*` also matches dots).
RULES: list[tuple[str, Check]] = [
    ("seed", INT),
    ("train", BOOL), ("test", BOOL),
    ("optimized_metric", METRIC),
    ("ckpt_path", (lambda v: v is None or isinstance(v, str), "a checkpoint file, a run folder, last, or null")),
    # optimizer
    ("optimizer.lr", POSITIVE), ("optimizer.eps", POSITIVE),
    ("optimizer.weight_decay", NON_NEGATIVE),
    ("optimizer.momentum", FRACTION), ("optimizer.dampening", FRACTION),
    ("optimizer.rho", (lambda v: _num(v) and 0 <= v <= 1, "a number in [0, 1]")),
    ("optimizer.alpha", (lambda v: _num(v) and 0 <= v <= 1, "a number in [0, 1]")),
    ("optimizer.betas", (lambda v: isinstance(v, list) and len(v) == 2 and all(FRACTION[0](b) for b in v),
                         "two numbers in [0, 1), e.g. [0.9,0.999]")),
    ("optimizer.nesterov", BOOL),
    # scheduler
    ("scheduler_interval", _one_of("epoch", "step")),
    ("scheduler.gamma", POSITIVE), ("scheduler.max_lr", POSITIVE),
    ("scheduler.step_size", COUNT), ("scheduler.T_max", COUNT), ("scheduler.total_steps", COUNT),
    ("scheduler.eta_min", NON_NEGATIVE),
    ("scheduler.pct_start", OPEN_FRACTION),
    # data
    ("data.batch_size", COUNT),
    ("data.val_size", (lambda v: (_int(v) and v >= 1) or (isinstance(v, float) and 0 < v < 1),
                       "a count >= 1 or a fraction in (0, 1)")),
    ("data.num_workers", NON_NEG_INT),
    ("data.split_seed", INT),
    ("data.max_len", COUNT_OR_NULL),
    ("data.max_vocab_size", (lambda v: _int(v) and v >= 3, "an integer >= 3 (<pad>, <unk> and at least one word)")),
    ("data.min_freq", COUNT),
    ("data.bucket_batches", COUNT_OR_NULL),
    ("data.download", BOOL), ("data.pin_memory", BOOL_OR_NULL), ("data.allow_sample", BOOL),
    ("data.truncate", _one_of("head", "tail")),
    # model
    ("model.on_nonfinite_loss", _one_of("stop", "skip")),
    ("model.gradient_clip_val", (lambda v: v is None or (_num(v) and v > 0), "a number > 0, or null")),
    ("model.channels_last", BOOL), ("model.batch_norm", BOOL),
    ("model*.dropout*", FRACTION),
    *[(f"{group}*.{name}", SIZES) for group in ("model", "data") for name in (
        "num_classes", "hidden", "hidden_size", "hidden_sizes", "hidden_dim", "embed_dim", "num_layers",
        "vocab_size", "in_features", "in_channels", "input_dim")],
    # trainer
    ("trainer.max_epochs", (lambda v: v is None or (_int(v) and (v >= 1 or v == -1)),
                            "an integer >= 1 (-1: no limit)")),
    ("trainer.min_epochs", (lambda v: v is None or (_int(v) and v >= 0), "an integer >= 0, or null")),
    ("trainer.max_steps", (lambda v: _int(v) and (v >= 1 or v == -1), "an integer >= 1 (-1: no limit)")),
    ("trainer.accelerator", _one_of(*ACCELERATORS)),
    ("trainer.devices", (lambda v: v == "auto" or v == -1 or (_int(v) and v >= 1) or isinstance(v, (list, str)),
                         "an integer >= 1, -1 (all), auto, or a list of device ids")),
    ("trainer.num_nodes", COUNT),
    ("trainer.precision", (lambda v: str(v) in PRECISIONS, "one of " + ", ".join(PRECISIONS[::2]) + ", ...")),
    ("trainer.limit_*_batches", BATCHES), ("trainer.overfit_batches", BATCHES),
    ("trainer.fast_dev_run", (lambda v: isinstance(v, bool) or (_int(v) and v >= 0), "true, false or a batch count")),
    ("trainer.log_every_n_steps", COUNT_OR_NULL),
    ("trainer.check_val_every_n_epoch", COUNT_OR_NULL),
    ("trainer.accumulate_grad_batches", COUNT),
    ("trainer.gradient_clip_val", (lambda v: v is None or (_num(v) and v >= 0), "a number >= 0, or null")),
    ("trainer.num_sanity_val_steps", (lambda v: _int(v) and v >= -1, "an integer >= -1")),
    ("trainer.profiler", (lambda v: v is None or v in ("simple", "advanced", "pytorch", "xla") or isinstance(v, dict),
                          "simple, advanced, pytorch, or null")),
    # callbacks
    ("callbacks.*.monitor", METRIC),
    ("callbacks.*.mode", _one_of("min", "max")),
    ("callbacks.*.save_top_k", (lambda v: _int(v) and v >= -1, "an integer >= -1 (-1: keep all)")),
    ("callbacks.*.every_n_train_steps", (lambda v: v is None or (_int(v) and v >= 0), "an integer >= 0, or null")),
    ("callbacks.*.every_n_minutes", (lambda v: v is None or (_num(v) and v > 0), "a number > 0, or null")),
    # the instruments (gradlab.observe); log_every_n_steps: gradlab.observe.common.EVERY_N
    ("callbacks.*.log_every_n_steps", (lambda v: v is None or (_int(v) and v >= 0),
                                       "an integer >= 0 (0: off), or null (follow trainer.log_every_n_steps)")),
    ("callbacks.*.histogram_every_n_steps", NON_NEG_INT),
    ("callbacks.*.trace_every_n_steps", COUNT_OR_NULL),  # curvature: null, with every sharpness reading
    ("callbacks.*.lanczos_iters", COUNT),
    ("callbacks.*.trace_probes", NON_NEG_INT),
    ("callbacks.*.probe_size", COUNT),
    ("callbacks.*.seed", NON_NEG_INT),
    ("callbacks.grad_norm.patience", COUNT),  # logging steps in a bad state before a warning: at least one
    ("callbacks.*.patience", NON_NEG_INT),
    ("callbacks.*.on_nonfinite", _one_of("stop", "warn")),
    ("callbacks.*.smoothing", FRACTION),
    ("callbacks.*.conv_sample", (lambda v: v == "auto" or (_num(v) and 0 < v <= 1), "auto or a fraction in (0, 1]")),
    ("callbacks.*.estimate_every", (lambda v: v == "auto" or COUNT[0](v), "auto or an integer >= 1")),
    ("callbacks.*.when", _one_of("auto", "always", "never")),
    ("callbacks.*.window_size", (lambda v: _int(v) and v >= 2, "an integer >= 2 (batches in the rolling average)")),
    ("logger.*.flush_every_s", NON_NEGATIVE),
    # +tune=lr_find
    ("resume.force", BOOL),  # +resume.force=true: go on with a finished run under changed settings
    ("tune.min_lr", POSITIVE), ("tune.max_lr", POSITIVE), ("tune.num_training", COUNT), ("tune.apply", BOOL),
    ("tune.early_stop_threshold", (lambda v: v is None or (_num(v) and v > 1), "a number > 1, or null")),
    # eval.py / predict.py
    ("batch_size", COUNT_OR_NULL),
    ("split", _one_of("test", "val")),
    ("accelerator", (lambda v: v is None or v in ACCELERATORS,
                     "null (the run's) or one of " + ", ".join(ACCELERATORS))),
    ("precision", (lambda v: v is None or str(v) in PRECISIONS,
                   "null (the run's), auto, or a Lightning precision such as 32-true")),
    ("json", BOOL),
    ("invert", (lambda v: v in (True, False, "auto"), "auto, true or false")),
    ("top_k", COUNT),
]

def require(key: str, value: Any) -> None:
    """UserError unless `value` passes the rule for `key` in RULES: constructors use the same rule as the check.

    The rule for each key is stated once, in RULES; `check` applies it to a composed config before the heavy
    imports, and a class built from Python (no config) calls `require` on its own arguments.
    """
    for pattern, (holds, allowed) in RULES:
        if fnmatch.fnmatchcase(key, pattern):
            if not holds(value):
                raise UserError(f"{key}={_show(value)}: must be {allowed}")
            return


def val_count(size: int | float, n: int, what: str) -> int:
    """How many of `n` training items `data.val_size` holds out: a count, or a fraction of n (RULES checks its type)."""
    count = round(size * n) if isinstance(size, float) and size < 1 else int(size)
    if not 0 < count < n:
        raise UserError(f"data.val_size={size} leaves no training or no validation {what} from {n}; use a count in "
                        f"1..{n - 1} or a fraction in (0, 1).")
    return count


REQUIRED = {"eval": ("ckpt_path",), "predict": ("ckpt_path", "input")}
USAGE = {"eval": "python eval.py ckpt_path=<file.ckpt or run folder or last>",
         "predict": "python predict.py ckpt_path=<file.ckpt, run folder or last> input=<image, folder, .txt or 'text'>"}


# ---- before the heavy imports -------------------------------------------------------------------------------
def check(cfg: DictConfig) -> None:
    """UserError listing every bad value of `cfg` (one line each: key, value, what is allowed)."""
    task = str(cfg.get("task_name") or "train")
    problems: list[str] = []
    leaves = list(_leaves(cfg, problems))
    problems += _broken_rules(leaves, RULES)
    problems += _cross_checks(cfg)
    for key in REQUIRED.get(task, ()):
        if OmegaConf.is_missing(cfg, key) or cfg.get(key) in (None, ""):
            problems.append(f"{key} is required: {USAGE[task]}")
    problems += _target_modules(leaves)
    if problems:
        unique = list(dict.fromkeys(problems))
        raise UserError("invalid config:\n  " + "\n  ".join(unique) +
                        f"\n(`python {task}.py --cfg job` prints the composed config; defaults live in conf/.)")


def _broken_rules(leaves: list[tuple[str, Any]], rules: list[tuple[str, Check]]) -> list[str]:
    problems = []
    for path, value in leaves:
        for pattern, (holds, allowed) in rules:
            if fnmatch.fnmatchcase(path, pattern):
                if not holds(value):
                    problems.append(f"{path}={_show(value)}: must be {allowed}")
                break
    return problems


# hydra/launcher=slurm: what sbatch would reject, or a job could never use (checked in the launching process).
LAUNCHER_RULES: list[tuple[str, Check]] = [
    ("hydra.launcher.nodes", COUNT),
    ("hydra.launcher.gpus_per_node", (lambda v: v is None or (_int(v) and v >= 0), "an integer >= 0 (0: CPUs only)")),
    ("hydra.launcher.tasks_per_node", COUNT),
    ("hydra.launcher.cpus_per_task", COUNT_OR_NULL),
    ("hydra.launcher.mem_gb", (lambda v: v is None or (_num(v) and v > 0), "a number > 0 (GB per node), or null")),
    ("hydra.launcher.timeout_min", COUNT),
    ("hydra.launcher.signal_delay_s", NON_NEG_INT),
    ("hydra.launcher.max_num_timeout", NON_NEG_INT),
    ("hydra.launcher.setup", (lambda v: v is None or (isinstance(v, list) and all(isinstance(x, str) for x in v)),
                              'a list of shell lines, e.g. ["module load cuda"], or null')),
]


def check_launcher(params: dict[str, Any]) -> None:
    """UserError listing every bad hydra.launcher value (`params`: the resolved launcher config), before the sweep
    submits anything."""
    leaves = [(f"hydra.launcher.{key}", value) for key, value in params.items()]
    problems = _broken_rules(leaves, LAUNCHER_RULES)
    problems += [f"{path}={value!r}: holds a control character (a newline would end the #SBATCH block and run "
                 "what follows as a shell line); give a single plain line"
                 for path, value in _strings(params, "hydra.launcher") if any(ord(c) < 32 or ord(c) == 127 for c in value)]
    limit_min, delay_s = params.get("timeout_min"), params.get("signal_delay_s")
    if COUNT[0](limit_min) and NON_NEG_INT[0](delay_s) and delay_s >= limit_min * 60:
        problems.append(f"hydra.launcher.signal_delay_s={delay_s} is not less than hydra.launcher.timeout_min="
                        f"{limit_min} minutes: SLURM would warn the job (SIGUSR1) before it starts")
    if problems:
        raise UserError("invalid launcher config (nothing was submitted):\n  " + "\n  ".join(problems) +
                        "\n(conf/hydra/launcher/slurm.yaml documents each key; set them as hydra.launcher.<key>=...)")


def _strings(node: Any, path: str) -> Iterator[tuple[str, str]]:
    """(dotted path, value) of every string in a nested dict/list, keys included (sbatch writes `--key=value`)."""
    if isinstance(node, str):
        yield path, node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(str(key), f"{path} (a key)")
            yield from _strings(value, f"{path}.{key}")
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from _strings(value, f"{path}[{i}]")


def _leaves(node: DictConfig, problems: list[str], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted path, resolved value) of every leaf; lists count as leaves. Bad interpolations become problems."""
    for key in node.keys():
        path = f"{prefix}{key}"
        if OmegaConf.is_missing(node, key):
            continue  # required values are reported by `check`
        try:
            value = node[key]
            if isinstance(value, ListConfig):
                value = OmegaConf.to_container(value, resolve=True)
        except (InterpolationResolutionError, MissingMandatoryValue) as err:
            problems.append(f"{path}: {str(err).splitlines()[0]}")
            continue
        if isinstance(value, DictConfig):
            yield from _leaves(value, problems, path + ".")
        else:
            yield path, value


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) and (not value or " " in value) else str(value)


def _cross_checks(cfg: DictConfig) -> list[str]:
    problems = []
    trainer = cfg.get("trainer") or {}
    lo, hi = _safe(trainer, "min_epochs"), _safe(trainer, "max_epochs")
    if _int(lo) and _int(hi) and hi >= 1 and lo > hi:
        problems.append(f"trainer.min_epochs={lo} is more than trainer.max_epochs={hi}")
    tune = cfg.get("tune") or {}
    lo, hi = _safe(tune, "min_lr"), _safe(tune, "max_lr")
    if _num(lo) and _num(hi) and lo >= hi:
        problems.append(f"tune.min_lr={lo} must be below tune.max_lr={hi}")
    model = cfg.get("model") or {}
    net_classes, classes = _safe(model.get("net") or {}, "num_classes"), _safe(model, "num_classes")
    if _int(net_classes) and _int(classes) and net_classes != classes:
        problems.append(f"model.net.num_classes={net_classes} differs from model.num_classes={classes}: the network's "
                        "output must have one unit per class (leave both at ${data.num_classes})")
    net_target, data_target = str(_safe(model.get("net") or {}, "_target_")), str(_safe(cfg.get("data") or {}, "_target_"))
    if net_target.endswith("SentimentRNN") != data_target.endswith("IMDBDataModule") and data_target != "None":
        problems.append("model=rnn reads token ids from data=imdb, and data=imdb feeds only model=rnn: choose them "
                        f"together (model.net._target_={net_target}, data._target_={data_target}); the "
                        "experiment=imdb_gru recipe does")
    return problems


def _safe(node: Any, key: str) -> Any:
    try:
        return node.get(key)
    except Exception:  # a bad interpolation is reported by the leaf walk
        return None


def _target_modules(leaves: list[tuple[str, Any]]) -> list[str]:
    """Every `_target_`'s top-level package must be installed; gradlab's own modules must exist (cheap checks)."""
    problems = []
    for path, value in leaves:
        if not path.endswith("._target_") or not isinstance(value, str):
            continue
        module = value.rsplit(".", 1)[0]
        # Parents of gradlab modules import nothing heavy; for others, finding a submodule would import torch.
        name = module if module.startswith("gradlab.") else module.split(".")[0]
        if not _installed(name):
            problems.append(f"{path}={value}: module {name} not found")
        elif value in NEEDS and not _installed(NEEDS[value][0]):
            package, install = NEEDS[value]
            problems.append(f"{path}={value} needs the {package} package, which is not installed: {install} "
                            "(or pip install -r requirements.txt)")
    return problems


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ModuleNotFoundError, ValueError):
        return False


# ---- after the heavy imports --------------------------------------------------------------------------------
def check_after_import(cfg: DictConfig) -> None:
    """The `_target_` checks, and that `ckpt_path` is a readable checkpoint (before Lightning tries it)."""
    check_targets(cfg)
    if cfg.get("ckpt_path"):
        from gradlab.checkpoints.load import load

        load(cfg.ckpt_path)


def check_targets(cfg: DictConfig) -> None:
    """UserError when a `_target_` does not import or is given a key it does not take (with a suggestion)."""
    from hydra.utils import get_object

    problems = []
    container = OmegaConf.to_container(cfg, resolve=False)
    for path, node in _target_nodes(container, ""):
        try:
            obj = get_object(node["_target_"])
        except Exception as err:
            problems.append(f"{path}._target_={node['_target_']}: cannot be imported ({str(err).splitlines()[0]})")
            continue
        try:
            params = inspect.signature(obj).parameters
        except (TypeError, ValueError):
            continue
        if any(p.kind == p.VAR_KEYWORD for p in params.values()):
            continue
        for key in node:
            if key in NOT_ARGUMENTS or key in params:
                continue
            close = difflib.get_close_matches(key, list(params), n=1)
            hint = f"did you mean {path}.{close[0]}?" if close else f"it takes {', '.join(list(params)[:12])}"
            problems.append(f"{path}.{key}: not an argument of {node['_target_']}; {hint}")
    if problems:
        raise UserError("invalid config:\n  " + "\n  ".join(problems))


def _target_nodes(node: Any, path: str) -> Iterator[tuple[str, dict]]:
    if isinstance(node, dict):
        if isinstance(node.get("_target_"), str):
            yield path, node
        for key, value in node.items():
            yield from _target_nodes(value, f"{path}.{key}" if path else str(key))


def check_ranks_fit_launcher(params: dict[str, Any], trainer: dict[str, Any], overrides: Sequence[str] = ()) -> None:
    """UserError where a job's trainer expects another shape than the SLURM allocation gives it, before submitting.

    `params`: the resolved launcher config; `trainer`: the job's trainer config *unresolved* (on the submitting
    node, an interpolation of SLURM_NTASKS_PER_NODE / SLURM_NNODES follows the allocation, as trainer=ddp and
    trainer=ddp_cpu do; there is nothing to check). srun starts nodes x tasks_per_node ranks; Lightning expects
    devices x num_nodes, and stops (or, with devices=1, num_nodes=1, trains each rank alone) where they differ.
    """
    problems = []
    for key, launcher_key in (("devices", "tasks_per_node"), ("num_nodes", "nodes")):
        value, slurm = trainer.get(key), params.get(launcher_key)
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool) and isinstance(slurm, int) and value != slurm:
            problems.append(f"trainer.{key}={value} but hydra.launcher.{launcher_key}={slurm}")
    if problems:
        job = f" (job {' '.join(overrides)})" if overrides else ""
        raise UserError(
            f"the trainer does not fit the SLURM allocation{job}: {'; '.join(problems)}. srun starts "
            f"hydra.launcher.nodes x tasks_per_node = {params.get('nodes')} x {params.get('tasks_per_node')} ranks, "
            "one per task, and Lightning must expect the same trainer.num_nodes x trainer.devices. Set them equal, "
            "or use trainer=ddp (GPUs) / trainer=ddp_cpu (gloo), which take both from the allocation. "
            "Nothing was submitted.")
