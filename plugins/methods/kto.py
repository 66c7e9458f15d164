"""Method ``kto``: Kahneman-Tversky optimisation of LoRA adapters on a 4-bit (NF4) base with trl's KTOTrainer (stable
in trl 1.16: ``trl.KTOTrainer``; ``trl.experimental.kto`` only re-exports it with a deprecation warning). KTO learns
from unpaired rows, a prompt with one answer marked desirable or not (thumbs up or down), against a reference: the
same base with the adapter off (the weights exist once). Pairs become such rows with ``data.unpair = true``.

trl estimates KTO's KL term from a second batch in which each prompt is given another row's answer (the row before it
in the same micro-batch), so it trains on its rows in order; fx shuffles them once with the experiment's seed. trl's
own preparation (prompt extraction, EOS, chat-template tokenization) is skipped for the rows fx tokenized with the
experiment's template; the KL answers are added as trl adds them. trl pads its batches: no token budgets,
padding-free rows or graphed steps; the kernels (Liger, compile) apply.
"""

from __future__ import annotations

import random
from functools import cache
from typing import Any, Literal

from pydantic import Field, model_validator

import fx
from fx.data.tokenize import tokenize_unpaired
from fx.evaluation import task_metric, unpaired_metrics
from fx.training.preference import PromptLengthSettings, reference_problems, with_lengths


class KTO(fx.QLoraMethod):
    description = ("4-bit NF4 base + LoRA adapters, Kahneman-Tversky optimisation (trl KTOTrainer) of unpaired "
                   "desirable/undesirable answers against the base with the adapter off")
    unpaired = True

    class Settings(fx.QLoraMethod.Settings, PromptLengthSettings):
        learning_rate: float = Field(5e-5, gt=0, le=1)
        beta: float = Field(0.1, gt=0, le=1000)  # how far the policy may move from the reference (higher: less)
        # "kto": the paper's loss, with its KL term; "apo_zero_unpaired": APO-zero's unpaired loss, no KL term
        loss_type: Literal["kto", "apo_zero_unpaired"] = "kto"
        desirable_weight: float = Field(1.0, gt=0, le=1000)  # weighs desirable rows' losses (for unbalanced data)
        undesirable_weight: float = Field(1.0, gt=0, le=1000)

        @model_validator(mode="after")
        def _kl_batch(self):
            if self.loss_type == "kto" and self.micro_batch_size < 2:
                raise ValueError("loss_type 'kto' needs micro_batch_size >= 2: its KL term pairs each prompt with "
                                 "another row's answer in the same micro-batch")
            if self.loss_type == "kto" and self.group_by_length:
                raise ValueError("loss_type 'kto' trains on its rows in order (its KL term pairs each row with its "
                                 "neighbour in the micro-batch): set group_by_length = false")
            return self

    def check(self) -> list[str]:
        return super().check() + reference_problems(self)

    def tokenize(self, examples, template, tokenizer, max_length: int):
        s = self.settings
        return tokenize_unpaired(examples, template, tokenizer, max_length, s.max_prompt_length,
                                 s.max_completion_length)

    def reference(self, model):
        """A context in which ``model`` computes as KTO's reference: the base with the adapter off."""
        return model.disable_adapter()

    def workload(self, max_length: int, bf16: bool | None = None):
        """One answer per row, a no-grad reference forward of the batch (adapter off) and, for the loss 'kto', the KL
        batch through the policy and through the reference (no grad, one at a time, the size of the batch); LoRA
        without dropout (trl disables it)."""
        return super().workload(max_length, bf16, reference_forward=True, lora_dropout=0.0,
                                kl_forward=self.settings.loss_type == "kto")

    def trainer(self, model, tokenizer, rows, session):
        """trl's KTOTrainer on fx's tokenized unpaired rows, in an order shuffled once by the seed, every argument
        explicit."""
        from trl import KTOConfig

        import datasets

        s = self.settings
        kl = s.loss_type == "kto"
        fields: dict[str, Any] = dict(train_sampling_strategy="sequential") if kl else {}
        args = self.trainer_args(
            KTOConfig, session, **fields,
            # trl turns the model's checkpointing off for each reference pass and back on with these kwargs
            gradient_checkpointing_kwargs={"use_reentrant": False},  # as load_base() set it
            beta=s.beta,
            loss_type=s.loss_type,
            desirable_weight=s.desirable_weight,
            undesirable_weight=s.undesirable_weight,
            # rows arrive tokenized and truncated by fx (fx.data.tokenize.tokenize_unpaired); trl's collator cuts the
            # KL batch's sequences (a prompt with another row's answer) to the longest training row
            max_length=max(len(r["prompt_ids"]) + len(r["completion_ids"]) for r in rows),
            pad_to_multiple_of=None,
            precompute_ref_log_probs=False,  # the reference pass runs beside the policy's, adapter off
            precompute_ref_batch_size=None,
            sync_ref_model=False,
            disable_dropout=True,
            activation_offloading=False,
            router_aux_loss_coef=None,
            model_init_kwargs=None,
            trust_remote_code=False,
            dataset_num_proc=None,
        )
        order = list(range(len(rows)))
        random.Random(session.seed).shuffle(order)  # trl keeps the order (the KL batch pairs neighbours)
        dataset = datasets.Dataset.from_list(with_lengths([rows[i] for i in order]))
        trainer = _trainer_class()(model=model, ref_model=None, args=args, train_dataset=dataset,
                                   processing_class=tokenizer)
        if "ref" in model.peft_config:
            # trl copied the fresh adapter as "ref"; its B matrices are zero, so the copy computes the base: the
            # reference is the base with the adapter off, without a second adapter in memory
            model.delete_adapter("ref")
        return trainer

    def evaluate(self, model, tokenizer, template, rows, examples, settings) -> dict[str, Any]:
        """Held-out label accuracy by KTO's implicit reward against the reference, the rewards by label, preference
        accuracy where a prompt has both kinds of answer (:func:`fx.evaluation.unpaired_metrics`), and the
        ``[stages.evaluate]`` metric on answers generated to the prompts of desirable rows."""
        result = unpaired_metrics(model, rows, tokenizer.pad_token_id, self.settings.beta,
                                  lambda: self.reference(model))
        result.update(task_metric(model, tokenizer, template, examples, settings)[0])
        return result


@cache
def _trainer_class():
    from trl import KTOTrainer

    class TokenizedKTOTrainer(KTOTrainer):
        """KTOTrainer on rows fx has already tokenized with the experiment's template (prompt_ids, completion_ids,
        label): trl's preparation is skipped but for what its loss needs, each row's KL answer (``KL_completion_ids``):
        the answer of the row before it in its micro-batch, the first row taking the last's, as trl builds it."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if not self.calculate_KL:
                return dataset

            def rotate(batch):
                return {"KL_completion_ids": batch["completion_ids"][-1:] + batch["completion_ids"][:-1]}

            return dataset.map(rotate, batched=True, batch_size=args.per_device_train_batch_size)

    return TokenizedKTOTrainer


@fx.hookimpl
def fx_register_methods(register):
    register("kto", KTO)
