"""Times causal variable-length attention, forward and backward, on packed micro-batches of the reference case's
shape (Llama 2 7B: 32 heads of 128, fp16; 4 rows a micro-batch, their lengths the bench's own: the `synthetic`
source's defaults, log-normal with mean 350 tokens and sigma 0.65, at most 1000), by each kernel fx can use and by
the memory-efficient kernel's settings:

    python scripts/measure_attention.py --out attention.json

``flash``: ``torch.nn.attention.varlen.varlen_attn`` (compute capability 8.0+). ``efficient``:
``torch.ops.aten._efficient_attention_forward/_backward`` with sequence offsets (fx's path below 8.0), bounded by
``max_length`` (what a graphed step passes) or by the micro-batch's own longest row, with its backward's key splits
left to PyTorch's heuristic or fixed. Gradients of every setting are compared with the default's. Reports
microseconds per token (CUDA events over ``--iters`` calls after ``--warmup``) and JSON to ``--out``. Written for
docs/performance.md (the memory-efficient kernel's key splits: no gain); results in benchmarks/attention-h100.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from fx.plugins.datasets.synthetic import SyntheticDataset


def batches(count: int, rows: int) -> list[list[int]]:
    lengths = SyntheticDataset(SyntheticDataset.Settings(rows=count * rows), Path.cwd()).lengths()
    return [lengths[i * rows:(i + 1) * rows] for i in range(count)]


def efficient(q, k, v, cu, max_len, splits, grad_out):
    out, lse, seed, offset, _, _ = torch.ops.aten._efficient_attention_forward(
        q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), None, cu, cu, max_len, max_len, 0.0, 1, True)
    if grad_out is None:
        return out, None
    grads = torch.ops.aten._efficient_attention_backward(
        grad_out.unsqueeze(0), q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), None, out, cu, cu, max_len, max_len,
        lse, 0.0, seed, offset, 1, False, num_splits_key=splits)
    return out, grads[:3]


def flash(q, k, v, cu, max_len, splits, grad_out):
    from fx.training.attention import _varlen
    varlen_attn, causal, _ = _varlen()
    q, k, v = (t.detach().requires_grad_(grad_out is not None) for t in (q, k, v))
    out = varlen_attn(q, k, v, cu, cu, max_len, max_len, **causal)
    if grad_out is None:
        return out, None
    return out, torch.autograd.grad(out, (q, k, v), grad_out)


def time_it(fn, args, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn(*args)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn(*args)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / iters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--out")
    args = parser.parse_args()
    device = torch.device("cuda")
    variants = [("efficient", "max_length", None), ("efficient", "max_length", 1), ("efficient", "max_length", 2),
                ("efficient", "max_length", 4), ("efficient", "longest", None), ("efficient", "longest", 1)]
    if torch.cuda.get_device_capability() >= (8, 0):
        variants.insert(0, ("flash", "max_length", None))
    totals = {v: {"fwd_us": 0.0, "fwd_bwd_us": 0.0, "max_grad_diff": 0.0} for v in variants}
    tokens = 0
    for i, lengths in enumerate(batches(args.batches, args.rows)):
        torch.manual_seed(i)
        n = sum(lengths)
        tokens += n
        q, k, v, grad_out = (torch.randn(n, 32, 128, device=device, dtype=torch.float16) for _ in range(4))
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=device, dtype=torch.int32)
        reference = efficient(q, k, v, cu, min(args.max_length, n), None, grad_out)[1]
        for variant in variants:
            kernel, bound, splits = variant
            fn = flash if kernel == "flash" else efficient
            # the kernels refuse a bound above the tokens there are
            max_len = min(args.max_length, n) if bound == "max_length" else max(lengths)
            totals[variant]["fwd_us"] += time_it(fn, (q, k, v, cu, max_len, splits, None), args.warmup, args.iters)
            totals[variant]["fwd_bwd_us"] += time_it(fn, (q, k, v, cu, max_len, splits, grad_out), args.warmup,
                                                     args.iters)
            grads = fn(q, k, v, cu, max_len, splits, grad_out)[1]
            diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(grads, reference))
            totals[variant]["max_grad_diff"] = max(totals[variant]["max_grad_diff"], diff)
    rows = []
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.batches} micro-batches of {args.rows} "
          f"rows, {tokens} tokens")
    print(f"{'kernel':<10} {'bound':<11} {'splits':<7} {'fwd us/token':>13} {'fwd+bwd us/token':>17} {'grad diff':>10}")
    for (kernel, bound, splits), t in totals.items():
        row = {"kernel": kernel, "bound": bound, "num_splits_key": splits,
               "fwd_us_per_token": round(t["fwd_us"] / tokens, 4),
               "fwd_bwd_us_per_token": round(t["fwd_bwd_us"] / tokens, 4), "max_grad_diff": t["max_grad_diff"]}
        rows.append(row)
        print(f"{kernel:<10} {bound:<11} {str(splits):<7} {row['fwd_us_per_token']:>13.4f} "
              f"{row['fwd_bwd_us_per_token']:>17.4f} {row['max_grad_diff']:>10.2e}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": tokens,
                       "heads": 32, "head_dim": 128, "dtype": "float16", "max_length": args.max_length,
                       "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
