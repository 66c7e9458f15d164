"""Training on several GPUs, one process (a rank) each, through accelerate: the ranks' world, the effective batch
kept whatever their number, the strategy (DDP, or FSDP2 sharding a 4-bit model), what the ranks tell each other,
and the checks that refuse what can't work before anything loads. docs/distributed.md is the guide.

A process is a rank when a launcher set ``WORLD_SIZE`` > 1 (``fx run --gpus N``, torchrun, ``accelerate launch``).
``FX_DISTRIBUTED_CPU=1`` is for fx's own tests only: N ranks on the CPU over gloo, GPUs hidden, and accelerate's
FSDP2 allowed there (accelerate enables FSDP only on GPUs; torch's FSDP2 itself steps on the CPU).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

from fx.errors import UserError

CPU_TEST = "FX_DISTRIBUTED_CPU"  # test-only: ranks on the CPU over gloo (docs/distributed.md, "Testing")
STRATEGIES = ("ddp", "fsdp")
TIMEOUT = timedelta(minutes=30)  # a collective waits this long for the slowest rank (a long evaluation, a merge)


@dataclass(frozen=True)
class World:
    """The processes training together: how many, which one this is, and how they share the work."""

    size: int = 1
    rank: int = 0
    local_rank: int = 0  # this process's GPU on its host
    strategy: str | None = None  # "ddp" | "fsdp" with several ranks, None alone

    @property
    def main(self) -> bool:
        """Rank 0 writes the run folder, talks to the trackers and calls the plugins' hooks."""
        return self.rank == 0


_current = World()


def current() -> World:
    """The world this process trains in (one process unless :func:`entered` says otherwise)."""
    return _current


@contextmanager
def entered(world: World) -> Iterator[World]:
    """Make ``world`` the current one: the process group is started (several ranks) and stopped after."""
    global _current
    previous, _current = _current, world
    try:
        if world.size > 1:
            _start(world)
        yield world
    finally:
        if world.size > 1:
            _stop()
        _current = previous


def launched() -> tuple[int, int, int]:
    """``(size, rank, local_rank)`` as a launcher set them in the environment; ``(1, 0, 0)`` without one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    return size, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))


def cpu_test() -> bool:
    return os.environ.get(CPU_TEST) == "1"


# -- the effective batch --------------------------------------------------------------------------------------------

def per_rank(micro_batch: int, accumulation: int, ranks: int) -> tuple[int, int]:
    """A rank's micro-batch and accumulation steps so that ``ranks`` of them train the experiment's effective batch
    (``micro_batch`` x ``accumulation`` rows on one GPU): the largest micro-batch up to the experiment's that divides
    the rank's share. Dividing the accumulation comes first, so a rank's memory never grows; and a rank's batch
    written back as one GPU's (accumulation x ranks) splits to itself again."""
    effective = micro_batch * accumulation
    if effective % ranks:
        fits = next(a for a in range(accumulation, accumulation * ranks + 1) if micro_batch * a % ranks == 0)
        raise UserError(f"the effective batch (method.micro_batch_size {micro_batch} x "
                        f"method.gradient_accumulation_steps {accumulation} = {effective} rows) doesn't divide between "
                        f"{ranks} GPUs; make it a multiple of {ranks}, e.g. --set "
                        f"method.gradient_accumulation_steps={fits}")
    share = effective // ranks
    rows = max(b for b in range(1, min(micro_batch, share) + 1) if share % b == 0)
    return rows, share // rows


def batch_keys(settings) -> tuple[int, int] | None:
    """The experiment's micro-batch and accumulation, when the method's settings have them (the shared QLoRA ones)."""
    if hasattr(settings, "micro_batch_size") and hasattr(settings, "gradient_accumulation_steps"):
        return settings.micro_batch_size, settings.gradient_accumulation_steps
    return None


def per_rank_workload(work, ranks: int, strategy: str | None):
    """The planner's workload of one rank (:class:`fx.plan.shapes.Workload`): its share of the batch, eager steps
    (no CUDA graphs), and under FSDP the optimizer fx uses there (torch's AdamW, which steps FSDP's sharded
    parameters)."""
    if ranks == 1:
        return work
    rows, accumulation = per_rank(work.micro_batch, work.gradient_accumulation, ranks)
    sharded = strategy == "fsdp"
    return replace(work, micro_batch=rows, gradient_accumulation=accumulation, ranks=ranks, sharded=sharded,
                   optim="adamw_torch" if sharded else work.optim, persistent_grads=False)  # no CUDA graphs


def describe(world: World, settings) -> dict[str, Any]:
    """What fx did to the batch and the model for ``world``, for the run's summary and its first line."""
    out: dict[str, Any] = {"world_size": world.size, "strategy": world.strategy}
    keys = batch_keys(settings)
    if keys is not None:
        rows, accumulation = per_rank(*keys, world.size)
        out.update(effective_batch=keys[0] * keys[1], micro_batch_per_rank=rows, accumulation_per_rank=accumulation)
        out["message"] = (f"{world.size} ranks ({world.strategy}): micro-batch {rows} x {world.size} ranks x "
                          f"{accumulation} accumulation = the experiment's effective batch of {keys[0] * keys[1]} "
                          f"rows ({keys[0]} x {keys[1]} on one GPU)")
    if world.strategy == "fsdp":
        out["optimizer"] = "adamw_torch"
        out["not_run"] = ["evaluate_before", "generate_before"]  # the model is sharded once training starts
    return out


