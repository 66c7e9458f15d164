"""Measure each speed lever of qlora_sft on its own and together: one ``fx bench`` process per variant (a fresh
CUDA allocator each time), the plain reference recipe in the first, and a table of the results.

    python scripts/measure_speed.py experiments/llama2_qlora_bench.toml --out results/ [--only NAME ...]

Every number in docs/performance.md comes from this script; the JSON results of each variant land in --out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

OFF = ["method.padding_free=false", "method.liger=false", "method.attention=sdpa", "method.compile=false",
       "method.cuda_graphs=false"]
PF = [*OFF, "method.padding_free=true"]
# name -> --set assignments on top of the experiment; the first also runs the plain reference recipe
VARIANTS: dict[str, list[str]] = {
    "levers off": OFF,
    "padding-free (sdpa mask)": PF,
    "padding-free + varlen": [*PF, "method.attention=auto"],
    "padding-free + varlen + liger": [*PF, "method.attention=auto", "method.liger=true"],
    "padding-free + varlen + liger + graphs": [*PF, "method.attention=auto", "method.liger=true",
                                               "method.cuda_graphs=auto"],
    "padding-free + varlen + compile": [*PF, "method.attention=auto", "method.compile=true"],
    "padding-free + varlen + compile + graphs": [*PF, "method.attention=auto", "method.compile=true",
                                                 "method.cuda_graphs=auto"],
}


def bench(experiment: Path, name: str, sets: list[str], out: Path, args, reference: bool) -> dict | None:
    slug = name.replace(" + ", "+").replace(" ", "-")
    result = out / f"{slug}.json"
    cmd = ["fx", "bench", str(experiment), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--out", str(result)]
    cmd += [flag for s in sets + args.set for flag in ("--set", s)]
    if reference:
        cmd.append("--reference")
    if args.profile:
        cmd += ["--profile", str(out / f"{slug}.profile.txt")]
    print(f"\n=== {name}: {' '.join(cmd)}", flush=True)
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    (out / f"{slug}.log").write_text(proc.stdout + proc.stderr)
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-25:]
    print("\n".join(tail), flush=True)
    print(f"({time.perf_counter() - started:.0f} s, exit {proc.returncode})", flush=True)
    return json.loads(result.read_text()) if proc.returncode == 0 and result.exists() else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--only", action="append", help="run only these variants (names as in VARIANTS)")
    parser.add_argument("--extra", action="append", default=[], metavar="NAME=KEY=VALUE,KEY=VALUE",
                        help="an extra variant")
    parser.add_argument("--set", action="append", default=[], help="applied to every variant")
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument("--profile", action="store_true", help="write torch.profiler tables per variant")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    variants = {k: v for k, v in VARIANTS.items() if not args.only or k in args.only}
    for extra in args.extra:
        name, _, sets = extra.partition("=")
        variants[name] = sets.split(",")
    results, reference = {}, None
    for i, (name, sets) in enumerate(variants.items()):
        res = bench(args.experiment, name, sets, args.out, args, reference=i == 0 and not args.no_reference)
        results[name] = res
        if res and res.get("reference"):
            reference = res["reference"]
    rows = [("plain reference recipe", reference)] if reference else []
    rows += [(name, res["results"] if res else None) for name, res in results.items()]
    print(f"\n{'variant':34} {'tokens/s':>9} {'x plain':>8} {'all-steps':>9} {'tok/step':>8} {'step s':>7} "
          f"{'reserved':>9} {'allocated':>9}")
    for name, r in rows:
        if r is None:
            print(f"{name:34} failed (see its log)")
            continue
        ratio = f"{r['tokens_per_s'] / reference['tokens_per_s']:.2f}x" if reference else "-"
        print(f"{name:34} {r['tokens_per_s']:9.0f} {ratio:>8} {r['tokens_per_s_overall']:9.0f} "
              f"{r['tokens_per_step_mean']:8.0f} {r['step_s_median']:7.3f} {r.get('peak_reserved_gib', 0):9.2f} "
              f"{r.get('peak_allocated_gib', 0):9.2f}")
    (args.out / "summary.json").write_text(json.dumps({n: r for n, r in rows}, indent=1, default=str))
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
