"""What every instrument shares: the interval convention, tag names, dense gradients, and the guard that keeps an
instrument's failure out of the host's training run.

The interval convention (`log_every_n_steps` of every instrument, the same everywhere):
    null  follow `trainer.log_every_n_steps`
    0     off: no hook is attached, nothing is logged
    N     every N optimizer steps (steps 0, N, 2N, ...)

Never break a run: every Lightning hook of an `Instrument` and every module or tensor hook it attaches through
`Instrument.guarded` runs inside a guard. An exception there is caught, reported once (console, and health.json
through the health report) with the hook, the layer and a hint; the instrument switches itself off (removes
its hooks) and training goes on. Instruments only read the host's tensors, so the weights are those of a run
without the instrument (tests/test_guard.py checks it bit for bit).
"""

import traceback
from typing import Any, Callable, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from rich.console import Console

EVERY_N = "null: follow trainer.log_every_n_steps; 0: off; N: every N optimizer steps"


def interval(every_n: Optional[int], trainer: pl.Trainer) -> int:
    """The instrument's interval in optimizer steps (0: off), per the convention above."""
    return trainer.log_every_n_steps if every_n is None else every_n


def due(every: int, step: int) -> bool:
    return every > 0 and step % every == 0


def tag(name: str, strip_prefix: Optional[str]) -> str:
    """A parameter or module name as tags show it: `net.conv1.weight` -> `conv1.weight` with strip_prefix `net.`."""
    return name[len(strip_prefix):] if strip_prefix and name.startswith(strip_prefix) else name


def dense(grad: torch.Tensor) -> torch.Tensor:
    """Sparse gradients (nn.Embedding(sparse=True)) have no foreach kernel; their stored values carry the norm."""
    return grad.coalesce().values() if grad.is_sparse else grad


# ---- the guard ------------------------------------------------------------------------------------------------
# Lightning's callback hooks (not state_dict/load_state_dict: a checkpoint must fail loudly, not lose state).
HOOKS = tuple(sorted(n for n in vars(Callback) if n.startswith("on_") or n in ("setup", "teardown")))


def _hint(exc: BaseException, layer: Optional[str]) -> str:
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc):
        return "log less often (log_every_n_steps) or leave this instrument out"
    if layer and isinstance(exc, (AttributeError, TypeError, IndexError, ValueError, RuntimeError)):
        return (f"layer {layer} takes or returns something this instrument does not read (a tuple, a dict, a "
                "tensor of another layout); the other instruments go on")
    return "leave the instrument out (callbacks.<name>=null, or its Observatory argument False) to silence this"


def _guard_hook(fn: Callable) -> Callable:
    def hook(self: "Instrument", trainer: pl.Trainer, *args: Any, **kwargs: Any) -> Any:
        fn = hook.__wrapped__  # looked up per call: a test can plant a failure in the real hook
        if self.failure is not None:
            try:
                self.switch_off()  # again: a failure inside a hook may leave the cleanup to the next hook
            except Exception:  # noqa: BLE001
                pass
            return None
        try:
            return fn(self, trainer, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the point: nothing an instrument does may end the run
            self.fail(exc, hook.__name__)
            return None
    hook.__name__, hook.__doc__, hook.__wrapped__ = fn.__name__, fn.__doc__, fn
    hook._guarded = True
    return hook


class Instrument(Callback):
    """Base of gradlab's instruments: its hooks run guarded (see the module docstring).

    `name` is the instrument's key in conf/callbacks/default.yaml and in the Observatory's arguments.
    Subclasses remove their module and tensor hooks in `switch_off`.
    """

    name = "instrument"
    failure: Optional[dict[str, str]] = None  # set once, by `fail`

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for hook in HOOKS:
            fn = getattr(cls, hook)
            if fn is not getattr(Callback, hook) and not getattr(fn, "_guarded", False):
                setattr(cls, hook, _guard_hook(fn))

    def guarded(self, fn: Callable, layer: Optional[str] = None, where: Optional[str] = None) -> Callable:
        """`fn` as a module or tensor hook that never raises into the host's forward or backward.

        torch.compile does not trace into it: a compiled network runs its graphs, and the hook runs eagerly
        between them (a graph break per hooked module, on logging steps only)."""
        @torch.compiler.disable
        def hook(*args: Any) -> Any:
            if self.failure is not None:
                return None
            try:
                return fn(*args)
            except Exception as exc:  # noqa: BLE001
                self.fail(exc, where or getattr(fn, "__name__", "hook"), layer)
                return None
        return hook

    def fail(self, exc: BaseException, where: str, layer: Optional[str] = None) -> None:
        if self.failure is not None:
            return
        frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
        self.failure = {"instrument": self.name, "hook": where, "layer": layer or "",
                        "error": f"{type(exc).__name__}: {exc}",
                        "at": f"{frame.filename}:{frame.lineno}" if frame else "", "hint": _hint(exc, layer)}
        try:
            self.switch_off()
        except Exception:  # noqa: BLE001 - switching off is best effort; the instrument's hooks are no-ops now
            pass
        on = f" on layer {layer}" if layer else ""
        Console(stderr=True, soft_wrap=True).print(
            f"[bold red]instrument error[/]: {self.name} failed in {where}{on}: {self.failure['error']} "
            f"({self.failure['at']}). {self.name} is off for the rest of the run; training goes on unchanged. "
            f"Hint: {self.failure['hint']}.", highlight=False)

    def switch_off(self) -> None:
        """Remove every hook this instrument attached to the model (called once, after a failure)."""


def failures(trainer: pl.Trainer) -> list[dict[str, str]]:
    """The failures of the trainer's instruments, for health.json."""
    return [cb.failure for cb in trainer.callbacks if isinstance(cb, Instrument) and cb.failure is not None]


def find(trainer: pl.Trainer, kind: type) -> Any:
    """The trainer's first callback of this kind, or None."""
    return next((cb for cb in trainer.callbacks if isinstance(cb, kind)), None)
