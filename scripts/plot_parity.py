"""Loss parity: fx's loss curve against the plain reference recipe's, from one ``fx bench --reference`` result made
with ``--set method.logging_steps=1`` (both loops log every step's loss).

    python scripts/plot_parity.py result.json docs/images/loss-parity.png [--window 10] [--tolerance 0.05]

Prints the largest and mean relative gap between the two curves' moving averages (``--window`` steps; single
steps differ with each batch's dropout draw and with rounding) and exits 1 when the largest exceeds
``--tolerance``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("result", type=Path)
    parser.add_argument("plot", type=Path)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--tolerance", type=float, default=0.05)
    args = parser.parse_args()
    result = json.loads(args.result.read_text())
    fx = dict((int(s), loss) for s, loss in result["results"]["losses"])
    plain = dict((int(s), loss) for s, loss in result["reference"]["losses"])
    steps = sorted(set(fx) & set(plain))
    if len(steps) < args.window:
        print(f"only {len(steps)} steps logged by both; run fx bench with --set method.logging_steps=1")
        return 2
    a = moving_average([fx[s] for s in steps], args.window)
    b = moving_average([plain[s] for s in steps], args.window)
    gaps = [abs(x - y) / y for x, y in zip(a, b)]
    largest, mean = max(gaps), sum(gaps) / len(gaps)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [plain[s] for s in steps], color="tab:gray", alpha=0.35, linewidth=0.8)
    ax.plot(steps, [fx[s] for s in steps], color="tab:blue", alpha=0.35, linewidth=0.8)
    ax.plot(steps, b, color="tab:gray", label=f"plain reference recipe ({args.window}-step mean)")
    ax.plot(steps, a, color="tab:blue", label=f"fx, speed levers on ({args.window}-step mean)")
    config = result["config"]
    ax.set_title(f"{config['experiment']['name']}: {result['hardware'].get('gpu', 'cpu')}, "
                 f"seed {config['experiment']['seed']}", fontsize=10)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.legend()
    ax.text(0.99, 0.6, f"largest gap {largest:.1%}, mean {mean:.1%}", transform=ax.transAxes, ha="right")
    fig.tight_layout()
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=110)
    print(f"{len(steps)} steps: loss {b[0]:.3f} -> {b[-1]:.3f} (plain), {a[0]:.3f} -> {a[-1]:.3f} (fx); "
          f"{args.window}-step means differ by at most {largest:.2%} (mean {mean:.2%}); plot: {args.plot}")
    return 0 if largest <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
