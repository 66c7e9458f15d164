"""Training on several ranks for real: 2 processes on the CPU over gloo (``FX_DISTRIBUTED_CPU=1``, test-only), the
tiny random Llama in 4 bits with LoRA. DDP with micro-batch 2 on each rank trains the adapter one process trains with
micro-batch 4; FSDP-QLoRA trains, and its adapter loads in plain peft; a rank killed with SIGKILL, then --resume, ends
with the uninterrupted adapter; SIGTERM stops every rank after the same step with a checkpoint; out of memory on one
rank is reported with that rank; fx bench measures the ranks and their scaling."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_EXPERIMENT, TINY_ROWS
from fx import config
from fx.training.checkpoints import last_checkpoint
from fx.training.distributed import CPU_TEST

pytestmark = pytest.mark.slow  # every test here starts ranks that train

# 16 training rows (eval_fraction 1/3 of 24): the effective batch of 4 divides every epoch, so that one process and
# two ranks see the same rows in every step of the 12 (3 epochs)
SETS = ["--set", "data.eval_fraction=0.33", "--set", "checkpoints.every_steps=4",
        "--set", "stages.generate.enabled=false", "--set", "stages.evaluate.enabled=false"]
# the same adapter within 1e-4 (its weights reach about 0.2; measured: 1.7e-5 after 12 steps), losses within 1e-4
ATOL, RTOL = 1e-4, 1e-3


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("distributed")
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TINY_ROWS))
    (root / "exp.toml").write_text(TINY_EXPERIMENT.replace("{out}", str(root / "runs")))
    return root / "exp.toml"


def env(**extra) -> dict[str, str]:
    return {**os.environ, CPU_TEST: "1", **extra}


SLOW_STEPS = '''
import os
if os.environ.get("RANK") is not None:  # every rank's training step takes half a second more
    import time

    import transformers

    step = transformers.Trainer.training_step

    def training_step(self, *args, **kwargs):
        time.sleep(0.5)
        return step(self, *args, **kwargs)

    transformers.Trainer.training_step = training_step
'''


def with_site(tmp_path: Path, code: str) -> dict[str, str]:
    """The environment that has every Python process import ``code`` at start (``sitecustomize``)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(code)
    return {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}


def start(experiment: Path, out: Path, *args, **extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fx.cli", "run", str(experiment), *SETS,
                             "--set", f"experiment.output_dir={out}", *args], env=env(**extra),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, code: int = 0) -> str:
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == code, err
    return err


def only_run(out: Path) -> Path:
    (folder,) = out.iterdir()
    return folder


def fx(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fx.cli", *args], env=env(), capture_output=True, text=True,
                          timeout=900)


def losses(folder: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r and "step" in r}


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter" / "adapter_model.safetensors")


def assert_same_adapter(ours: Path, theirs: Path) -> None:
    a, b = adapter(ours), adapter(theirs)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=ATOL, rtol=RTOL)


