"""Several GPUs without starting any: the effective batch divided between ranks, the planner's per-rank model, fx plan
--gpus for Llama 2 7B/13B/70B, what --gpus refuses before anything starts, the checkpoints every rank must finish, and
how the launcher names the rank that ended a run. (Training on several ranks: tests/test_distributed_training.py.)"""

from __future__ import annotations

import json
import signal
from dataclasses import replace

import pytest

import fx
from conftest import ROOT, TINY_EXPERIMENT, TINY_ROWS
from fx import cli, config
from fx.errors import UserError
from fx.plan.cost import NCCL_GIB, plan
from fx.plan.gpus import GIB
from fx.plan.shapes import Architecture, Workload
from fx.run.launch import _report, cause
from fx.sources.architectures import llama_config
from fx.training.checkpoints import last_checkpoint, ranks_of, write_manifest
from fx.training.distributed import CPU_TEST, World, per_rank, per_rank_workload, problems

FSDP_FILE = ROOT / "experiments" / "llama2_70b_fsdp.toml"


@pytest.mark.parametrize(("batch", "ranks", "expected"), [
    ((4, 1), 2, (2, 1)),   # the test of tests/test_distributed_training.py: micro-batch 2 on each of 2 ranks
    ((4, 4), 2, (4, 2)),   # accumulation divides first: a rank's memory stays what one GPU's was
    ((4, 3), 2, (3, 2)),   # the largest micro-batch up to the experiment's that divides a rank's 6 rows
    ((1, 8), 8, (1, 1)),
    ((16, 1), 4, (4, 1)),
])
def test_each_rank_trains_its_share_of_the_effective_batch(batch, ranks, expected):
    rows, accumulation = per_rank(*batch, ranks)
    assert (rows, accumulation) == expected
    assert rows * accumulation * ranks == batch[0] * batch[1]
    # a rank's batch written back as one GPU's (fx's suggestions and budget.auto do) splits to itself again
    assert per_rank(rows, accumulation * ranks, ranks) == (rows, accumulation)


def test_an_effective_batch_that_does_not_divide_is_refused():
    with pytest.raises(UserError, match=r"= 6 rows\) doesn't divide between 4 GPUs.*gradient_accumulation_steps=4"):
        per_rank(3, 2, 4)


def shape(name: str) -> Architecture:
    return Architecture.from_config(llama_config(name))


WORK = Workload(micro_batch=4, seq_len=1024, gradient_checkpointing=True, lora_r=64, lora_targets=("q_proj", "v_proj"),
                lora_dropout=0.1, compute_dtype="bfloat16", gradient_accumulation=2, optim="paged_adamw_32bit")


def by_name(p) -> dict[str, float]:
    return {c.name: c.bytes for c in p.components}


def test_a_ddp_rank_is_the_single_gpu_plan_of_its_share_plus_gradient_buckets():
    arch = shape("llama2-7b")
    rank = plan(arch, per_rank_workload(WORK, 2, "ddp"))
    alone = plan(arch, replace(WORK, micro_batch=4, gradient_accumulation=1))  # one GPU training a rank's share
    parts, single = by_name(rank), by_name(alone)
    lora = single["LoRA parameters"]
    assert parts["gradient buckets"] == lora and parts["NCCL buffers"] == NCCL_GIB * GIB
    assert rank.total == pytest.approx(alone.total + lora + NCCL_GIB * GIB)


def test_an_fsdp_rank_holds_a_shard_of_the_weights_and_gathers_a_layer_at_a_time():
    arch = shape("llama2-70b")
    alone, ranks = plan(arch, replace(WORK, optim="adamw_torch")), {n: plan(arch, per_rank_workload(WORK, n, "fsdp"))
                                                                   for n in (2, 4, 8)}
    single = by_name(alone)
    for n, p in ranks.items():
        parts = by_name(p)
        for name in ("4-bit weights", "16-bit modules", "LoRA parameters", "optimizer states"):
            assert parts[name] == pytest.approx(single[name] / n), name
        # bitsandbytes keeps each linear's whole quantisation state on every rank
        assert parts["quantisation constants"] == single["quantisation constants"]
        layer = sum(i * o for i, o in arch.linears().values()) / 2
        assert parts["gathered layers"] > 2 * layer and parts["gathered head"] == arch.vocab * arch.hidden * 2
        assert p.work.optim == "adamw_torch"  # torch's AdamW steps FSDP's sharded parameters
    assert alone.total > ranks[2].total > ranks[4].total > ranks[8].total


def planned(capsys, *args) -> tuple[int, dict]:
    code = cli.main(["plan", *map(str, args), "--json"])
    out, planned.err = capsys.readouterr()
    return code, json.loads(out[out.index("{"):]) if "{" in out else {}


