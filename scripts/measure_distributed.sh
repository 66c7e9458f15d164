#!/usr/bin/env bash
# The multi-GPU measurements of issue 21 (docs/distributed.md, "Measuring on GPUs"), one part per call so that each
# stays within a 10-minute command; results (fx bench JSON, fx plan --json, logs) go into $OUT.
#
#   bash scripts/measure_distributed.sh ddp1       # experiments/llama2_qlora_bench.toml on 1 GPU (graphs on, and off)
#   bash scripts/measure_distributed.sh ddp2       # the same on 2 GPUs (DDP), and its scaling against 1
#   bash scripts/measure_distributed.sh weights70  # write the random llama2-70b weights into $FX_CACHE (~129 GiB)
#   bash scripts/measure_distributed.sh fsdp70     # FSDP-QLoRA llama2-70b, 20 steps on 2 GPUs capped at 22 GiB each
#   bash scripts/measure_distributed.sh t4x2       # llama2-13b FSDP on 2 GPUs capped as two T4s (14.5 GiB each)
#   bash scripts/measure_distributed.sh resume     # kill -9 of rank 1, --resume, the adapter against the whole run
#   bash scripts/measure_distributed.sh compare    # the planner's per-rank totals against the measured peaks
#
# FX (default .venv/bin/fx, else fx on PATH) and PY (default .venv/bin/python) choose the installation.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-distributed-results}
FX=${FX:-$( [ -x .venv/bin/fx ] && echo .venv/bin/fx || echo fx )}
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
BENCH=experiments/llama2_qlora_bench.toml
FSDP=experiments/llama2_70b_fsdp.toml
T4_KEYS=(model.architecture=llama2-13b budget.vram_gib=14.5)
T4=(--set "${T4_KEYS[0]}" --set "${T4_KEYS[1]}")
mkdir -p "$OUT"
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}

plan() {  # plan NAME ARGS...: fx plan --json into $OUT/plan-NAME.json (exit 2 when it doesn't fit: kept)
    local name=$1; shift
    "$FX" plan "$@" --json > "$OUT/plan-$name.json" 2> "$OUT/plan-$name.err" || true
    "$PY" -c "import json,sys; t=open(sys.argv[1]).read(); d=json.loads(t[t.index('{'):]);
print(sys.argv[2], 'plan per rank:', d['total_gib'], 'GiB, fits', d['budget'], ':', d['fits'])" \
        "$OUT/plan-$name.json" "$name"
}

weights() {  # weights FILE [KEY=VALUE...]: write a random architecture's weights into the cache, before any timing
    "$PY" -c "import sys; from fx import config; e = config.load(sys.argv[1], sys.argv[2:]);
print(e.model.cls(e.model.settings).path())" "$@"
}

case "${1:-}" in
ddp1)
    nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpus.txt"
    weights "$BENCH"
    plan ddp-1 "$BENCH"
    "$FX" bench "$BENCH" --steps 40 --warmup 3 --out "$OUT/ddp-1.json"
    # the 2-GPU run has no CUDA graphs (they bypass DDP's reduction): one GPU without them is the fair baseline
    "$FX" bench "$BENCH" --steps 40 --warmup 3 --set method.cuda_graphs=false --out "$OUT/ddp-1-eager.json"
    ;;
ddp2)
    plan ddp-2 "$BENCH" --gpus 2 --set distributed.strategy=ddp
    "$FX" bench "$BENCH" --gpus 2 --set distributed.strategy=ddp --steps 40 --warmup 3 --out "$OUT/ddp-2.json"
    for base in ddp-1 ddp-1-eager; do
        "$FX" bench --result "$OUT/ddp-2.json" --compare "$OUT/$base.json" | tee "$OUT/scaling-vs-$base.txt" || true
    done
    ;;
weights70)
    df -h "${FX_CACHE:-$HOME/.cache/fx}" 2>/dev/null || df -h "$HOME"
    time weights "$FSDP"
    ;;
fsdp70)
    plan fsdp70-1 "$FSDP"
    plan fsdp70-2 "$FSDP" --gpus 2
    "$FX" bench "$FSDP" --gpus 2 --steps 20 --warmup 2 --out "$OUT/fsdp70-2.json" 2>&1 | tee "$OUT/fsdp70-2.log"
    ;;
