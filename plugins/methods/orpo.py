"""Method ``orpo``: odds-ratio preference optimisation of LoRA adapters on a 4-bit (NF4) base with trl's ORPOTrainer
(``trl.experimental.orpo`` in trl 1.16). One loss does SFT and preference in one pass: the chosen answer's NLL plus
beta x the log odds ratio of the chosen over the rejected answer. There is no reference model: the weights exist
once and no reference forward runs, which is what puts preference training of a 7B model on a T4.

trl's ORPOTrainer tokenizes text in its constructor (``tokenize_row``); fx gives it the rows it tokenized with the
experiment's template, already in the form ``tokenize_row`` returns (``fx.training.preference.paired_trainer``).
trl builds the whole logits of both answers and pads its batches: no token budgets, padding-free rows or graphed
steps; the kernels (Liger, compile) apply. trl switches dropout off, and computes the NLL term over the prompt as
well as the chosen answer (its choice in 1.16).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

import fx
from fx.data.tokenize import tokenize_preferences
from fx.evaluation import preference_metrics, task_metric
from fx.training.preference import PromptLengthSettings, paired_rows, paired_trainer


class ORPO(fx.QLoraMethod):
    description = ("4-bit NF4 base + LoRA adapters, odds-ratio preference optimisation (trl ORPOTrainer): SFT and "
                   "preference in one pass, no reference model")
    preference = True

    class Settings(fx.QLoraMethod.Settings, PromptLengthSettings):
        beta: float = Field(0.1, gt=0, le=100)  # lambda: the odds-ratio term's weight beside the NLL

    def tokenize(self, examples, template, tokenizer, max_length: int):
        s = self.settings
        return tokenize_preferences(examples, template, tokenizer, max_length, s.max_prompt_length,
                                    s.max_completion_length)

    def workload(self, max_length: int, bf16: bool | None = None):
        """Both answers of each pair in one forward (2 sequences per row), no reference, LoRA without dropout (trl
        disables it); trl builds the whole logits and keeps a float32 log-softmax of every row for the odds ratio and
        of the chosen half again for the NLL term."""
        return super().workload(max_length, bf16, sequences=2, lora_dropout=0.0, log_softmaxes=1.5)

    def trainer(self, model, tokenizer, rows, session):
        """trl's ORPOTrainer on fx's tokenized pairs, every argument explicit."""
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        args = self.trainer_args(
            ORPOConfig, session,
            beta=self.settings.beta,
            # rows arrive tokenized and truncated by fx (fx.data.tokenize.tokenize_preferences); trl's own truncation
            # never runs, and this is only the longest sequence it will see
            max_length=max(len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in rows),
            max_completion_length=None,
            disable_dropout=True,
            padding_value=tokenizer.pad_token_id,
            generate_during_eval=False,
            is_encoder_decoder=False,
            model_init_kwargs=None,
            trust_remote_code=False,
            dataset_num_proc=None,
        )
        return paired_trainer(ORPOTrainer)(model=model, args=args, train_dataset=paired_rows(rows),
                                           processing_class=tokenizer)

    def evaluate(self, model, tokenizer, template, rows, examples, settings) -> dict[str, Any]:
        """Held-out preference accuracy by the policy's own log-probabilities (ORPO has no reference), and the
        ``[stages.evaluate]`` metric on generated answers."""
        result = preference_metrics(model, rows, tokenizer.pad_token_id, self.settings.beta)
        result.update(task_metric(model, tokenizer, template, examples, settings)[0])
        return result


@fx.hookimpl
def fx_register_methods(register):
    register("orpo", ORPO)