@pytest.mark.parametrize("architecture", ["llama2-7b", "llama2-13b", "llama2-70b"])
def test_fx_plan_gpus_gives_per_rank_totals_and_a_per_gpu_verdict(architecture, capsys):
    """fx plan for 1, 2, 4 and 8 GPUs of 22 GiB each (FSDP, as experiments/llama2_70b_fsdp.toml says)."""
    totals = {}
    for n in (1, 2, 4, 8):
        code, out = planned(capsys, FSDP_FILE, "--gpus", n, "--set", f"model.architecture={architecture}")
        totals[n] = out["total_gib"]
        assert out["workload"]["ranks"] == n and out["workload"]["sharded"] == (n > 1)
        assert out["fits"] == (out["total_gib"] <= 22.0) and code == (0 if out["fits"] else 2)
    assert totals[1] > totals[2] > totals[4] > totals[8]
    if architecture == "llama2-70b":  # one GPU can't hold its 4-bit weights; two can hold half each
        assert not planned(capsys, FSDP_FILE)[1]["fits"] and totals[2] <= 22.0


def test_auto_shards_only_what_one_gpu_cannot_hold(capsys):
    auto = ["--set", "distributed.strategy=auto", "--gpus", "2"]
    _, small = planned(capsys, FSDP_FILE, *auto, "--set", "model.architecture=llama2-13b")
    _, large = planned(capsys, FSDP_FILE, *auto)
    assert not small["workload"]["sharded"] and large["workload"]["sharded"]


def test_a_budget_refuses_a_rank_that_does_not_fit(capsys):
    code, out = planned(capsys, FSDP_FILE, "--gpus", "2", "--set", "method.micro_batch_size=8",
                        "--set", "method.gradient_accumulation_steps=1")
    err = planned.err
    assert code == 2 and not out["fits"] and "the plan of a rank of 2 GPUs needs 24.04 GiB" in err
    assert "over the 22 GiB budget per GPU" in err
    assert "micro-batch 1 with 4 accumulation steps per rank x 2 ranks (same effective batch 8)" in err
    assert "--set method.micro_batch_size=1 --set method.gradient_accumulation_steps=8" in err  # one GPU's keys


@pytest.fixture
def cpu_ranks(monkeypatch):
    monkeypatch.setenv(CPU_TEST, "1")


def refused(capsys, *args) -> str:
    assert cli.main(list(map(str, args))) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_gpus_refuses_what_cannot_work_before_anything_starts(write_experiment, capsys, monkeypatch, tmp_path):
    exp = write_experiment(TINY_EXPERIMENT, TINY_ROWS)
    assert "this machine has no CUDA GPU" in refused(capsys, "run", exp, "--gpus", "2")  # CPU-only, outside tests
    assert problems(config.load(exp), 4, "ddp", gpus=2) == ["--gpus 4: this machine has 2 CUDA GPUs"]
    monkeypatch.setenv(CPU_TEST, "1")
    assert "= 4 rows) doesn't divide between 3 GPUs" in refused(capsys, "run", exp, "--gpus", "3")
    fsdp = ["--set", "distributed.strategy=fsdp"]
    assert "micro_batch_tokens doesn't go with FSDP" in refused(
        capsys, "run", exp, "--gpus", "2", *fsdp, "--set", "method.micro_batch_tokens=64")
    assert "cuda_graphs = true needs one process" in refused(
        capsys, "run", exp, "--gpus", "2", "--set", "method.cuda_graphs=true")
    assert "'distributed.strategy=zero3': input should be 'auto', 'ddp' or 'fsdp'" in refused(
        capsys, "run", exp, "--gpus", "2", "--set", "distributed.strategy=zero3")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert "under torchrun or accelerate launch leave it out" in refused(capsys, "run", exp, "--gpus", "2")
    assert not (tmp_path / "runs").exists()  # nothing started, nothing written


def test_a_method_that_cannot_shard_is_refused_fsdp(write_experiment, register_plugin, capsys, cpu_ranks):
    class PlainSFT(fx.Method):
        """A third party's method on fx.Method alone: it loads its own model, which FSDP can't shard."""

        def load(self, source, tokenizer): ...
        def trainer(self, model, tokenizer, rows, session): ...
        def save(self, model, folder): ...
        def load_trained(self, source, folder): ...

    class Plugin:
        @fx.hookimpl
        def fx_register_methods(self, register):
            register("plain_sft", PlainSFT)

    register_plugin(Plugin(), "plain")
    exp = write_experiment(TINY_EXPERIMENT.replace('name = "qlora_sft"', 'name = "plain_sft"')
                           .split("max_steps = 12")[0] + "\n[distributed]\nstrategy = \"fsdp\"\n", TINY_ROWS)
    err = refused(capsys, "run", exp, "--gpus", "2")
    assert "distributed.strategy = 'fsdp': method 'plain_sft' can't train that way (it supports: ddp)" in err


