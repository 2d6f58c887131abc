"""Which machine a figure of time or speed was measured on, and which precision is fastest there.

Machines of one kind differ: some 2-core CPUs have AVX-512 BF16 or AMX units, where bf16
autocast roughly doubles encoding and speeds training up by half; others have AVX-512
only, where oneDNN *emulates* bf16 and it runs 3-4x slower than fp32 (issue #25). So
`precision: auto` is a rule on the machine's capabilities, never on a timing probe: the
same machine always gets the same precision and so the same numbers. Every metrics file
that reports a time or a speed carries `machine_record()`, so a figure always names the
machine it came from.
"""

from __future__ import annotations

import logging
import os
import platform
from pathlib import Path

log = logging.getLogger(__name__)


def cpu_bf16_units() -> dict[str, bool]:
    """The CPU's native bf16 units, as PyTorch's dispatcher sees them."""
    import torch

    return {"avx512_bf16": bool(torch.cpu._is_avx512_bf16_supported()), "amx": bool(torch.cpu._is_amx_tile_supported())}


def native_bf16(device_type: str) -> bool:
    """Whether `device_type` computes bf16 natively: CUDA that supports it, or a CPU with AVX-512 BF16 or AMX.

    Not `torch.ops.mkldnn._is_mkldnn_bf16_supported()`: it is true wherever oneDNN can run bf16
    at all, emulated on plain AVX-512 too."""
    import torch

    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device_type == "cpu" and any(cpu_bf16_units().values())


def resolve_precision(precision: str, device_type: str, name: str) -> str:
    """`auto | fp32 | bf16` for this device -> "bf16" or "fp32".

    auto takes bf16 exactly where it is native. An explicit bf16 on a device without native
    units still runs (it can be measured that way) after one warning line naming `name`."""
    if precision == "fp32":
        return "fp32"
    native = native_bf16(device_type)
    if precision == "bf16" and not native:
        log.warning(
            f"{name}: bf16 on this {device_type} is emulated (no AVX-512 BF16 or AMX units), about 3x slower than fp32; `auto` would choose fp32"
        )
        return "bf16"
    return "bf16" if native else "fp32"


def cpu_model() -> str:
    """The CPU's marketing name (/proc/cpuinfo on Linux), else what the platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_record(device: str, precision: str) -> dict:
    """What a figure of time or speed depends on: CPU model, cores, bf16 units, torch, device, precision."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    record = {
        "cpu": cpu_model(),
        "cores": cores,
        "torch_threads": torch.get_num_threads(),
        **cpu_bf16_units(),
        "torch": torch.__version__,
        "device": device,
        "precision": precision,
    }
    if device.startswith("cuda"):
        record["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return record


def describe(record: dict) -> str:
    """One line naming the machine, for printed timings and benchmark headers."""
    units = [unit for unit in ("avx512_bf16", "amx") if record.get(unit)]
    where = record.get("gpu") or f"{record['cpu']}, {record['cores']} cores, {'+'.join(units) or 'no native bf16 units'}"
    return f"{where}; torch {record['torch']}, {record['device']}, {record['precision']}"
