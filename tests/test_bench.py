"""fx bench: the synthetic dataset, the comparison gate, and a real (tiny, CPU) benchmark run."""

from __future__ import annotations

import json
import statistics

from fx.cli import main
from fx.plugins.datasets.synthetic import SyntheticDataset


def test_synthetic_rows_are_seeded_and_shaped_like_guanaco(tmp_path):
    source = SyntheticDataset(SyntheticDataset.Settings(), tmp_path)
    lengths = source.lengths()
    assert len(lengths) == 1000 and max(lengths) <= 1000
    assert 330 <= statistics.mean(lengths) <= 370  # guanaco-llama2-1k averages ~350 tokens
    assert sum(n > 700 for n in lengths) >= 30  # a long tail
    a, _ = source.load()
    b, _ = SyntheticDataset(SyntheticDataset.Settings(), tmp_path).load()
    c, _ = SyntheticDataset(SyntheticDataset.Settings(seed=1), tmp_path).load()
    assert a["text"] == b["text"] != c["text"]
    from fx.plugins.templates.llama2 import Llama2

    turns = Llama2(Llama2.Settings()).parse_text(a["text"][0])
    assert [m["role"] for m in turns] == ["user", "assistant"]


def result(tokens_per_s=1000.0, reserved=6.0, allocated=5.5, gpu="NVIDIA H100 80GB HBM3", **method):
    config = {"experiment": {"name": "x", "seed": 0, "output_dir": "runs"}, "model": {"source": "random"},
              "data": {"source": "synthetic", "max_length": 1024},
              "method": {"name": "qlora_sft", "micro_batch_size": 4, "gradient_accumulation_steps": 1,
                         "gradient_checkpointing": True, **method}}
    return {"kind": "fx-bench", "hardware": {"cuda": True, "gpu": gpu, "gpu_memory_gib": 79.2}, "config": config,
            "results": {"tokens_per_s": tokens_per_s, "peak_reserved_gib": reserved, "peak_allocated_gib": allocated,
                        "step_s_median": 0.7}}


def compare(tmp_path, baseline, current, *extra):
    (tmp_path / "a.json").write_text(json.dumps(baseline))
    (tmp_path / "b.json").write_text(json.dumps(current))
    return main(["bench", "--result", str(tmp_path / "b.json"), "--compare", str(tmp_path / "a.json"), *extra])


def test_compare_passes_within_tolerance(tmp_path, capsys):
    assert compare(tmp_path, result(), result(tokens_per_s=970.0, reserved=6.2)) == 0
    assert "no regression beyond 5%" in capsys.readouterr().out


def test_compare_fails_on_a_planted_regression_with_a_table(tmp_path, capsys):
    # a smaller micro-batch: slower; checkpointing off: more memory. Same workload, so both are compared.
    slower = result(tokens_per_s=600.0, micro_batch_size=1, gradient_accumulation_steps=4)
    assert compare(tmp_path, result(), slower) == 1
    out = capsys.readouterr().out
    assert "REGRESSION" in out and "-40.0%" in out and "micro_batch_size: 4 -> 1" in out
    hungrier = result(tokens_per_s=1500.0, reserved=20.0, allocated=19.0, gradient_checkpointing=False)
    assert compare(tmp_path, result(), hungrier) == 1
    assert "peak GPU reserved (GiB), peak GPU allocated (GiB)" in capsys.readouterr().out
    assert compare(tmp_path, result(), slower, "--tolerance", "50%") == 0


def test_compare_refuses_other_hardware_or_workloads(tmp_path, capsys):
    assert compare(tmp_path, result(), result(gpu="NVIDIA A100-SXM4-80GB")) == 2
    assert "baseline ran on NVIDIA H100" in capsys.readouterr().err
    other = result()
    other["config"]["data"]["max_length"] = 512
    assert compare(tmp_path, result(), other) == 2
    assert "workloads differ (data.max_length: 1024 -> 512)" in capsys.readouterr().err
    (tmp_path / "junk.json").write_text("{}")
    assert main(["bench", "--result", str(tmp_path / "junk.json"), "--compare", str(tmp_path / "junk.json")]) == 2


def test_bench_runs_the_training_loop_and_compares_with_itself(tiny_experiment, tmp_path, capsys):
    out = tmp_path / "result.json"
    assert main(["bench", str(tiny_experiment), "--steps", "2", "--warmup", "1", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    r = data["results"]
    assert r["measured_steps"] == 2 and len(r["step_times_s"]) == 2
    assert r["tokens"] == sum(r["step_tokens"]) > 0 and r["tokens_per_s"] > 0
    assert data["config"]["method"]["name"] == "qlora_sft" and len(data["config_hash"]) == 16
    assert data["plan"]["total_gib"] > 0 and data["libraries"]["torch"]
    assert "tokens/s" in capsys.readouterr().out
    assert main(["bench", "--result", str(out), "--compare", str(out)]) == 0
