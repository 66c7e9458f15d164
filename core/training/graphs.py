"""CUDA graphs for padding-free training steps: a step's forward, loss and backward captured once per length bucket
and replayed with one launch (docs/performance.md, "CUDA graphs").

A packed batch is copied into static buffers padded to the next multiple of ``BUCKET`` tokens with filler sequences
that attend only to themselves and carry no label; gradients are added inside the graph into buffers that stay
attached as ``.grad``. A capture that fails is reported once and the run goes on with eager steps.
"""

from __future__ import annotations

import gc
import math
import time
import warnings
from dataclasses import dataclass
from typing import Any

BUCKET = 128  # tokens: the padded lengths are multiples of this; a step pads at most BUCKET - 1 + fillers tokens
# a padding-free batch's keys (trl's collator; seq_idx, each token's sequence, from newer transformers collators)
PACKED_KEYS = {"input_ids", "labels", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k",
               "seq_idx"}
OUTPUTS = ("log_probs", "entropy", "is_top1")  # trl's SFT outputs: the loss, and the entropy and accuracy it logs


def bucket_length(tokens: int, rows: int, slots: int, bucket: int = BUCKET) -> int:
    """The padded length for ``tokens`` tokens in ``rows`` sequences: room for ``slots - rows`` filler sequences of
    at least one token each, rounded up to a multiple of ``bucket``."""
    return math.ceil((tokens + slots - rows) / bucket) * bucket


def filler_lengths(tokens: int, rows: int, slots: int, length: int) -> list[int]:
    """The filler sequences that pad ``tokens`` tokens in ``rows`` sequences to ``length`` tokens in ``slots``."""
    fill = slots - rows
    if fill < 1 or length - tokens < fill:
        raise ValueError(f"{tokens} tokens in {rows} rows don't pad to {length} tokens in {slots} sequences")
    return [1] * (fill - 1) + [length - tokens - (fill - 1)]


def packed_lengths(inputs: dict[str, Any]) -> list[int]:
    """The sequence lengths of a padding-free batch (from its boundaries, else from where positions restart)."""
    import torch

    cu = inputs.get("cu_seq_lens_q")
    if cu is not None:
        return torch.diff(cu.flatten()).tolist()
    positions = inputs["position_ids"][0]
    starts = (positions == 0).nonzero().flatten().tolist() + [positions.numel()]
    return [b - a for a, b in zip(starts, starts[1:])]


def is_packed(inputs: dict[str, Any]) -> bool:
    """Whether ``inputs`` is a padding-free batch this module can pad: one row, restarting positions, no mask."""
    return ("position_ids" in inputs and "attention_mask" not in inputs and set(inputs) <= PACKED_KEYS
            and inputs["input_ids"].dim() == 2 and inputs["input_ids"].shape[0] == 1)


def block_causal_mask(cu, length: int):
    """A (1, 1, length, length) boolean mask: each token sees the tokens of its own sequence up to itself. Built
    from the boundaries ``cu`` with tensor operations only, so it can be captured."""
    import torch

    index = torch.arange(length, device=cu.device)
    sequence = torch.searchsorted(cu[1:].contiguous(), index, right=True)
    same = sequence[:, None] == sequence[None, :]
    return (same & (index[:, None] >= index[None, :]))[None, None]


@dataclass
class Static:
    """One bucket's buffers: what is copied in before a replay and read out after it."""
    input_ids: Any
    labels: Any
    position_ids: Any
    cu: Any
    longest: int  # no sequence of the step is longer: the attention kernels' max_length (their grid)
    divisor: Any  # the loss's denominator: answer tokens of the whole batch (x the accumulation divisor)
    graph: Any = None
    outputs: Any = None  # (loss, entropy sum, correct, scored)


def capture(run, pool, stream):
    """``run()`` captured into a new CUDA graph on ``stream``, its memory from ``pool``: ``(graph, outputs)``.

    A capture that fails in ``capture_end`` (cudaStreamEndCapture's error, after anything the capture can't hold, a
    synchronisation for one) raises before CUDA's default generator leaves capture mode, and every eager random op
    after it (dropout: the run goes on eagerly) fails with "Offset increment outside graph capture encountered
    unexpectedly". So after a failure one kernel is captured, which ends the generator's capture, before the error
    is raised."""
    import torch

    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.stream(stream):
            graph.capture_begin(pool=pool)
            try:
                outputs = run()
            finally:
                graph.capture_end()
    except Exception:
        torch.cuda.synchronize()
        ending = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream):
            ending.capture_begin()
            torch.empty(1, device="cuda").zero_()
            ending.capture_end()
        raise
    return graph, outputs


