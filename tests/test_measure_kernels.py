"""scripts/measure_kernels.py: every variant it measures is a valid experiment, and its table is made from whatever
results there are (a failed worker's too), with the ratios against Unsloth and the plain recipe."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import ROOT
from fx import config
from fx.training import budget

sys.path.insert(0, str(ROOT / "scripts"))
import kernel_workers  # noqa: E402
import measure_kernels  # noqa: E402

BENCH = ROOT / "experiments" / "llama2_qlora_bench.toml"


@pytest.mark.parametrize("recipe", list(measure_kernels.RECIPES))
@pytest.mark.parametrize("variant", list(kernel_workers.FX_VARIANTS))
def test_every_fx_variant_is_an_experiment_that_fits_the_t4(recipe, variant):
    _, sets = kernel_workers.FX_VARIANTS[variant]
    fitted = budget.fit(config.load(BENCH, [*measure_kernels.recipe_sets(recipe), *sets]))
    s = fitted.exp.method.settings
    lora = measure_kernels.RECIPES[recipe]
    assert (s.lora.r, s.lora.dropout, list(s.lora.target_modules)) == (lora["r"], lora["lora_dropout"],
                                                                       lora["target_modules"])
    assert fitted.fits
    if "auto" in variant:  # resolved to the fewest layers the budget needs
        assert isinstance(s.gradient_checkpointing, int) and not isinstance(s.gradient_checkpointing, bool)


def test_the_table_compares_with_unsloth_and_the_plain_recipe(tmp_path):
    results = tmp_path / "results"
    rows = [
        {"kind": "plain", "recipe": "qv", "variant": "plain", "kernel_us_per_token": 200.0, "tokens_per_s": 2000.0,
         "timed_steps": 250, "peak_reserved_gib": 6.0},
        {"kind": "unsloth", "recipe": "qv", "variant": "unsloth", "kernel_us_per_token": 140.0, "tokens_per_s": 4000.0,
         "timed_steps": 250, "peak_reserved_gib": 5.0},
        {"kind": "fx", "recipe": "qv", "order": 0, "variant": "fx auto", "kernel_us_per_token": 70.0,
         "tokens_per_s": 8000.0, "timed_steps": 250, "peak_reserved_gib": 5.5, "plan_reserved_gib": 5.4,
         "categories_us_per_token": {"dequantise": 5.0, "matmul": 40.0}},
        {"kind": "fx", "recipe": "all", "order": 1, "variant": "fx sdpa", "error": "OutOfMemoryError: boom"},
        {"kind": "unsloth", "recipe": "all-recipes", "variant": "unsloth-all worker", "error": "ImportError: x"},
    ]
    for i, row in enumerate(rows):
        measure_kernels.write_json(results / f"{i}.json", row)
    measure_kernels.table(tmp_path)
    table = (tmp_path / "table.md").read_text()
    assert "| qv | fx auto | 70.0 | 0.50x | 8000 | 250 | 4.00x | 5.50 | 5.4 | 5.0 / 40.0 / 0.0 / 0.0 |" in table
    assert "| all | fx sdpa | failed: OutOfMemoryError: boom |" in table
    assert "unsloth-all worker | failed: 'ImportError: x'" in table
    assert len(json.loads((tmp_path / "summary.json").read_text())) == 5
