"""What every entry point shares: user errors become one paragraph and exit code 2."""

import difflib
import os
import sys
from contextlib import contextmanager
from typing import Iterator, Optional

from hydra.errors import CompactHydraException
from omegaconf import DictConfig, OmegaConf

from gradlab.errors import EXIT_USER_ERROR, UserError


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


@contextmanager
def checked(cfg: DictConfig) -> Iterator[None]:
    """Check `cfg` before the block's heavy imports (Lightning, torch), so that a bad value costs a second; a
    UserError anywhere in the block becomes one paragraph and exit code 2. The entry points read:

        with checked(cfg):
            from gradlab.run.train import run
            return run(cfg)
    """
    from gradlab.checkpoints import run_dirs
    from gradlab.config import rules

    try:
        try:
            rules.check(cfg)
            run_dirs.resolve_checkpoint(cfg)
            yield
        except Exception as err:
            # Hydra's instantiate wraps a constructor's UserError (e.g. data=toy with a wrong input_dim).
            raise _user_error_in(err) or err
    except UserError as err:
        if _in_multirun():
            # One job's bad value must not cost a sweep its other jobs: Hydra records this one as failed
            # (conf/hydra/default.yaml leaves its metrics.json), runs the rest and re-raises at the end,
            # where a JobError is printed as its message alone, without a traceback (exit code 1).
            print(f"error: {err}", file=sys.stderr)
            raise JobError(err) from err
        fail(str(err))


def after_import(cfg: DictConfig) -> None:
    """The first line of every `run(cfg)`: the checks that need the heavy imports (each `_target_` imports and
    takes its keys; `ckpt_path` is a readable checkpoint), and Lightning's console tidied once it is imported."""
    from gradlab.config import rules
    from gradlab.run.console import tidy_lightning_logging

    tidy_lightning_logging()
    rules.check_after_import(cfg)


class JobError(CompactHydraException):
    """A UserError in one job of a multirun, as Hydra reports it once every job has run."""

    def __init__(self, err: UserError):
        super().__init__(f"error: {err}\n(the other jobs of the sweep ran; this job's metrics.json records the error)")

    def __reduce__(self):
        # submitit brings a SLURM job's exception back pickled; rebuilt from `err` again, the message would
        # say "error: error: ..." and its last line twice.
        return CompactHydraException.__new__, (JobError,), {"args": self.args}


def _user_error_in(err: BaseException) -> Optional[UserError]:
    """The UserError that caused `err`, if any (following `raise ... from` chains)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, UserError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def check_overrides(script: str, config_name: str, args: Optional[list[str]] = None) -> None:
    """Compose the config once before Hydra does, so that a mistyped key or group option fails with one line
    and a suggestion instead of Hydra's report. Runs with flags (`-m`, `--cfg`, ...) are left to Hydra."""
    args = sys.argv[1:] if args is None else args
    if not args or any(a.startswith("-") for a in args):
        return
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException, HydraException, MissingConfigException

    conf = os.path.join(os.path.dirname(os.path.abspath(script)), "conf")
    remaining, problems, mistyped, composed = list(args), [], [], None
    for _ in range(len(args) + 1):  # drop each bad override in turn, to report all of them at once
        try:
            with initialize_config_dir(config_dir=conf, version_base="1.3"):
                composed = compose(config_name, overrides=remaining)
            break
        except MissingConfigException as err:
            group, _, option = (err.missing_cfg_file or "").rpartition("/")
            problems.append(f"{group}={option}: no such option in conf/{group}/; "
                            f"choose one of {', '.join(err.options or [])}.")
            index = _find(remaining, group)
        except ConfigCompositionException as err:
            text = str(err)
            key = text.split("'")[1] if text.startswith("Could not override '") else None
            index = _find(remaining, key) if key else None
            if index is None:
                problems.append(" ".join(text.split()))
            else:
                mistyped.append(key)  # explained below, once the rest composes
        except HydraException as err:  # e.g. an override that does not parse
            problems.append(f"{' '.join(remaining)}: {str(err).splitlines()[0]}")
            index = None
        if index is None:
            break
        remaining.pop(index)
    keys = _all_keys(composed) if composed is not None else []
    for key in mistyped:
        group, _, leaf = key.rpartition(".")
        if leaf == "enabled" and group.split(".")[0] in ("callbacks", "logger"):
            problems.append(f"{key}: there is no `enabled` switch; {group}=null switches it off, and an optional "
                            "callback is added with 'callbacks=[default,<name>]' (see conf/callbacks/).")
            continue
        close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}?" if close else "`--cfg job` lists the keys there are."
        problems.append(f"{key} is not a config key; {hint} (To add a new key on purpose: +{key}=...)")
    if problems:
        fail(problems[0] if len(problems) == 1 else "bad overrides:\n  " + "\n  ".join(problems))


def _find(overrides: list[str], key: str) -> Optional[int]:
    for i, override in enumerate(overrides):
        if override.split("=", 1)[0].lstrip("+~") == key:
            return i
    return None


def _all_keys(cfg: DictConfig) -> list[str]:
    out = []

    def walk(node, prefix):
        for key, value in node.items():
            out.append(prefix + str(key))
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")

    walk(OmegaConf.to_container(cfg, resolve=False), "")
    return out