@pytest.fixture(scope="module")
def one(experiment, tmp_path_factory) -> Path:
    """One process, micro-batch 4."""
    out = tmp_path_factory.mktemp("one")
    finish(subprocess.Popen([sys.executable, "-m", "fx.cli", "run", str(experiment), *SETS,
                             "--set", f"experiment.output_dir={out}"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True))
    return only_run(out)


@pytest.fixture(scope="module")
def ddp(experiment, tmp_path_factory) -> tuple[Path, str]:
    """Two ranks, uninterrupted: the folder and what the launcher printed."""
    out = tmp_path_factory.mktemp("ddp")
    err = finish(start(experiment, out, "--gpus", "2"))
    return only_run(out), err


def test_ddp_with_micro_batch_2_on_each_of_2_ranks_trains_the_adapter_of_micro_batch_4(one, ddp):
    folder, err = ddp
    assert ("2 ranks (ddp): micro-batch 2 x 2 ranks x 1 accumulation = the experiment's effective batch of 4 rows"
            in err)
    assert_same_adapter(folder, one)
    ours, theirs = losses(folder), losses(one)
    assert list(ours) == list(range(1, 13)) and ours == pytest.approx(theirs, abs=ATOL)
    summary, alone = (json.loads((f / "summary.json").read_text()) for f in (folder, one))
    assert summary["world_size"] == 2 and summary["distributed"]["micro_batch_per_rank"] == 2
    assert summary["train_tokens"] == alone["train_tokens"]  # every rank's tokens: the whole batch's
    assert [r["rank"] for r in summary["per_rank"]] == [0, 1] and all(r["peak_rss_gib"] for r in summary["per_rank"])
    checkpoint = folder / "checkpoints" / "checkpoint-12"
    assert json.loads((checkpoint / "fx-manifest.json").read_text())["world"] == {"world_size": 2, "strategy": "ddp"}
    assert (checkpoint / "rng_state_0.pth").is_file() and (checkpoint / "rng_state_1.pth").is_file()
    # rank 0 alone wrote the run: one folder, as many metrics lines as one process writes (load, 12 steps, train,
    # save, summary)
    lines = [(f / "metrics.jsonl").read_text().splitlines() for f in (folder, one)]
    assert len(list(folder.parent.iterdir())) == 1 and len(lines[0]) == len(lines[1])


def test_fsdp_qlora_trains_and_its_adapter_loads_in_plain_peft(experiment, one, tmp_path):
    """FSDP2 through accelerate with the 4-bit weights stored in float32 (the CPU's compute dtype), sharded over two
    ranks; held-out loss and generation after training run on both ranks together."""
    out = tmp_path / "fsdp"
    err = finish(start(experiment, out, "--gpus", "2", "--set", "distributed.strategy=fsdp",
                       "--set", "stages.evaluate.enabled=true", "--set", "stages.generate.enabled=true"))
    folder = only_run(out)
    assert "2 ranks (fsdp)" in err
    steps = losses(folder)
    assert list(steps) == list(range(1, 13)) and steps[12] < steps[1] - 0.5
    assert steps == pytest.approx(losses(one), abs=1e-3)  # the same training as one process
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["distributed"]["strategy"] == "fsdp" and summary["eval_before"] is None
    assert summary["eval_after"]["loss"] < 7.0 and (folder / "samples.md").is_file()
    assert (folder / "checkpoints" / "checkpoint-12" / "pytorch_model_fsdp_0").is_dir()  # each rank's shard

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from fx.training.qlora import keep_4bit_layout

    exp = config.load(experiment)
    path = exp.model.cls(exp.model.settings).path()

    def plain(folder: Path):
        base = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, device_map={"": "cpu"},
            quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_compute_dtype=torch.float32))
        keep_4bit_layout(base)  # bitsandbytes' CPU repacking fails on the tiny model's shapes (docs/memory.md)
        return PeftModel.from_pretrained(base, folder / "adapter").eval()

    ids = torch.tensor([[1, 40, 41, 42, 300, 301, 302, 7]])
    with torch.no_grad():
        sharded, alone = plain(folder)(input_ids=ids).logits, plain(one)(input_ids=ids).logits
    torch.testing.assert_close(sharded, alone, atol=1e-2, rtol=1e-3)


def wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 600) -> Path:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        for metrics in out.glob("*/metrics.jsonl"):
            if step in losses(metrics.parent):
                return metrics.parent
        time.sleep(0.1)
    raise TimeoutError(f"step {step} never came")


def ranks_of(proc: subprocess.Popen) -> dict[int, int]:
    """The launcher's ranks: rank -> pid."""
    out = {}
    for pid in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split():
        environ = dict(item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_text().split("\0")
                       if "=" in item)
        out[int(environ["RANK"])] = int(pid)
    return out


