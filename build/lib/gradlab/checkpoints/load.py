"""Reading checkpoints safely and rebuilding their model from the run config stored inside.

A checkpoint is read with `torch.load(weights_only=True)`: tensors and plain data only, so a file can
never run code. The model is rebuilt from `checkpoint["gradlab_config"]` (the resolved run config that
train.py stores), and only classes under `gradlab.` and `torch.nn.` may be named there.
"""

import os
import pickle
from typing import Any, Optional

import torch
from hydra.utils import instantiate

from gradlab.errors import UserError

ALLOWED_TARGETS = ("gradlab.", "torch.nn.")


def load(path: str) -> dict[str, Any]:
    """The checkpoint at `path` as a dict, or a UserError that says what is wrong with the file."""
    if not os.path.isfile(path):
        raise UserError(f"Checkpoint {path} does not exist. Runs keep theirs in logs/train/runs/<run>/checkpoints/ "
                        "(last.ckpt, and the best by val/acc as epoch_*.ckpt).")
    try:
        # mmap: tensors are read when used, so a check of a large file costs little memory.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[-1][:200]
        raise UserError(f"Refusing to load {path}: it holds Python objects other than tensors and plain data, "
                        f"and loading them could run code ({first}). Only checkpoints written by train.py load "
                        "safely.") from None
    except Exception as err:  # a zip reader error, EOFError, KeyError: a file cut short or not a checkpoint
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise UserError(f"{path} is not a readable checkpoint ({first}). It may be cut short by a crash or a "
                        "copy, or not be a checkpoint at all; use another one of the run, e.g. "
                        "checkpoints/last.ckpt or checkpoints/epoch_*.ckpt.") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise UserError(f"{path} is a torch file but not a Lightning checkpoint (no state_dict in it).")
    if not isinstance(checkpoint.get("gradlab_config"), dict):
        raise UserError(f"{path} has no gradlab run config inside, so its model cannot be rebuilt: "
                        "use a checkpoint written by train.py.")
    return checkpoint


def check_targets(config: Any, where: str) -> None:
    """UserError unless every `_target_` in `config` names a gradlab or torch.nn class."""
    if isinstance(config, dict):
        target = config.get("_target_")
        if target is not None and not str(target).startswith(ALLOWED_TARGETS):
            raise UserError(f"The checkpoint's config names {where}._target_={target!r}; only classes under "
                            f"{' or '.join(ALLOWED_TARGETS)} are built from a checkpoint.")
        for key, value in config.items():
            check_targets(value, f"{where}.{key}")
    elif isinstance(config, list):
        for i, value in enumerate(config):
            check_targets(value, f"{where}[{i}]")


def build_module(checkpoint: dict[str, Any], path: str):
    """The checkpoint's ClassifierModule with its weights, ready for evaluation (no optimizer)."""
    model_cfg = checkpoint["gradlab_config"].get("model")
    if not isinstance(model_cfg, dict):
        raise UserError(f"{path} has no model section in its run config.")
    check_targets(model_cfg, "model")
    module = instantiate(model_cfg, _convert_="object")
    check_state_dict(module, checkpoint["state_dict"], path, checkpoint["gradlab_config"], None)
    module.load_state_dict(checkpoint["state_dict"])
    return module.eval()


def check_state_dict(module: torch.nn.Module, state: dict[str, torch.Tensor], path: Optional[str],
                     saved_config: Optional[dict], current_config: Optional[dict]) -> None:
    """UserError naming the first mismatches when `state` does not fit `module` (another model, other sizes)."""
    own = module.state_dict()
    problems = [f"{k}: {tuple(state[k].shape)} in the checkpoint, {tuple(v.shape)} here"
                for k, v in own.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    problems += [f"{k}: missing from the checkpoint" for k in own if k not in state]
    problems += [f"{k}: in the checkpoint, not in this model" for k in state if k not in own]
    if not problems:
        return
    shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
    saved_net = ((saved_config or {}).get("model") or {}).get("net") or {}
    message = f"Checkpoint {path or ''} does not fit this model ({shown})."
    if saved_net.get("_target_"):
        message += f" It was trained with model.net._target_={saved_net['_target_']}"
        if current_config is not None:
            diffs = _differences(saved_config.get("model") or {}, current_config.get("model") or {}, "model")
            if diffs:
                message += "; settings that differ from this run: " + ", ".join(diffs[:6])
        message += "."
    raise UserError(message + " Use a checkpoint of the same model, or the model settings it was trained with.")


def _differences(saved: Any, current: Any, prefix: str) -> list[str]:
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(saved) | set(current)):
            out += _differences(saved.get(key), current.get(key), f"{prefix}.{key}")
        return out
    return [] if saved == current else [f"{prefix}={saved!r} in the checkpoint vs {current!r} now"]
