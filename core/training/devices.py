"""The device a method trains on and the dtype it computes in: fx's own choice, never a library's default."""

from __future__ import annotations


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def compute_dtype(choice: str):
    """``auto``: float32 on a CPU (bfloat16 measured ~15x slower on a CPU without native bf16), bfloat16 on GPUs that
    support it, float16 on T4-class GPUs."""
    import torch

    if choice != "auto":
        return getattr(torch, choice)
    if not torch.cuda.is_available():
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def choose_threads() -> str | None:
    """On a CPU, torch's threads: one per core this process may use that other processes leave idle (measured over a
    quarter of a second), at least one. torch's default, a thread per core, makes two threads spin against each
    other on a 2-core machine whose other core is busy (docs/reliability.md). ``OMP_NUM_THREADS``
    set by the user is theirs to keep. Returns a line saying what was chosen when it is fewer than the cores, else
    None."""
    import os

    if os.environ.get("OMP_NUM_THREADS") or device() == "cuda":
        return None
    import psutil
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = psutil.cpu_percent(interval=0.25) / 100 * (os.cpu_count() or cores)
    threads = max(1, min(cores, round(cores - busy)))
    torch.set_num_threads(threads)
    if threads >= cores:
        return None
    return (f"{threads} CPU thread{'s' if threads > 1 else ''}: {busy:.1f} of {cores} cores are busy with other work "
            "(OMP_NUM_THREADS=N chooses)")
