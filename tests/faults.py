"""Test-only callbacks that inject the faults the reliability tests need, at a chosen optimizer step."""

import errno
import math
import os
import signal
import sys

from lightning.pytorch.callbacks import Callback


class SignalAtStep(Callback):
    """Sends this process `signal_name` after optimizer step `step`, as a cluster scheduler would."""

    def __init__(self, step: int, signal_name: str = "SIGKILL"):
        self.step, self.signum = step, getattr(signal, signal_name)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


class NaNInputAtSteps(Callback):
    """Fills the inputs of the batches trained at the given steps with NaN, so their loss is NaN."""

    def __init__(self, steps: list[int]):
        self.steps = set(steps)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step in self.steps:
            batch[0].fill_(math.nan)


# ---- checkpoint writes ----------------------------------------------------------------------------------------
# gradlab.checkpoints.atomic_io writes with the built-in open(); a module global of that name shadows it there, so these
# faults hit the real write path (the temp file, its bytes, the rename) and nothing else.
def _patch_checkpoint_open(on_write):
    import builtins

    import gradlab.checkpoints.atomic_io as checkpoint_io

    class FaultyFile:
        def __init__(self, f, number):
            self.f, self.number = f, number

        def write(self, data):
            return on_write(self.f, data, self.number)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    count = [0]

    def faulty_open(path, mode="r", *args, **kwargs):
        f = builtins.open(path, mode, *args, **kwargs)
        if "w" not in mode:
            return f
        count[0] += 1
        return FaultyFile(f, count[0])

    checkpoint_io.open = faulty_open


class FailingDisk(Callback):
    """From checkpoint save number `at_save` (1 = this process's first) on, the write fails with `error`
    (ENOSPC: disk full, EIO: a failing disk) after half of the bytes reached the temp file."""

    def __init__(self, at_save: int = 1, error: str = "ENOSPC"):
        self.at_save, self.errno = at_save, getattr(errno, error)

    def setup(self, trainer, pl_module, stage) -> None:
        def on_write(f, data, number):
            if number < self.at_save:
                return f.write(data)
            f.write(bytes(memoryview(data)[: len(data) // 2]))
            raise OSError(self.errno, os.strerror(self.errno))

        _patch_checkpoint_open(on_write)


class KillAt(Callback):
    """SIGKILLs this process at one moment of the run, as `kill -9`, the OOM killer or a lost node would:

    batch: in the middle of the batch that would become optimizer step `at` (after backward, before the update);
    val:   at validation batch `batch` of epoch `at` (not the sanity check);
    test:  at test batch `batch`;
    ckpt:  during this process's checkpoint save number `at`, once `fraction` of its bytes are on disk
           (1.0: all written, not yet renamed into place).
    """

    def __init__(self, kind: str, at: int = 1, batch: int = 0, fraction: float = 0.5):
        self.kind, self.at, self.batch, self.fraction = kind, at, batch, fraction

    @staticmethod
    def _die():
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    def setup(self, trainer, pl_module, stage) -> None:
        if self.kind != "ckpt":
            return

        def on_write(f, data, number):
            if number != self.at:
                return f.write(data)
            f.write(bytes(memoryview(data)[: int(len(data) * self.fraction)]))
            f.flush()
            os.fsync(f.fileno())
            self._die()

        _patch_checkpoint_open(on_write)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.kind == "batch" and trainer.global_step + 1 == self.at:
            self._die()

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if self.kind == "val" and not trainer.sanity_checking and trainer.current_epoch == self.at \
                and batch_idx == self.batch:
            self._die()

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if self.kind == "test" and batch_idx == self.batch:
            self._die()


class SignalInTest(Callback):
    """Sends this process `signal_name` at test batch `batch`, as Ctrl-C in the test stage does."""

    def __init__(self, batch: int = 0, signal_name: str = "SIGINT"):
        self.batch, self.signum = batch, getattr(signal, signal_name)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == self.batch:
            os.kill(os.getpid(), self.signum)


class HoldAtStep(Callback):
    """When $GRADLAB_TEST_HOLD is `<job folder name>:<step>:<marker file>` and this run's folder has that name:
    after optimizer step `step`, writes the marker file and sleeps, so that a test can kill the whole process
    group from outside at a known point of a sweep's job. Without the variable it does nothing: the command, and
    so the sweep's overrides, are the same in the run that is killed and the one that resumes it."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import time

        job, _, rest = os.environ.get("GRADLAB_TEST_HOLD", "").partition(":")
        step, _, marker = rest.partition(":")
        if job and os.path.basename(self.output_dir) == job and trainer.global_step == int(step):
            with open(marker, "w") as f:
                f.write(str(os.getpid()))
            time.sleep(600)