def warm_up(run, stream):
    """``run()`` eagerly on ``stream``, the stream its captures will use, before the first of them (as PyTorch's
    CUDA-graph recipes warm up): the autograd nodes it leaves behind (a parameter's AccumulateGrad lives as long as
    any autograd graph that reaches it) then belong to the capture's stream, and a capture that meets one doesn't
    synchronise with the default stream ("The AccumulateGrad node's stream does not match...", then "operation failed
    due to a previous error during capture")."""
    import torch

    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        outputs = run()
    torch.cuda.current_stream().wait_stream(stream)
    return outputs


def forward_backward(backbone, head, static: Static, params, grads, *, varlen: bool, amp_dtype, scale=None):
    """One padded step: the loss over the answer tokens, its gradients added to ``grads`` (in place); returns the
    loss (unscaled), the entropy summed over scored tokens, how many were predicted right, and how many scored.

    The same computation as trl's SFTTrainer with its fused LM head (trl 1.16): per-token log-probabilities from
    the chunked LM-head kernel without the full logits, summed and divided by the batch's answer tokens."""
    import torch
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    length = static.input_ids.shape[1]
    if varlen:
        # a 4-D mask is taken as given: transformers builds none, and fx_varlen ignores it for packed rows
        extra = dict(attention_mask=torch.ones(1, 1, 1, 1, dtype=torch.bool, device=static.cu.device),
                     cu_seq_lens_q=static.cu, cu_seq_lens_k=static.cu, max_length_q=static.longest,
                     max_length_k=static.longest)
    else:
        extra = dict(attention_mask=block_causal_mask(static.cu, length))
    device_type = static.input_ids.device.type
    with torch.autocast(device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None,
                        cache_enabled=False):
        hidden = backbone(input_ids=static.input_ids, position_ids=static.position_ids, use_cache=False,
                          **extra).last_hidden_state
        targets = static.labels[0, 1:]
        scored = targets != -100
        log_probs, entropy, _, _, top1 = ChunkedLogProbFunction.apply(
            hidden[0, :-1], head.weight, head.bias, targets.clamp(min=0), 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0,
            OUTPUTS)
    loss = -(log_probs * scored).sum() / static.divisor
    new = torch.autograd.grad(loss * scale if scale is not None else loss, params)
    torch._foreach_add_(grads, [g.to(b.dtype) for g, b in zip(new, grads)])
    return (loss.detach(), (entropy.detach() * scored).sum(), (top1 & scored).sum(), scored.sum())