def test_a_rank_killed_then_resume_ends_with_the_uninterrupted_adapter(experiment, ddp, tmp_path):
    out = tmp_path / "killed"
    # slow steps: the tiny model's take ~0.1 s, and the last 6 could end before the kill lands on a loaded machine
    proc = start(experiment, out, "--gpus", "2", **with_site(tmp_path, SLOW_STEPS))
    folder = wait_for_step(out, 6, proc)
    os.kill(ranks_of(proc)[1], signal.SIGKILL)
    err = finish(proc, 1)
    # step 4's checkpoint, or step 8's when the ranks got that far between step 6's line and the kill
    (_, last) = last_checkpoint(folder / "checkpoints")
    assert last in (4, 8), err
    assert "rank 1 (SIGKILL) of 2 ended; the other ranks were stopped. The last complete checkpoint (step " \
           f"{last}) is intact. Resume with: fx run --resume {folder} --gpus 2" in err
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["failed_rank"] == 1 and not (folder / "adapter").exists()

    resumed = fx("run", "--resume", str(folder), "--gpus", "2")
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["resumed_from_step"] == last
    assert list(losses(folder)) == list(range(1, 13))  # each step exactly once
    assert_same_adapter(folder, ddp[0])


def test_sigterm_stops_every_rank_after_the_same_step_with_a_checkpoint(experiment, ddp, tmp_path):
    out = tmp_path / "stopped"
    # slow steps: the signal reaches the ranks through the launcher's shutdown (~0.3 s here, more on a loaded
    # machine), and the tiny model's last 10 steps could end before it (seen in CI: every rank done, nothing said)
    proc = start(experiment, out, "--gpus", "2", **with_site(tmp_path, SLOW_STEPS))
    folder = wait_for_step(out, 2, proc)
    proc.send_signal(signal.SIGTERM)  # the launcher passes it on to every rank
    err = finish(proc, 128 + signal.SIGTERM)
    assert f"checkpoint written. Resume with: fx run --resume {folder} --gpus 2" in err and "Traceback" not in err
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    checkpoint = folder / "checkpoints" / f"checkpoint-{summary['steps']}"
    manifest = json.loads((checkpoint / "fx-manifest.json").read_text())
    assert manifest["world"]["world_size"] == 2  # written once both ranks wrote theirs
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(manifest["files"])

    refused = fx("run", "--resume", str(folder), "--gpus", "2", "--set", "distributed.strategy=fsdp")
    assert refused.returncode == 2 and "can't load; resume with --gpus 2" in refused.stderr
    resumed = fx("run", "--resume", str(folder), "--gpus", "2")
    assert resumed.returncode == 0, resumed.stderr
    assert list(losses(folder)) == list(range(1, 13))
    assert_same_adapter(folder, ddp[0])


SIMULATED_OOM = '''
import os
if os.environ.get("RANK") == "1":  # rank 1 runs out of memory in its third step
    import torch
    import transformers

    step, calls = transformers.Trainer.training_step, []

    def training_step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return step(self, *args, **kwargs)

    transformers.Trainer.training_step = training_step
'''


def test_out_of_memory_on_one_rank_is_reported_with_that_rank(experiment, tmp_path):
    out = tmp_path / "oom"
    proc = start(experiment, out, "--gpus", "2", "--set", "checkpoints.every_steps=1",
                 **with_site(tmp_path, SIMULATED_OOM))
    err = finish(proc, 1)
    folder = only_run(out)
    assert "out of GPU memory on rank 1 (GPU 1) of 2 at step 3" in err and "The last checkpoint (step 2)" in err
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "out_of_memory" and summary["failed_rank"] == 1
    assert "on rank 1" in summary["error"]


def test_fx_bench_measures_the_ranks_and_their_scaling(experiment, tmp_path):
    runs = {n: tmp_path / f"bench-{n}.json" for n in (1, 2)}
    for n, result in runs.items():
        done = fx("bench", str(experiment), "--steps", "3", "--warmup", "1", "--out", str(result), "--gpus", str(n))
        assert done.returncode == 0, done.stderr
    two = json.loads(runs[2].read_text())
    assert two["world_size"] == 2 and two["strategy"] == "ddp" and len(two["results"]["per_rank"]) == 2
    # every rank's tokens: a step trains the whole batch, as one process's does
    assert two["results"]["tokens_per_step_mean"] == json.loads(runs[1].read_text())["results"]["tokens_per_step_mean"]
    compared = fx("bench", "--result", str(runs[2]), "--compare", str(runs[1]))
    assert compared.returncode == 0 and "scaling: 2 GPUs (ddp)" in compared.stdout and "efficiency" in compared.stdout
