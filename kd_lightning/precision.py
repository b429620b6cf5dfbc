"""bf16 on CPUs that lack it: matmuls with bfloat16 operands computed at float32 speed.

On a CPU without AVX512-BF16 or AMX, torch falls back to a slow bf16 matmul: on an
AVX2-only CPU, 8-40x the float32 time (by layout), and a bf16-mixed step of the
SmolLM2 study at 5.6 tokens/s against 58-105 with this module (one run each, 2 threads).
"""

from __future__ import annotations

import contextlib
import platform
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
#: what linear, matmul and their backward passes dispatch to on the CPU
MATMULS = frozenset({aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default})


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX); without either,
    torch emulates bf16 matmuls. A torch without these probes is trusted."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, probe, lambda: True)() for probe in probes)


def cpu_description(threads: int | None = None) -> str:
    """This CPU for a measurement's record: its model name (from /proc/cpuinfo where there
    is one), the threads the measurement used (default: those torch uses), and whether it has native bf16."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)
    threads = threads or torch.get_num_threads()
    return (f"{model or platform.processor() or platform.machine()}, {threads} thread{'s' if threads > 1 else ''}, "
            f"{'native' if cpu_has_bf16() else 'no native'} bf16")


class Float32MatmulsForBf16(TorchDispatchMode):
    """Runs every CPU matmul whose tensors are all bf16 as ``(A.float() @ B.float()).bfloat16()``.

    The same numbers as a bf16 kernel, up to the order of summation: each product of two
    bf16 values (8-bit mantissas) is exact in float32, bf16 kernels accumulate in float32,
    and the result is rounded to bf16 as theirs is. Every other op passes through unchanged.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [arg for arg in args if isinstance(arg, torch.Tensor)]
        if func in MATMULS and not kwargs and all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in tensors):
            widened = [arg.float() if isinstance(arg, torch.Tensor) else arg for arg in args]
            return func(*widened).bfloat16()
        return func(*args, **kwargs)


def cpu_bf16_matmuls(device_type: str) -> contextlib.AbstractContextManager:
    """:class:`Float32MatmulsForBf16` on a CPU without native bf16, else nothing: the
    context to run bf16 work on ``device_type`` in."""
    if device_type == "cpu" and not cpu_has_bf16():
        return Float32MatmulsForBf16()
    return contextlib.nullcontext()
