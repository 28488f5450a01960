"""Counting the bytes a training step holds: every tensor storage an aten op creates, from its creation
until it is freed. Deterministic (no allocator, no timing), so tests can compare two implementations.

    with LiveTensorBytes(exclude=[*net.parameters(), x]) as mem:
        loss = criterion(net(x), y)
        kept = mem.live            # what the graph keeps for backward
        loss.backward()
    mem.peak                       # the most alive at once
"""

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveTensorBytes(TorchDispatchMode):
    """Live and peak bytes of the tensor storages created inside the mode. Allocator caching and the scratch
    space inside kernels are not counted: this is the program's own demand."""

    def __init__(self, exclude=()):
        super().__init__()
        self.live = self.peak = 0
        self.tracked: set[int] = set()
        self.excluded = {t.untyped_storage().data_ptr() for t in exclude}  # e.g. parameters and the batch

    def _release(self, key: int, nbytes: int) -> None:
        self.tracked.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            # In-place ops and views return storages that already exist: only new ones count.
            if key in self.tracked or key in self.excluded:
                continue
            self.tracked.add(key)
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._release, key, storage.nbytes())
        return out


def step_memory(net, criterion, optimizer, x, y) -> tuple[int, int]:
    """(bytes alive when forward has returned, peak bytes over forward + backward + optimizer step) of one
    training step, above the parameters, buffers and the batch. A first step, not counted, creates the
    optimizer's state (momentum buffers), if any."""
    optimizer.zero_grad(set_to_none=True)
    criterion(net(x), y).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with LiveTensorBytes(exclude=[*net.parameters(), *net.buffers(), x, y]) as mem:
        loss = criterion(net(x), y)
        kept = mem.live  # the graph's saved tensors (and the loss): what backward will read
        loss.backward()
        del loss
        optimizer.step()
    return kept, mem.peak