# -- what can't work ------------------------------------------------------------------------------------------------

def problems(exp, ranks: int, strategy: str | None, gpus: int) -> list[str]:
    """Why ``exp`` can't train on ``ranks`` processes with ``strategy`` on a host with ``gpus`` CUDA GPUs, one line
    each (empty: it can)."""
    if ranks == 1:
        return []
    out = []
    if not cpu_test():
        if gpus == 0:
            out.append(f"--gpus {ranks}: this machine has no CUDA GPU; without one fx trains in one process "
                       "(leave out --gpus)")
        elif ranks > gpus:
            out.append(f"--gpus {ranks}: this machine has {gpus} CUDA GPU{'s' if gpus > 1 else ''}")
    method, settings = exp.method.cls, exp.method.settings
    if strategy not in getattr(method, "strategies", ("ddp",)):
        out.append(f"distributed.strategy = {strategy!r}: method {exp.method.name!r} can't train that way (it "
                   f"supports: {', '.join(method.strategies)})")
    if strategy == "fsdp" and getattr(settings, "micro_batch_tokens", 0):
        out.append("method.micro_batch_tokens doesn't go with FSDP: every rank must run the same passes, and a token "
                   "budget cuts each rank's batch its own way; set it to 0 or use distributed.strategy = \"ddp\"")
    if getattr(settings, "cuda_graphs", None) is True:
        out.append("method.cuda_graphs = true needs one process: a graphed step's gradients bypass DDP's and FSDP's "
                   "reductions; set it to \"auto\" (off with several GPUs) or false")
    keys = batch_keys(settings)
    if keys is not None:
        try:
            per_rank(*keys, ranks)
        except UserError as exc:
            out.append(str(exc))
    return out


# -- the process group and what the ranks tell each other -----------------------------------------------------------

def _start(world: World) -> None:
    import torch
    import torch.distributed as dist

    if cpu_test():
        allow_fsdp_on_cpu()
    if dist.is_initialized():  # accelerate or the caller started it
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(world.local_rank)
        dist.init_process_group("nccl", timeout=TIMEOUT, device_id=torch.device("cuda", world.local_rank))
    else:
        dist.init_process_group("gloo", timeout=TIMEOUT)


def _stop() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _device():
    import torch
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def share(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (the run folder it made, say)."""
    if current().size == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank."""
    if current().size == 1:
        return [value]
    import torch.distributed as dist

    out: list[Any] = [None] * current().size
    dist.all_gather_object(out, value)
    return out


def largest(value: int) -> int:
    """The largest of the ranks' ``value`` (a stop signal's number; 0: none), on every rank."""
    if current().size == 1:
        return value
    import torch
    import torch.distributed as dist

    tensor = torch.tensor([value], dtype=torch.int64, device=_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def total(value):
    """A tensor summed over the ranks (answer tokens of the whole batch), on every rank."""
    if current().size == 1:
        return value
    import torch.distributed as dist

    value = value.clone()
    dist.all_reduce(value)
    return value


def barrier() -> None:
    if current().size > 1:
        import torch.distributed as dist

        dist.barrier()


# -- FSDP ------------------------------------------------------------------------------------------------------------

def fsdp_arguments() -> dict[str, Any]:
    """TrainingArguments for FSDP2 through accelerate: every decoder layer its own shard group (the model's
    ``_no_split_modules``), resharded after its forward, checkpoints in sharded form (each rank writes its own shard,
    the adapter alone), no rank-0-only loading (accelerate skips it for 4-bit weights: each rank quantises on its CPU
    and FSDP moves one layer's shard at a time to its GPU)."""
    return {"fsdp": True, "fsdp_config": {"version": 2, "reshard_after_forward": True,
                                          "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                                          "state_dict_type": "SHARDED_STATE_DICT", "cpu_ram_efficient_loading": False}}


def is_sharded(model) -> bool:
    """Whether FSDP has sharded ``model`` (its forward then needs every rank)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


@contextmanager
def whole_state(model) -> Iterator[None]:
    """Under FSDP, ``model.state_dict()`` gives rank 0 the whole trainable weights (gathered from every rank; the
    frozen 4-bit weights left out), so that a method's ``save`` writes what plain peft loads. Every rank enters it."""
    if not is_sharded(model):
        yield
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    whole = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                 ignore_frozen_params=True))
    model.state_dict = lambda *args, **kwargs: whole
    try:
        yield
    finally:
        del model.state_dict


def allow_fsdp_on_cpu() -> None:
    """Test-only (``FX_DISTRIBUTED_CPU``): accelerate's state takes the FSDP plugin on CPU ranks, as it does on GPU
    ranks, so that fx's FSDP path (accelerate's FSDP2 preparation, sharded checkpoints, the gathered adapter) runs in
    CPU tests over gloo."""
    import accelerate.state as state

    if getattr(state.AcceleratorState.__init__, "fx_cpu_fsdp", False):
        return
    original = state.AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == state.DistributedType.MULTI_CPU:
            self.distributed_type = state.DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    init.fx_cpu_fsdp = True
    state.AcceleratorState.__init__ = init
