"""Checkpoint writes that never leave a torn file, and a disk error that says what it kept.

    python train.py                    # conf/trainer/default.yaml: plugins: [gradlab.checkpoints.atomic_io.AtomicCheckpointIO]

Lightning 2.6 (TorchCheckpointIO -> lightning.fabric.utilities.cloud_io._atomic_save) writes through an fsspec
transaction: the bytes go to a temp file made by tempfile.mkstemp() in $TMPDIR, then shutil.move() puts it in
place. When $TMPDIR is another filesystem than the run folder (a tmpfs /tmp; node-local /tmp with logs on NFS),
that move is a copy into the destination itself, so a kill during the copy leaves a torn last.ckpt (and a whole
checkpoint left in /tmp); nothing is fsynced. Here the temp file sits beside the target, is fsynced, and
os.replace() swaps it in: atomic on POSIX filesystems, NFS included. A reader sees the old file or the new one.

Reading goes through here too (resuming with ckpt_path, the test stage's best checkpoint, a SLURM requeue's
hpc_ckpt): always `weights_only=True`, whatever the caller asks, so a checkpoint never unpickles code. The
file paths that Lightning's ModelCheckpoint keeps in its state (best_model_path, best_k_models, ...) are read as
file names in the checkpoint's own folder (or its checkpoints/ below, for an hpc_ckpt): a crafted checkpoint
cannot make the run test, or delete, a file elsewhere, and a run folder moved as a whole still finds its own best
checkpoint.
"""

import errno
import io
import os
import pickle
from typing import Any, Optional

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from gradlab.errors import UserError


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes `<path>.tmp`, fsyncs it, renames it to `<path>`; remote paths (`s3://...`) go Lightning's way."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        path = str(path)
        if "://" in path or storage_options is not None:
            return super().save_checkpoint(checkpoint, path, storage_options)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)  # serialized first: a bad object fails before any byte reaches the disk
        folder = os.path.dirname(path) or "."
        tmp = path + ".tmp"  # one writer per checkpoint name (rank 0): a leftover from a kill is simply overwritten
        try:
            os.makedirs(folder, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(buffer.getbuffer())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            _fsync_dir(folder)  # the rename itself survives a power cut
        except OSError as err:
            _remove(tmp)
            raise UserError(save_failed_message(path, err)) from None

    def load_checkpoint(self, path, map_location: Optional[Any] = None, weights_only: Optional[bool] = None
                        ) -> dict[str, Any]:
        # weights_only is ignored on purpose: no path through Lightning may unpickle a checkpoint.
        try:
            if map_location is None:
                checkpoint = super().load_checkpoint(path, weights_only=True)
            else:
                checkpoint = super().load_checkpoint(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            first = str(err).strip().splitlines()[-1][:200]
            raise UserError(f"Refusing to load {path}: it holds Python objects other than tensors and plain data, "
                            f"and loading them could run code ({first}). Only checkpoints written by train.py "
                            "load.") from None
        if "://" not in str(path):
            keep_paths_inside(checkpoint, os.path.dirname(os.path.abspath(str(path))))
        return checkpoint

    def remove_checkpoint(self, path) -> None:
        super().remove_checkpoint(path)
        _remove(str(path) + ".tmp")


# ModelCheckpoint's state entries that hold file paths (Lightning 2.6, ModelCheckpoint.state_dict).
PATH_KEYS = ("best_model_path", "kth_best_model_path", "last_model_path")


def keep_paths_inside(checkpoint: dict[str, Any], folder: str) -> None:
    """Point every checkpoint path in the callbacks' states at a file directly in `folder` (or in its checkpoints/:
    Lightning's hpc_ckpt_<n>.ckpt of a SLURM requeue lies in the run folder, the ModelCheckpoint files one below): a
    path elsewhere becomes the file of the same name there if there is one (a run folder moved or copied), else it
    is dropped."""
    def inside(p: Any) -> str:
        if not isinstance(p, str) or not p:
            return ""
        for where in (folder, os.path.join(folder, "checkpoints")):
            here = os.path.join(where, os.path.basename(p))
            if os.path.isfile(here):
                return here
        return ""

    for state in (checkpoint.get("callbacks") or {}).values():
        if not isinstance(state, dict):
            continue
        for key in PATH_KEYS:
            if isinstance(state.get(key), str) and state[key]:
                state[key] = inside(state[key])
        if isinstance(state.get("best_k_models"), dict):
            kept = {inside(p): v for p, v in state["best_k_models"].items()}
            state["best_k_models"] = {p: v for p, v in kept.items() if p}


def save_failed_message(path: str, err: OSError) -> str:
    """One paragraph: which file, which error, what is kept, how to go on."""
    name = errno.errorcode.get(err.errno, "") if err.errno else ""
    reason = f"{err.strerror or err}" + (f" ({name})" if name else "")
    folder = os.path.dirname(path) or "."
    try:
        kept = sorted(f for f in os.listdir(folder) if f.endswith(".ckpt"))
    except OSError:
        kept = []
    held = (f"The checkpoints already in {folder} are unchanged: {', '.join(kept)}."
            if kept else "No earlier checkpoint of this run exists.")
    resume = " Free space (or fix the disk), then continue with the same command plus ckpt_path=last." \
        if "last.ckpt" in kept else ""
    return f"Could not write checkpoint {path}: {reason}. Training stopped here; {path} is as it was before this save. {held}{resume}"


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the rename is still atomic
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass

