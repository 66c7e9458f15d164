"""CUDA-graphed steps (fx.training.graphs) pad a packed batch to a length bucket with filler sequences: the padding must
change nothing. On a CPU the padded steps run eagerly (nothing is captured), which checks the padding, the masks,
the loss and the gradient bookkeeping against the trainer's own step; on a GPU the same comparison runs with the
steps captured and replayed."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_EXPERIMENT, TINY_ROWS, has_cuda
from fx.training import graphs, sft
from test_speed import assert_same_training, train


def test_buckets_leave_room_for_a_filler_per_missing_row():
    assert graphs.bucket_length(100, 4, 5, 128) == 128
    assert graphs.bucket_length(128, 4, 5, 128) == 256  # no room for the filler: the next bucket
    assert graphs.bucket_length(125, 1, 5, 128) == 256  # 4 fillers of at least one token each
    assert graphs.filler_lengths(100, 4, 5, 128) == [28]
    assert graphs.filler_lengths(125, 1, 5, 256) == [1, 1, 1, 128]
    with pytest.raises(ValueError):
        graphs.filler_lengths(127, 1, 5, 128)


def test_block_causal_mask_keeps_each_sequence_to_itself():
    cu = torch.tensor([0, 2, 5, 6], dtype=torch.int32)
    mask = graphs.block_causal_mask(cu, 6)[0, 0]
    expected = torch.zeros(6, 6, dtype=torch.bool)
    for a, b in ((0, 2), (2, 5), (5, 6)):
        expected[a:b, a:b] = torch.ones(b - a, b - a).tril().bool()
    assert torch.equal(mask, expected)


@pytest.mark.skipif(has_cuda(), reason="exact comparison on a CPU; on a GPU the test below compares graphed steps")
def test_padded_steps_train_exactly_like_the_trainers_own(write_experiment, tmp_path, monkeypatch):
    """The padded step (fillers, a block mask built from the boundaries, trl's chunked LM-head loss, gradients
    added into buffers attached as .grad) gives the trainer's losses and adapter, with gradient accumulation too."""
    acc = ("method.micro_batch_size=2", "method.gradient_accumulation_steps=2")
    own = train(write_experiment, tmp_path, "own")
    own_acc = train(write_experiment, tmp_path, "own-acc", *acc)
    monkeypatch.setattr(sft, "uses_cuda_graphs", lambda settings: True)
    padded_steps, made = [], []
    step, init = graphs.GraphedSteps.step, graphs.GraphedSteps.__init__

    def counted(self, *args, **kwargs):
        loss = step(self, *args, **kwargs)
        padded_steps.append(loss is not None)
        return loss

    def recorded(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(graphs.GraphedSteps, "step", counted)
    monkeypatch.setattr(graphs.GraphedSteps, "__init__", recorded)
    padded = train(write_experiment, tmp_path, "padded")
    assert_same_training(own, padded)
    assert padded_steps == [True] * 4
    padded_acc = train(write_experiment, tmp_path, "padded-acc", *acc)
    assert_same_training(own_acc, padded_acc)
    assert len(padded_steps) > 4 + 4 and all(padded_steps)  # every micro-batch went through the padded step
    budget = train(write_experiment, tmp_path, "padded-budget", "method.micro_batch_tokens=8")
    assert_same_training(own, budget)
    assert len(padded_steps) > 4 + 4 + 4 + 4 and all(padded_steps)
    assert all(not steps.static for steps in made)  # every trainer released its padded steps when it finished


def test_cuda_graphs_true_needs_padding_free_and_a_gpu(write_experiment, tmp_path, capsys):
    from fx import cli

    path = write_experiment(TINY_EXPERIMENT, TINY_ROWS)
    base = ["run", str(path), "--set", f"experiment.output_dir={tmp_path / 'runs'}"]
    assert cli.main([*base, "--set", "method.cuda_graphs=true", "--set", "method.padding_free=false"]) == 2
    assert "method.cuda_graphs = true needs method.padding_free = true" in capsys.readouterr().err
    if not has_cuda():
        assert cli.main([*base, "--set", "method.cuda_graphs=true"]) == 2
        assert "method.cuda_graphs = true needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.gpu
def test_graphed_steps_replay_what_the_eager_steps_compute(write_experiment, tmp_path, monkeypatch):
    """On a GPU: 12 steps with gradient checkpointing, fp16 autocast and loss scaling, graphed (captured once per
    length bucket, then replayed) against the same padded steps run eagerly, and against the trainer's own steps."""
    sets = ("method.max_steps=12", "method.gradient_checkpointing=true")
    own = train(write_experiment, tmp_path, "own", *sets, "method.cuda_graphs=false")
    made, capture = [], [False]
    init = graphs.GraphedSteps.__init__

    def recorded(self, *args, **kwargs):
        init(self, *args, **{**kwargs, "capture": capture[0]})
        made.append(self)

    monkeypatch.setattr(graphs.GraphedSteps, "__init__", recorded)
    eager = train(write_experiment, tmp_path, "eager", *sets, "method.cuda_graphs=true")
    capture[0] = True
    graphed = train(write_experiment, tmp_path, "graphed", *sets, "method.cuda_graphs=true",
                    "stages.generate.enabled=true")  # the model generates after training: graphs released
    steps = made[-1]
    assert steps.failed is None and steps.captures >= 2 and steps.replays >= 2, vars(steps)
    assert not steps.static and not steps.grads  # released when training ended
    assert made[0].captures == 0
    for (losses_a, adapter_a), (losses_b, adapter_b), rtol in ((eager, graphed, 1e-5), (own, graphed, 2e-3)):
        assert len(losses_a) == len(losses_b) == 12
        assert losses_a == pytest.approx(losses_b, rel=rtol)
        for key in adapter_a:
            torch.testing.assert_close(adapter_a[key], adapter_b[key], rtol=rtol, atol=rtol / 10)


@pytest.mark.gpu
def test_random_ops_run_eagerly_after_a_failed_capture():
    """A capture that fails in capture_end (a synchronisation inside it) raises, and the run's eager steps that
    follow can still draw dropout masks (without the generator's capture ended, dropout fails with "Offset increment
    outside graph capture encountered unexpectedly")."""
    x = torch.ones(4096, device="cuda")

    def run():
        y = torch.nn.functional.dropout(x, 0.5)
        torch.cuda.synchronize()  # not allowed while capturing: the capture is invalidated
        return y

    with pytest.raises(RuntimeError):
        graphs.capture(run, None, torch.cuda.Stream())
    kept = torch.nn.functional.dropout(x, 0.5).count_nonzero().item()
    assert 0 < kept < x.numel()
    # and a later capture (the next run in the same process) captures and replays
    graph, out = graphs.capture(lambda: torch.nn.functional.dropout(x, 0.5), None, torch.cuda.Stream())
    graph.replay()
    assert 0 < out.count_nonzero().item() < x.numel()


@pytest.mark.gpu
def test_a_capture_after_a_warm_up_whose_autograd_graph_lives_on():
    """The warm-up step's autograd graph still alive at the capture (here held by its loss; in a run, by a reference
    cycle the collector hasn't reached) doesn't break the capture: the warm-up ran on the capture's stream, so its
    parameter's AccumulateGrad node belongs to that stream."""
    w = torch.arange(1024.0, device="cuda").requires_grad_()

    def run():
        loss = (w * w).sum()
        (grad,) = torch.autograd.grad(loss, [w])
        return loss, grad

    stream = torch.cuda.Stream()
    kept_loss, _ = graphs.warm_up(run, stream)
    graph, (_, grad) = graphs.capture(run, None, stream)
    graph.replay()
    torch.cuda.synchronize()
    assert kept_loss.grad_fn is not None and torch.equal(grad, 2 * w.detach())