def test_a_checkpoint_is_complete_once_every_rank_wrote_its_part_and_its_manifest_verifies(tmp_path):
    def checkpoint(step: int, ranks: tuple[int, ...], manifest: bool):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        (folder / "adapter_model.safetensors").write_bytes(b"w")  # a checkpoint's manifest must list its weights
        for r in ranks:
            (folder / f"rng_state_{r}.pth").write_bytes(b"x")
        if manifest:  # rank 0 writes it once every rank has written its part
            write_manifest(folder, step, None, {"world_size": 2, "strategy": "ddp"})
        return folder

    checkpoint(4, (0, 1), True)
    checkpoint(8, (0, 1), False)  # rank 0 wrote its trainer state; the manifest (after every rank) never came
    (checkpoint(12, (0, 1), True) / "rng_state_1.pth").unlink()  # a rank's state missing (deleted by hand)
    assert last_checkpoint(tmp_path) == (tmp_path / "checkpoint-4", 4)
    assert ranks_of(tmp_path / "checkpoint-4") == {"world_size": 2, "strategy": "ddp"}
    write_manifest(tmp_path / "checkpoint-8", 8, None, {"world_size": 1, "strategy": None})
    assert ranks_of(tmp_path / "checkpoint-8") is None  # one process


def test_the_launcher_names_the_rank_that_ended_a_run_not_its_echoes():
    oom = {"status": "out_of_memory", "message": "out of GPU memory on rank 1 (GPU 1) of 2 at step 3", "time": 2.0}
    echo = {"status": "failed", "message": "rank 0: RuntimeError: Connection closed by peer", "time": 1.0}
    assert cause({0: echo, 1: oom}, {}, 2)[:2] == (1, "out_of_memory")  # out of memory is never an echo
    assert cause({0: echo}, {1: 9, 2: 15}, 3) == (1, "failed", "rank 1 (SIGKILL) of 3 ended; the other ranks were "
                                                              "stopped")  # SIGTERM: the launcher stopping rank 2
    assert cause({0: echo}, {}, 2)[0] == 0
    assert cause({0: {"status": "interrupted", "message": "", "time": 1.0}}, {}, 2) is None


@pytest.mark.parametrize(("status", "code"), [("completed", 0), ("running", 143)])
def test_a_signal_after_the_ranks_finished_says_the_run_completed(tmp_path, capsys, status, code):
    """SIGTERM to the launcher once every rank has ended: a completed run is said so (exit 0), not ended silently."""
    from fx.run.record import RunSummary

    run, notes = tmp_path / "run", tmp_path / "notes"
    run.mkdir(), notes.mkdir()
    (notes / "run").write_text(str(run))
    summary = RunSummary(name="run", status=status, created="2026-12-08T00:00:00", started="2026-12-08T00:00:00",
                         model="tiny", method="sft", template="chatml")
    (run / "summary.json").write_text(summary.model_dump_json())
    assert _report(notes, {"launcher": 128 + signal.SIGTERM}, 2) == code
    assert ("SIGTERM came after the ranks had finished; the run completed" in capsys.readouterr().err) == (code == 0)


def test_the_world_shapes_what_a_rank_is_given(write_experiment):
    """A rank's trainer arguments: its share of the batch, DDP with no unused-parameter search, and under FSDP
    accelerate's FSDP2 with torch's AdamW; its 4-bit weights stored in the compute dtype under FSDP only."""
    from transformers import TrainingArguments

    from fx.training import distributed
    from fx.training.method import Session

    exp = config.load(write_experiment(TINY_EXPERIMENT, TINY_ROWS))
    method = exp.method.cls(exp.method.settings)
    session = Session(output_dir=exp.base_dir / "checkpoints", seed=0)
    alone = method.trainer_args(TrainingArguments, session)
    assert alone.per_device_train_batch_size == 4 and not alone.fsdp
    for strategy in ("ddp", "fsdp"):
        distributed._current = World(size=2, strategy=strategy)  # no process group: only what the arguments say
        try:
            args = method.trainer_args(TrainingArguments, session)
            storage = method.quantization_config().bnb_4bit_quant_storage
        finally:
            distributed._current = World()
        assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (2, 1)
        assert args.ddp_find_unused_parameters is False and args.optim == "adamw_torch"
        assert bool(args.fsdp) == (strategy == "fsdp")
        assert str(storage) == ("torch.float32" if strategy == "fsdp" else "torch.uint8")  # float32: a CPU's compute
