"""Autocast for the hand-written Functions: backward runs under the autocast state forward ran under.

`torch.amp.custom_fwd/custom_bwd` do exactly this, but they fix the device type when the class is
defined (one Function could not serve CPU and CUDA) and store the state on `args[0]`, which is `ctx`
only in the classic `forward(ctx, ...)` style: with the `setup_context` style `args[0]` is the first
input and backward fails with `AttributeError: ... no attribute '_fwd_used_autocast'`. So every Function
here uses the classic style and these two decorators, which read the device type from the inputs.

Under autocast the matmul in `linear` runs in float16/bfloat16 as `torch.addmm` would; the losses
and batch norm compute in float32 (see `at_least_float32`), like the ops autocast keeps in float32.
"""

import functools

import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)


def autocast_forward(forward):
    @functools.wraps(forward)
    def wrapper(ctx, *args):
        device_type = next(a.device.type for a in args if isinstance(a, torch.Tensor))
        enabled = torch.is_autocast_enabled(device_type)
        ctx.autocast_state = (device_type, enabled, torch.get_autocast_dtype(device_type) if enabled else None)
        return forward(ctx, *args)

    return wrapper


def autocast_backward(backward):
    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        device_type, enabled, dtype = ctx.autocast_state
        if not enabled:
            return backward(ctx, *grads)
        with torch.autocast(device_type, dtype=dtype):
            return backward(ctx, *grads)

    return wrapper


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """Reductions (softmax sums, batch statistics) lose too much in 16 bits: do them in float32."""
    return t.float() if t.dtype in LOW_PRECISION else t
