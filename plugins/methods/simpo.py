"""Method ``simpo``: simple preference optimisation (SimPO) of LoRA adapters on a 4-bit (NF4) base with trl's
CPOTrainer (``trl.experimental.cpo`` in trl 1.16), which is SimPO with ``loss_type = "simpo"`` and ``cpo_alpha = 0``:
the reward of an answer is beta x its mean log-probability per token (length-normalised, no reference model), and
the loss asks the chosen answer's reward to beat the rejected one's by a margin gamma. The weights exist once and no
reference forward runs. ``nll_weight`` > 0 adds CPO's NLL term on the chosen answers (CPO-SimPO).

As for ``orpo``: fx gives trl's CPOTrainer the rows it tokenized with the experiment's template, in the form its
``tokenize_row`` returns (``fx.training.preference.paired_trainer``); trl builds the whole logits of both answers,
pads its batches and switches dropout off.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

import fx
from fx.data.tokenize import tokenize_preferences
from fx.evaluation import preference_metrics, task_metric
from fx.training.preference import PromptLengthSettings, paired_rows, paired_trainer


class SimPO(fx.QLoraMethod):
    description = ("4-bit NF4 base + LoRA adapters, SimPO (trl CPOTrainer, loss 'simpo'): length-normalised "
                   "preference with a target margin, no reference model")
    preference = True

    class Settings(fx.QLoraMethod.Settings, PromptLengthSettings):
        learning_rate: float = Field(5e-5, gt=0, le=1)
        beta: float = Field(2.0, gt=0, le=1000)  # the reward's scale: beta x mean log-probability per token
        gamma: float = Field(1.0, ge=0, le=1000)  # the target margin between the rewards (the paper's gamma)
        label_smoothing: float = Field(0.0, ge=0, lt=0.5)  # the probability that a pair's labels are flipped
        nll_weight: float = Field(0.0, ge=0, le=100)  # CPO's NLL term on the chosen answers (trl's cpo_alpha)

    def tokenize(self, examples, template, tokenizer, max_length: int):
        s = self.settings
        return tokenize_preferences(examples, template, tokenizer, max_length, s.max_prompt_length,
                                    s.max_completion_length)

    def workload(self, max_length: int, bf16: bool | None = None):
        """Both answers of each pair in one forward (2 sequences per row), no reference, LoRA without dropout (trl
        disables it); trl builds the whole logits and keeps a float32 log-softmax of every row, and of the chosen
        half again when the NLL term is on."""
        return super().workload(max_length, bf16, sequences=2, lora_dropout=0.0,
                                log_softmaxes=1.5 if self.settings.nll_weight else 1.0)

    def trainer(self, model, tokenizer, rows, session):
        """trl's CPOTrainer with SimPO's loss on fx's tokenized pairs, every argument explicit."""
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        s = self.settings
        args = self.trainer_args(
            CPOConfig, session,
            loss_type="simpo",
            beta=s.beta,
            simpo_gamma=s.gamma,
            label_smoothing=s.label_smoothing,
            cpo_alpha=s.nll_weight,
            alpha=0.0,  # AlphaPO's reward shape off: SimPO's own reward
            # rows arrive tokenized and truncated by fx (fx.data.tokenize.tokenize_preferences); trl's own truncation
            # never runs, and this is only the longest sequence it will see
            max_length=max(len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in rows),
            max_completion_length=None,
            disable_dropout=True,
            generate_during_eval=False,
            is_encoder_decoder=False,
            model_init_kwargs=None,
            trust_remote_code=False,
            dataset_num_proc=None,
        )
        return paired_trainer(CPOTrainer)(model=model, args=args, train_dataset=paired_rows(rows),
                                          processing_class=tokenizer)

    def evaluate(self, model, tokenizer, template, rows, examples, settings) -> dict[str, Any]:
        """Held-out preference accuracy by the policy's own log-probabilities, per token as SimPO's reward counts
        (``logp_accuracy_per_token``) and summed, and the ``[stages.evaluate]`` metric on generated answers."""
        result = preference_metrics(model, rows, tokenizer.pad_token_id, self.settings.beta)
        result.update(task_metric(model, tokenizer, template, examples, settings)[0])
        return result


@fx.hookimpl
def fx_register_methods(register):
    register("simpo", SimPO)
