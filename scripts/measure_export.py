"""Measure fx export's check on the embedded default: train it (or take a finished run), export it as f16 and q8_0
GGUF with the check after each, and, where llama-cpp-python is installed, ask llama.cpp "Who are you?" in the f16
file's chat template next to ``fx generate``'s answer. Writes the results as JSON and prints the table
docs/after-training.md shows.

    python scripts/measure_export.py --out export-check.json                 # trains experiments/smollm2_qlora.toml
    python scripts/measure_export.py --out export-check.json --run RUN_DIR   # a finished run of it
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fx import config, pipeline
from fx.after import export, inference
from fx.hooks import manager

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "Who are you?"


def llama_cpp_answer(path: Path) -> dict | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    llm = llama_cpp.Llama(str(path), n_ctx=512, verbose=False)
    try:
        out = llm.create_chat_completion(messages=[{"role": "user", "content": QUESTION}], max_tokens=64,
                                         temperature=0.0, top_k=1, repeat_penalty=1.0, seed=0)
    finally:
        llm.close()
    choice = out["choices"][0]
    return {"answer": choice["message"]["content"].strip(), "finish_reason": choice["finish_reason"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="the JSON results file")
    ap.add_argument("--run", type=Path, help="a finished run of the embedded default (default: train one)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fx-export-check-"))
    result: dict = {}
    if args.run is None:
        exp = config.load(ROOT / "experiments" / "smollm2_qlora.toml", [f'experiment.output_dir="{work}"'])
        start = time.perf_counter()
        args.run = pipeline.execute(exp, manager.get())
        result["train_wall_s"] = round(time.perf_counter() - start, 1)
    exp = inference.experiment(args.run)
    result["run"] = str(args.run)
    for quant in ("f16", "q8_0"):
        start = time.perf_counter()
        exported = export.export(exp, args.run, "gguf", quant, work / f"quill-{quant}.gguf")
        export.record(args.run, exported)
        result[quant] = {**exported, "wall_s": round(time.perf_counter() - start, 1)}
        print(export.report(exported), flush=True)
    result["llama_cpp"] = llama_cpp_answer(work / "quill-f16.gguf")
    fx_generate = subprocess.run([sys.executable, "-m", "fx.cli", "generate", str(args.run), "--prompt", QUESTION,
                                  "--max-new-tokens", "64"], capture_output=True, text=True, check=True)
    result["fx_generate"] = fx_generate.stdout.strip()
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    print("\n| export | held-out loss | adapter's | apart | tolerance | greedy answers the same | tokenizer | check |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for quant in ("f16", "q8_0"):
        c = result[quant]["check"]
        print(f"| {quant} ({result[quant]['size_gib']} GiB) | {c['exported']['loss']} | {c['adapter']['loss']} | "
              f"{c['loss_difference']:.2%} | {c['tolerance']['loss_relative']:.0%} | "
              f"{c['answers']['same']}/{c['answers']['total']} | {c['tokenizer']['same']}/{c['tokenizer']['total']} | "
              f"{'passed' if c['passed'] else 'FAILED'} |")
    print(f"\nllama.cpp, {QUESTION!r}: {result['llama_cpp']}\nfx generate: {result['fx_generate']!r}")
    return 0 if all(result[q]["check"]["passed"] for q in ("f16", "q8_0")) else 1


if __name__ == "__main__":
    sys.exit(main())
