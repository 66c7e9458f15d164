"""Method ``dpo``: direct preference optimisation of LoRA adapters on a 4-bit (NF4) base with trl's DPOTrainer.

The reference is the same base with the adapter off (the weights exist once), or with ``init_adapter`` the SFT
policy the run starts from (docs/dpo.md). trl switches dropout off in DPO, so the policy and the reference see the
same network. trl 1.16's DPOTrainer pads its batches and keeps each pair whole: no padding-free rows, token budgets
or graphed steps; the kernels (Liger, compile) apply.
"""

from __future__ import annotations

import contextlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

import fx
from fx.data.tokenize import tokenize_preferences
from fx.evaluation import preference_metrics, task_metric
from fx.training.preference import PromptLengthSettings, reference_problems, with_lengths

# DPOTrainer's loss types in trl 1.16 (DPOConfig.loss_type; DPOTrainer._compute_loss refuses any other)
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")


class DPO(fx.QLoraMethod):
    description = ("4-bit NF4 base + LoRA adapters, direct preference optimisation (trl DPOTrainer) against the base "
                   "with the adapter off, or against an SFT run's adapter (init_adapter)")
    preference = True

    class Settings(fx.QLoraMethod.Settings, PromptLengthSettings):
        learning_rate: float = Field(5e-5, gt=0, le=1)
        beta: float = Field(0.1, gt=0, le=1000)  # how far the policy may move from the reference (higher: less)
        loss_type: Literal[LOSS_TYPES] = "sigmoid"
        label_smoothing: float = Field(0.0, ge=0, lt=0.5)  # robust DPO's flip probability, EXO's epsilon
        init_adapter: str | None = Field(None, min_length=1, max_length=4096)  # a finished fx run, or its adapter/

        @model_validator(mode="after")
        def _supported(self):
            if self.loss_type == "exo_pair" and self.label_smoothing == 0:
                raise ValueError("loss_type 'exo_pair' needs label_smoothing > 0 (the EXO paper uses 1e-3)")
            return self

    # -- settings that need the file system ------------------------------------------------------------------------

    def init_folder(self) -> Path | None:
        """The adapter folder ``init_adapter`` names (a run directory's ``adapter/``, or the folder itself)."""
        if self.settings.init_adapter is None:
            return None
        given = Path(self.settings.init_adapter).expanduser()
        for folder in (given / "adapter", given):
            if (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file():
                return folder
        return None

    def check(self) -> list[str]:
        problems = super().check() + reference_problems(self)
        if self.settings.init_adapter is None:
            return problems
        folder = self.init_folder()
        if folder is None:
            return problems + [f"method.init_adapter: {self.settings.init_adapter!r} is neither a finished fx run "
                               "(with adapter/adapter_config.json and adapter_model.safetensors) nor an adapter folder"]
        saved = json.loads((folder / "adapter_config.json").read_text())
        lora = self.settings.lora
        targets = lora.target_modules if isinstance(lora.target_modules, str) else sorted(lora.target_modules)
        theirs = saved.get("target_modules")
        theirs = sorted(theirs) if isinstance(theirs, list) else theirs
        if saved.get("r") != lora.r:
            problems.append(f"method.lora.r: {lora.r}, but the init_adapter {str(folder)!r} has r = {saved.get('r')}; "
                            "set method.lora.r to match (DPO continues training that adapter)")
        if targets != theirs and not (targets == "all-linear" and isinstance(theirs, list)):
            problems.append(f"method.lora.target_modules: {lora.target_modules!r}, but the init_adapter "
                            f"{str(folder)!r} targets {theirs!r}; set method.lora.target_modules to match")
        return problems

    # -- data ------------------------------------------------------------------------------------------------------

    def tokenize(self, examples, template, tokenizer, max_length: int):
        s = self.settings
        return tokenize_preferences(examples, template, tokenizer, max_length, s.max_prompt_length,
                                    s.max_completion_length)

    # -- model -----------------------------------------------------------------------------------------------------

    def load(self, source, tokenizer):
        """The 4-bit base with a fresh adapter, or with ``init_adapter``'s adapter, trainable."""
        folder = self.init_folder()
        if folder is None:
            model = self.attach(self.load_base(source))
        else:
            from peft import PeftModel

            model = PeftModel.from_pretrained(self.load_base(source), folder, is_trainable=True)
        return self.prepare_training(model)

    def reference(self, model):
        """A context in which ``model`` computes as DPO's reference: the ``ref`` adapter where trl made one (training
        from ``init_adapter``); before training from ``init_adapter``, the policy itself (trl copies it as the
        reference when training starts); otherwise the base with the adapter off."""
        if "ref" in getattr(model, "peft_config", {}):
            from trl.trainer.utils import use_adapter

            return use_adapter(model, "ref")
        if self.settings.init_adapter is not None:
            return contextlib.nullcontext()
        return model.disable_adapter()

    def workload(self, max_length: int, bf16: bool | None = None):
        """A QLoRA run's shape with DPO's differences: chosen and rejected answers of each row go through one forward
        together (2 sequences per row), a no-grad reference forward of the same batch follows the policy's, LoRA
        without dropout (trl disables it), and with ``init_adapter`` a frozen copy of the adapter as the reference."""
        return super().workload(max_length, bf16, sequences=2, reference_forward=True, lora_dropout=0.0,
                                reference_adapter=self.settings.init_adapter is not None)

    # -- training --------------------------------------------------------------------------------------------------

    def trainer(self, model, tokenizer, rows, session):
        """trl's DPOTrainer on fx's tokenized preference rows, every argument explicit."""
        from trl import DPOConfig

        import datasets

        s = self.settings
        args = self.trainer_args(
            DPOConfig, session,
            # trl turns the model's checkpointing off for each reference pass and back on with these kwargs
            gradient_checkpointing_kwargs={"use_reentrant": False},  # as load_base() set it
            beta=s.beta,
            loss_type=[s.loss_type],
            label_smoothing=s.label_smoothing,
            max_length=None,  # rows arrive tokenized and truncated by fx (fx.data.tokenize.tokenize_preferences)
            truncation_mode="keep_start",
            padding_free=False,
            pad_to_multiple_of=None,
            precompute_ref_log_probs=False,  # the reference pass runs beside the policy's, adapter off
            sync_ref_model=False,
            disable_dropout=True,
            use_weighting=False,
            ld_alpha=None,
            f_divergence_type="reverse_kl",
            activation_offloading=False,
        )
        trainer = _trainer_class()(model=model, ref_model=None, args=args,
                                   train_dataset=datasets.Dataset.from_list(with_lengths(rows)),
                                   processing_class=tokenizer)
        if s.init_adapter is None and "ref" in model.peft_config:
            # trl copied the fresh adapter as "ref"; its B matrices are zero, so the copy computes the base: the
            # reference is the base with the adapter off, without a second adapter in memory
            model.delete_adapter("ref")
        return trainer

    def evaluate(self, model, tokenizer, template, rows, examples, settings) -> dict[str, Any]:
        """Held-out preference accuracy against the reference and by the policy's own log-probabilities
        (:func:`fx.evaluation.preference_metrics`), and the ``[stages.evaluate]`` metric on generated answers."""
        result = preference_metrics(model, rows, tokenizer.pad_token_id, self.settings.beta,
                                    lambda: self.reference(model))
        result.update(task_metric(model, tokenizer, template, examples, settings)[0])
        return result

    def save(self, model, folder: Path) -> None:
        """The trained adapter alone (not trl's ``ref`` copy), loadable with plain peft."""
        model.save_pretrained(folder, safe_serialization=True, selected_adapters=["default"])

    def load_trained(self, source, folder: Path):
        """The trained adapter on the base, and with ``init_adapter`` the SFT adapter as ``ref`` for measuring
        against the reference (``fx eval``)."""
        model = super().load_trained(source, folder)
        init = self.init_folder()
        if init is not None:
            model.load_adapter(init, adapter_name="ref")
            model.set_adapter("default")
        return model.eval()


@lru_cache(maxsize=1)
def _trainer_class():
    from trl import DPOTrainer

    class TokenizedDPOTrainer(DPOTrainer):
        """DPOTrainer on rows fx has already tokenized with the experiment's template (prompt_ids, chosen_ids,
        rejected_ids): trl's own preparation (prompt extraction, EOS, chat-template tokenization) is skipped, the way
        SFTConfig's ``skip_prepare_dataset`` does it for SFT."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    return TokenizedDPOTrainer


@fx.hookimpl
def fx_register_methods(register):
    register("dpo", DPO)
