"""Checkpoint writes that never leave a torn file, and a disk error that says what it kept.

    python train.py                    # conf/trainer/default.yaml: plugins: [gradlab.checkpoints.atomic_io.AtomicCheckpointIO]

Lightning 2.6 (TorchCheckpointIO -> lightning.fabric.utilities.cloud_io._atomic_save) writes through an fsspec
transaction: the bytes go to a temp file made by tempfile.mkstemp() in $TMPDIR, then shutil.move() puts it in
place. When $TMPDIR is another filesystem than the run folder (a tmpfs /tmp; node-local /tmp with logs on NFS),
that move is a copy into the destination itself, so a kill during the copy leaves a torn last.ckpt (and a whole
checkpoint left in /tmp); nothing is fsynced. Here the temp file sits beside the target, is fsynced, and
os.replace() swaps it in: atomic on POSIX filesystems, NFS included. A reader sees the old file or the new one.
"""

import errno
import io
import os
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

    def remove_checkpoint(self, path) -> None:
        super().remove_checkpoint(path)
        _remove(str(path) + ".tmp")


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
