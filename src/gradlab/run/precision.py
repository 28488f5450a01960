"""`trainer.precision=auto`: bf16-mixed where the hardware computes bfloat16 natively, 32-true elsewhere.

    python train.py experiment=mnist_fast   # prints e.g. "trainer.precision=auto: bf16-mixed (the CPU ...)"

Where bf16 pays (measured in docs/benchmarks.md, "bf16 where it pays"):
* x86 CPUs with AVX512-BF16 (AMD Zen 4/5, Intel Cooper Lake) or AMX (Intel Sapphire Rapids and later): oneDNN runs
  bfloat16 convolutions and matmuls natively, about 1.8x the float32 step of the MNIST CNN on an AMD EPYC.
* CUDA GPUs that support bfloat16 (Ampere and later): tensor cores.
Where it does not: x86 CPUs with AVX-512 but no BF16 (Skylake-SP to Ice Lake: 0.57x, emulated) or AVX2 only
(Zen 1-3, most Intel desktop chips), where oneDNN converts to float32 and back around every kernel; and any CPU
whose flags cannot be read here (macOS, Windows) or that is not measured (ARM's bf16). There `auto` keeps float32.
"""

import os
from typing import Iterable, Optional

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo names of native bfloat16 arithmetic


def cpu_flags(path: str = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags as Linux lists them; empty where there is no /proc/cpuinfo."""
    if not os.path.exists(path):
        return set()
    with open(path) as f:
        for line in f:
            if line.startswith(("flags", "Features")):  # x86 | ARM
                return set(line.split(":", 1)[1].split())
    return set()


def cpu_model(path: str = "/proc/cpuinfo") -> str:
    """The CPU's model name, as benchmark tables print it beside their ratios."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


def choose(accelerator: str, flags: Iterable[str], cuda_bf16: Optional[bool]) -> tuple[str, str]:
    """(precision, reason) for `trainer.precision=auto`.

    `accelerator` is the trainer's (auto, cpu, gpu, cuda, ...); `flags` the CPU's feature flags; `cuda_bf16`
    whether a usable CUDA GPU supports bfloat16 (None: there is no CUDA GPU).
    """
    if accelerator in ("auto", "gpu", "cuda") and cuda_bf16 is not None:
        if cuda_bf16:
            return "bf16-mixed", "the CUDA GPU supports bfloat16"
        return "32-true", "the CUDA GPU has no fast bfloat16"
    if accelerator not in ("auto", "cpu"):
        return "32-true", f"accelerator={accelerator}: bf16 not measured there"
    native = [f for f in BF16_CPU_FLAGS if f in set(flags)]
    if native:
        return "bf16-mixed", f"the CPU computes bfloat16 natively: {', '.join(native)}"
    return "32-true", "the CPU has no native bfloat16 (no avx512_bf16 or amx_bf16): bf16 would be slower"


def resolve(precision, accelerator: str = "auto") -> str:
    """`precision` itself, or for "auto" the choice of `choose` on this machine, printed once."""
    if str(precision) != "auto":
        return precision
    import torch

    cuda_bf16 = torch.cuda.is_bf16_supported() if torch.cuda.is_available() else None
    chosen, reason = choose(str(accelerator), cpu_flags(), cuda_bf16)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0:
        print(f"trainer.precision=auto: {chosen} ({reason})", flush=True)
    return chosen