t4x2)
    weights "$FSDP" "${T4_KEYS[@]}"
    plan t4x2-1 "$FSDP" "${T4[@]}"
    plan t4x2-2 "$FSDP" "${T4[@]}" --gpus 2
    "$FX" bench "$FSDP" "${T4[@]}" --gpus 2 --steps 20 --warmup 2 --out "$OUT/t4x2-2.json" 2>&1 \
        | tee "$OUT/t4x2-2.log"
    ;;
resume)
    # 30 steps of the 7B bench on 2 GPUs (DDP), a checkpoint every 10: once whole, once with rank 1 killed at step 15
    RUN=(--gpus 2 --set distributed.strategy=ddp --set method.max_steps=30 --set checkpoints.every_steps=10
         --set stages.generate.enabled=false --set stages.evaluate.enabled=false --set method.logging_steps=1)
    rm -rf "$OUT/resume-whole" "$OUT/resume-killed"
    "$FX" run "$BENCH" "${RUN[@]}" --set "experiment.output_dir=$OUT/resume-whole"
    "$FX" run "$BENCH" "${RUN[@]}" --set "experiment.output_dir=$OUT/resume-killed" 2> "$OUT/resume-killed.err" &
    launcher=$!
    until grep -qs '"step": 15,' "$OUT"/resume-killed/*/metrics.jsonl; do
        kill -0 "$launcher" 2>/dev/null || { echo "the run ended before step 15" >&2; exit 1; }
        sleep 1
    done
    for pid in $(cat "/proc/$launcher/task/$launcher/children"); do  # the rank whose environment says RANK=1
        if tr '\0' '\n' < "/proc/$pid/environ" | grep -qx RANK=1; then kill -9 "$pid"; echo "killed rank 1 ($pid)"; fi
    done
    code=0; wait "$launcher" || code=$?
    echo "the launcher ended with $code (expected 1):"; tail -3 "$OUT/resume-killed.err"
    folder=$(ls -d "$OUT"/resume-killed/*/)
    "$FX" run --resume "$folder" --gpus 2
    "$PY" - "$OUT"/resume-whole/*/ "$folder" <<'EOF' | tee "$OUT/resume.txt"
import json, sys
from pathlib import Path
from safetensors.torch import load_file
whole, resumed = map(Path, sys.argv[1:3])
a, b = (load_file(f / "adapter" / "adapter_model.safetensors") for f in (whole, resumed))
diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
size = max(a[k].float().abs().max().item() for k in a)
steps = [json.loads(x) for x in (resumed / "metrics.jsonl").read_text().splitlines()]
summary = json.loads((resumed / "summary.json").read_text())
print(f"resumed from step {summary.get('resumed_from_step')}, status {summary['status']}; "
      f"steps logged: {sorted(s['step'] for s in steps if 'loss' in s and 'step' in s)}")
print(f"adapter: largest difference {diff:.3g} (largest weight {size:.3g}); same keys: {a.keys() == b.keys()}")
EOF
    ;;
compare)
    "$PY" - "$OUT" <<'EOF' | tee "$OUT/planner-vs-measured.txt"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = []
for plan, bench in [("ddp-1", "ddp-1"), ("ddp-2", "ddp-2"), ("fsdp70-2", "fsdp70-2"), ("t4x2-2", "t4x2-2")]:
    p, b = out / f"plan-{plan}.json", out / f"{bench}.json"
    if not (p.is_file() and b.is_file()):
        continue
    text = p.read_text()
    planned = json.loads(text[text.index("{"):])
    measured = json.loads(b.read_text())["results"]
    ranks = measured.get("per_rank") or [{"rank": 0, "peak_reserved_gib": measured.get("peak_reserved_gib")}]
    for r in ranks:
        rows.append({"case": bench, "rank": r["rank"], "planned_reserved_gib": planned["reserved_gib"],
                     "planned_total_gib": planned["total_gib"], "measured_reserved_gib": r["peak_reserved_gib"],
                     "error_gib": round(r["peak_reserved_gib"] - planned["reserved_gib"], 3)})
for r in rows:
    print(f"{r['case']:>9} rank {r['rank']}: planned {r['planned_reserved_gib']:.2f} GiB in the allocator "
          f"({r['planned_total_gib']:.2f} total), measured {r['measured_reserved_gib']:.2f} ({r['error_gib']:+.2f})")
(out / "planner-vs-measured.json").write_text(json.dumps(rows, indent=2) + "\n")
EOF
    ;;
*)
    sed -n 2,13p "$0"
    exit 2
    ;;
esac
