"""The GPUs fx knows: what a process can use of each, its tensor peak, and whether it computes in bfloat16."""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30


@dataclass(frozen=True)
class GPU:
    """Memory a process can use (GiB, about what torch.cuda reports as the card's total), dense fp16/bf16 tensor
    peak (TFLOP/s, vendor datasheets, no sparsity), whether it computes in bfloat16, and the markers that
    ``torch.cuda.get_device_name`` reports for it."""

    name: str
    memory_gib: float
    peak_tflops: float
    bf16: bool
    device_names: tuple[str, ...]


GPUS: dict[str, GPU] = {
    "t4": GPU("NVIDIA T4", 14.5, 65.0, False, ("T4",)),
    "a10g": GPU("NVIDIA A10G", 22.0, 70.0, True, ("A10G",)),
    "l4": GPU("NVIDIA L4", 22.0, 121.0, True, ("L4",)),
    "a100-40": GPU("NVIDIA A100 40GB", 39.4, 312.0, True, ("A100-SXM4-40GB", "A100-PCIE-40GB")),
    "a100-80": GPU("NVIDIA A100 80GB", 79.1, 312.0, True, ("A100-SXM4-80GB", "A100 80GB PCIe")),
    "h100": GPU("NVIDIA H100 80GB", 79.1, 989.0, True, ("H100", "H200")),
}


def budget_gib(budget: str | float) -> float:
    """A budget given as a GPU name from :data:`GPUS` or a number of GiB; ValueError for anything else."""
    if isinstance(budget, (int, float)):
        return float(budget)
    key = str(budget).lower()
    if key in GPUS:
        return GPUS[key].memory_gib
    try:
        gib = float(key)
    except ValueError:
        raise ValueError(f"unknown GPU {budget!r}: one of {', '.join(GPUS)}, or a number of GiB") from None
    if not 0 < gib <= 4096:  # nan and inf fail this too
        raise ValueError(f"{budget!r}: give one of {', '.join(GPUS)}, or a number of GiB (0 to 4096)")
    return gib


def known_device(device_name: str) -> GPU | None:
    """The table's entry for a device as torch names it (``NVIDIA H100 80GB HBM3``), or None."""
    for gpu in GPUS.values():
        if any(marker in device_name for marker in gpu.device_names):
            return gpu
    return None