class GraphedSteps:
    """A trainer's padding-free steps as CUDA graphs, one per bucket (see the module's docstring). ``step`` trains
    on one packed micro-batch and returns what ``Trainer.training_step`` returns; ``None`` when it can't
    (the caller then runs the trainer's own step)."""

    def __init__(self, model, rows: int, bucket: int = BUCKET, capture: bool = True, longest: int | None = None):
        import torch

        from fx.training.attention import NAMES

        self.model = model
        causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model  # under peft's wrapper
        self.backbone = getattr(causal_lm, causal_lm.base_model_prefix)  # the decoder stack, without the LM head
        self.head = causal_lm.get_output_embeddings()
        self.varlen = causal_lm.config._attn_implementation in NAMES  # else SDPA with a block mask
        self.slots = rows + 1  # at least one filler sequence, so that every bucket has the same number of sequences
        self.bucket = bucket
        # the longest row a step can hold (the trainer's max_length): with the fillers (at most a bucket each), the
        # bound a captured step gives the varlen kernels, whose grid covers it for every sequence of the step
        self.longest = longest
        self.capture = capture  # False: the same padded steps, eagerly (a CPU, or tests)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.grads = [torch.zeros_like(p) for p in self.params]
        self.static: dict[int, Static] = {}
        self.pool = None
        self.stream = None
        self.reserved: list[tuple[int, float]] = []  # (bucket, GiB reserved after its capture)
        self.warm = False
        self.failed: str | None = None
        self.captures = 0
        self.capture_s = 0.0  # wall time spent capturing (the step's CPU work, once per bucket)
        self.replays = 0
        self.eager = 0  # padded steps run eagerly (the warm-up; every step without capture)
        self.passed = 0  # micro-batches left to the trainer's own step (not packed, or more rows than slots)
        self.pending: list[Any] = []  # per step (entropy sum, correct, scored), read when the trainer logs

    def step(self, trainer, inputs: dict[str, Any], num_items_in_batch=None):
        import torch

        if self.failed or not is_packed(inputs):
            self.passed += 1
            return None
        lengths = packed_lengths(inputs)
        if len(lengths) >= self.slots or (self.longest and max(lengths) > self.longest):
            self.passed += 1
            return None
        tokens = inputs["input_ids"].shape[1]
        length = bucket_length(tokens, len(lengths), self.slots, self.bucket)
        device = self.params[0].device
        static = self.static.get(length)
        if static is None:
            static = self.static[length] = Static(
                input_ids=torch.zeros(1, length, dtype=torch.long, device=device),
                labels=torch.full((1, length), -100, dtype=torch.long, device=device),
                position_ids=torch.zeros(1, length, dtype=torch.long, device=device),
                cu=torch.zeros(self.slots + 1, dtype=torch.int32, device=device),
                longest=min(length, max(self.longest or length, self.bucket)),
                divisor=torch.ones((), dtype=torch.float32, device=device))
        self._fill(static, inputs, lengths, tokens, length, trainer, num_items_in_batch)
        self._attach_grads()
        scaler = getattr(trainer.accelerator, "scaler", None)
        scale = None
        if scaler is not None and scaler.is_enabled():
            if scaler._scale is None:
                scaler._lazy_init_scale_growth_tracker(device)
            scale = scaler._scale
        amp_dtype = torch.float16 if trainer.args.fp16 else torch.bfloat16 if trainer.args.bf16 else None
        run = lambda: forward_backward(self.backbone, self.head, static, self.params, self.grads,  # noqa: E731
                                       varlen=self.varlen, amp_dtype=amp_dtype, scale=scale)
        self.model.train()
        if not self.capture or not self.warm:
            outputs = run() if not self.capture else warm_up(run, self._capture_stream())
            self.warm = True
            self.eager += 1
        else:
            if static.graph is None:
                self._capture(static, run)
            if static.graph is None:  # the capture failed: this step, and the rest, eagerly
                self.passed += 1
                return None
            static.graph.replay()
            self.replays += 1
            outputs = static.outputs
        loss, *metrics = outputs
        self.pending.append(torch.stack([m.float() for m in metrics]))
        trainer._total_train_tokens = getattr(trainer, "_total_train_tokens", 0) + tokens
        return loss.clone()

    def _fill(self, static: Static, inputs, lengths, tokens, length, trainer, num_items_in_batch):
        import torch

        fillers = filler_lengths(tokens, len(lengths), self.slots, length)
        static.input_ids[:, :tokens].copy_(inputs["input_ids"])
        static.input_ids[:, tokens:].fill_(0)
        static.labels[:, :tokens].copy_(inputs["labels"])
        static.labels[:, tokens:].fill_(-100)
        static.position_ids[:, :tokens].copy_(inputs["position_ids"])
        positions = torch.cat([torch.arange(n) for n in fillers])
        static.position_ids[0, tokens:].copy_(positions)
        bounds = [0]
        for n in lengths + fillers:
            bounds.append(bounds[-1] + n)
        static.cu.copy_(torch.tensor(bounds, dtype=torch.int32))
        # the denominator trl and the Trainer would use: the batch's answer tokens, and the accumulation steps
        # when the loss isn't already normalised over the whole batch
        if num_items_in_batch is None:
            divisor = (inputs["labels"][0, 1:] != -100).sum().float()
        else:
            divisor = torch.as_tensor(num_items_in_batch, dtype=torch.float32)
        if not loss_scaled_for_accumulation(trainer, num_items_in_batch):
            divisor = divisor * trainer.current_gradient_accumulation_steps
        static.divisor.copy_(divisor.clamp(min=1) * trainer.accelerator.gradient_accumulation_steps)

    def _attach_grads(self) -> None:
        """Make the gradient buffers the weights' ``.grad``: zeroed when the trainer has cleared the gradients
        (a new optimizer step), taking over any gradient an eager step left."""
        import torch

        if any(p.grad is None for p in self.params):
            torch._foreach_zero_(self.grads)
        for p, g in zip(self.params, self.grads):
            if p.grad is not None and p.grad is not g:
                g.copy_(p.grad)
            p.grad = g

    def _capture_stream(self):
        """One capture stream for every graph and for the warm-up: the allocator reuses a freed block only on the
        stream that freed it, so a stream per capture would give each graph memory of its own."""
        import torch

        if self.stream is None:
            self.stream = torch.cuda.Stream()
        return self.stream

    def _capture(self, static: Static, run) -> None:
        import torch

        started = time.perf_counter()
        if self.pool is None:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()  # the eager warm-up's cached blocks: the graphs have a pool of their own
            self.pool = torch.cuda.graph_pool_handle()
        # an earlier eager step's autograd graph still alive (in a reference cycle not yet collected) holds its
        # parameters' AccumulateGrad nodes, each tied to the stream it was made on: a capture meeting one made on the
        # default stream synchronises with it and fails. So the cycles are collected first, once per bucket (as
        # torch.cuda.graph does under TORCH_CUDAGRAPH_GC=1).
        gc.collect()
        stream = self._capture_stream()
        stream.wait_stream(torch.cuda.current_stream())
        try:
            graph, outputs = capture(run, self.pool, stream)
        except Exception as exc:  # noqa: BLE001 - any failure: report once, train on eagerly
            self.failed = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if self.failed:
            # every later step runs eagerly: the graphs captured so far, and the failed capture's blocks in their
            # pool (its graph went with the exception), give their memory back to the eager steps
            for kept in self.static.values():
                kept.graph = kept.outputs = None
            self.pool = None
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            warnings.warn(f"method.cuda_graphs: capturing a training step failed ({self.failed}); "
                          "the run continues with eager steps", stacklevel=2)
            return
        torch.cuda.current_stream().wait_stream(stream)
        static.graph, static.outputs = graph, outputs
        self.captures += 1
        self.capture_s += time.perf_counter() - started
        self.reserved.append((static.input_ids.shape[1], round(torch.cuda.memory_reserved() / 2**30, 3)))

    def release(self) -> None:
        """Give back the graphs' memory (their pool, the gradient buffers) once training is over: evaluation,
        generation and merging come after it in the same process."""
        for p, g in zip(self.params, self.grads):
            if p.grad is g:
                p.grad = None
        self.static.clear()
        self.grads, self.pending, self.pool, self.stream = [], [], None, None
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def stats(self) -> dict[str, Any]:
        """What the graphs did, for a benchmark's result."""
        return {"captures": self.captures, "capture_s": round(self.capture_s, 3), "replays": self.replays,
                "eager_padded_steps": self.eager, "trainer_steps": self.passed, "buckets": sorted(self.static),
                "reserved_after_capture_gib": self.reserved, "failed": self.failed}

    def flush_metrics(self, metrics: dict[str, list[float]]) -> None:
        """Put the steps' entropy and accuracy where trl's logging averages them (one synchronisation per log)."""
        if not self.pending:
            return
        import torch

        for entropy, correct, scored in torch.stack(self.pending).tolist():
            metrics["entropy"].append(entropy / scored if scored else 0.0)
            metrics["mean_token_accuracy"].append(correct / scored if scored else 0.0)
        self.pending.clear()


def loss_scaled_for_accumulation(trainer, num_items_in_batch) -> bool:
    """Whether the Trainer leaves the loss undivided by the accumulation steps (it is already the whole batch's
    mean), as ``Trainer.training_step`` decides it."""
    decided = getattr(trainer, "loss_is_scaled_for_ga", None)
    if decided is not None:
        return decided
    return ((trainer.model_accepts_loss_kwargs and num_items_in_batch is not None)
            or trainer.compute_loss_func is not None)
