"""Supervised fine-tuning's trainer: trl's SFTTrainer on fx's tokenized rows, with padding-free batches, their
steps replayed as CUDA graphs (fx.training.graphs), and their real tokens counted right. Any method whose loss is
SFT's builds it with :func:`trainer`."""

from __future__ import annotations

import functools

from fx.training.devices import device
from fx.training.distributed import current, total


def check(settings) -> list[str]:
    """Packing settings that don't go together, or not on this machine."""
    problems = []
    if settings.cuda_graphs is True and not settings.padding_free:
        problems.append("method.cuda_graphs = true needs method.padding_free = true (a graph pads packed rows to a "
                        "fixed length)")
    if settings.cuda_graphs is True and device() != "cuda":
        problems.append('method.cuda_graphs = true needs a CUDA GPU; set it to "auto" or false on this machine')
    return problems


def uses_cuda_graphs(settings) -> bool:
    """Graphed steps add their gradients outside autograd's hooks, which DDP and FSDP reduce through: one process
    only."""
    return (settings.padding_free and device() == "cuda" and settings.cuda_graphs is not False
            and current().size == 1)


def trainer(method, model, tokenizer, rows, session, **fields):
    """An SFT trainer for a QLoRA method (:class:`fx.training.QLoraMethod` with
    :class:`fx.training.settings.PackingSettings`): loss on the answer tokens of ``rows`` (``input_ids``,
    ``labels``), as its settings pack and graph them; ``fields`` add SFTConfig arguments."""
    from trl import SFTConfig

    import datasets

    args = method.trainer_args(
        SFTConfig, session,
        max_length=None,  # rows arrive tokenized and truncated by fx
        packing=False,
        padding_free=method.settings.padding_free,
        dataset_kwargs={"skip_prepare_dataset": True},
        **fields,
    )
    return trainer_class()(cuda_graphs=uses_cuda_graphs(method.settings), model=model, args=args,
                           train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer)


@functools.cache
def trainer_class():
    """trl's SFTTrainer with CUDA-graphed padding-free steps, and padding-free batches' tokens counted right."""
    from trl import SFTTrainer

    class FxSFTTrainer(SFTTrainer):
        def __init__(self, *args, cuda_graphs: bool = False, **kwargs):
            self.cuda_graphs = cuda_graphs  # padding-free steps through fx.training.graphs (captured on a GPU)
            self.graphs = None
            self.graph_stats = None  # what the graphs did, kept when training ends and they are released
            super().__init__(*args, **kwargs)

        def train(self, *args, **kwargs):
            try:
                return super().train(*args, **kwargs)
            finally:
                if self.graphs is not None:
                    self.graph_stats = self.graphs.stats()
                    self.graphs.release()
                    self.graphs = None

        def training_step(self, model, inputs, num_items_in_batch=None):
            """A forward and backward: a padded, graphed step where it can be, else the trainer's own."""
            if self.cuda_graphs:
                import torch

                from fx.training.graphs import GraphedSteps

                if self.graphs is None:
                    self.graphs = GraphedSteps(model, rows=self.args.per_device_train_batch_size,
                                                      capture=torch.cuda.is_available(),
                                                      longest=self.args.max_length)
                loss = self.graphs.step(self, self._prepare_inputs(inputs), num_items_in_batch)
                if loss is not None:
                    self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
                    return loss
            return super().training_step(model, inputs, num_items_in_batch)

        def log(self, logs, *args, **kwargs):
            if self.graphs is not None:
                self.graphs.flush_metrics(self._metrics["train"])
            return super().log(logs, *args, **kwargs)

        def _track_num_input_tokens(self, inputs):
            """A padding-free batch has no padding and no attention mask: every token is real. (The trainer would
            count tokens unequal to the pad token, missing each row's EOS when the pad token is the EOS.) Every rank's,
            as the trainer's own count is."""
            import torch

            if ("attention_mask" in inputs or "position_ids" not in inputs
                    or self.args.include_num_input_tokens_seen == "no"):
                return super()._track_num_input_tokens(inputs)
            self.state.num_input_tokens_seen += int(total(torch.tensor(inputs["input_ids"].numel(),
                                                                       device=inputs["input_ids"].device)))

    return FxSFTTrainer
