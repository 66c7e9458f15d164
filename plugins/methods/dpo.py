"""Method ``dpo``: direct preference optimisation of LoRA adapters on a 4-bit (NF4) base, with trl's DPOTrainer.

The model is loaded exactly as ``qlora_sft`` loads it (this class extends it), so the weights exist once. The
reference DPO measures the policy against is that same base with the adapter switched off (trl's ``ref_model=None``
with a peft model). With ``init_adapter`` the policy starts from a finished SFT run's adapter and the reference is
that SFT policy, as in standard DPO: trl 1.16 has no ``model_adapter_name``/``ref_adapter_name``; given a peft
model that already carries an adapter it adds a frozen copy of it named ``ref`` and switches to it for the
reference pass. The base is still loaded once; only the small adapter exists twice.

Every precision and checkpointing flag comes from ``qlora_sft``'s own choices (``trainer_args``), never from trl's
defaults (bf16 and gradient checkpointing, measured ~20x slower on a CPU). trl switches dropout off in DPO, so the
policy and the reference see the same network; the planner counts LoRA without dropout accordingly. Of
``qlora_sft``'s speed levers, Liger kernels, the attention choice and ``compile`` carry over (they act on the model);
padding-free rows and token budgets don't (trl 1.16's DPOTrainer pads its batches and keeps each pair whole).
"""

from __future__ import annotations

import contextlib
import dataclasses
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

import fx
from fx.plugins.methods.qlora_sft import QLoraSFT

# DPOTrainer's loss types in trl 1.16 (DPOConfig.loss_type; DPOTrainer._compute_loss refuses any other)
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")


class DPO(QLoraSFT):
    description = ("4-bit NF4 base + LoRA adapters, direct preference optimisation (trl DPOTrainer) against the base "
                   "with the adapter off, or against an SFT run's adapter (init_adapter)")
    preference = True
    # trl 1.16's DPOTrainer pads its batches and keeps each pair whole: no padding-free rows, no token budget, no
    # graphed padding-free steps
    execution_keys = tuple(k for k in QLoraSFT.execution_keys
                           if k not in ("padding_free", "micro_batch_tokens", "cuda_graphs"))

    class Settings(QLoraSFT.Settings):
        learning_rate: float = Field(5e-5, gt=0, le=1)
        padding_free: bool = False
        micro_batch_tokens: int = Field(0, ge=0, le=10**8)
        beta: float = Field(0.1, gt=0, le=1000)  # how far the policy may move from the reference (higher: less)
        loss_type: Literal[LOSS_TYPES] = "sigmoid"
        label_smoothing: float = Field(0.0, ge=0, lt=0.5)  # robust DPO's flip probability, EXO's epsilon
        max_prompt_length: int | None = Field(None, ge=1, le=131072)  # a longer prompt keeps its end
        max_completion_length: int | None = Field(None, ge=1, le=131072)  # a longer answer keeps its start
        init_adapter: str | None = Field(None, min_length=1, max_length=4096)  # a finished fx run, or its adapter/

        @model_validator(mode="after")
        def _supported(self):
            if self.loss_type == "exo_pair" and self.label_smoothing == 0:
                raise ValueError("loss_type 'exo_pair' needs label_smoothing > 0 (the EXO paper uses 1e-3)")
            if self.padding_free:
                raise ValueError("padding_free = true is not available for DPO (trl 1.16's DPOTrainer pads its "
                                 "batches); leave it out")
            if self.micro_batch_tokens:
                raise ValueError("micro_batch_tokens (a token budget) splits SFT batches; DPO keeps each pair in "
                                 "one forward: set micro_batch_size instead")
            if self.cuda_graphs is True:
                raise ValueError("cuda_graphs = true is not available for DPO (it graphs padding-free steps, and "
                                 "trl 1.16's DPOTrainer pads its batches); leave it out")
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
        problems = super().check()
        if self.settings.init_adapter is None:
            return problems
        folder = self.init_folder()
        if folder is None:
            return problems + [f"method.init_adapter: {self.settings.init_adapter!r} is neither a finished fx run "
                               "(with adapter/adapter_config.json and adapter_model.safetensors) nor an adapter folder"]
        import json

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
        from fx.data import tokenize_preferences

        s = self.settings
        return tokenize_preferences(examples, template, tokenizer, max_length, s.max_prompt_length,
                                    s.max_completion_length)

    # -- model -----------------------------------------------------------------------------------------------------

    def load(self, source, tokenizer):
        """The 4-bit base with a fresh adapter, or with ``init_adapter``'s adapter, trainable."""
        from fx.plugins.methods.qlora_sft import compile_layers

        folder = self.init_folder()
        if folder is None:
            model = self.attach(self.load_base(source))
        else:
            from peft import PeftModel

            model = PeftModel.from_pretrained(self.load_base(source), folder, is_trainable=True)
        if self.settings.compile:
            compile_layers(model)
        return model

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
        """``qlora_sft``'s shape with DPO's differences: chosen and rejected answers of each row go through one forward
        together (2 sequences per row), a no-grad reference forward of the same batch follows the policy's, LoRA
        without dropout (trl disables it), and with ``init_adapter`` a frozen copy of the adapter as the reference."""
        work = super().workload(max_length, bf16)
        return dataclasses.replace(work, sequences=2, reference_forward=True, lora_dropout=0.0,
                                   reference_adapter=self.settings.init_adapter is not None)

    # -- training --------------------------------------------------------------------------------------------------

    def trainer_args(self, output_dir: Path, seed: int):
        """DPOConfig with every TrainingArguments value ``qlora_sft`` sets (precision, checkpointing, optimizer,
        schedule, logging, checkpoints) and DPO's own, all explicit."""
        from transformers import TrainingArguments
        from trl import DPOConfig

        sft = super().trainer_args(output_dir, seed)
        shared = {f.name: getattr(sft, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
        s = self.settings
        # trl turns the model's checkpointing off for each reference pass and back on with these kwargs
        shared["gradient_checkpointing_kwargs"] = {"use_reentrant": False}  # as load_base() set it
        return DPOConfig(
            **shared,
            beta=s.beta,
            loss_type=[s.loss_type],
            label_smoothing=s.label_smoothing,
            max_length=None,  # rows arrive tokenized and truncated by fx (fx.data.tokenize_preferences)
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

    def trainer(self, model, tokenizer, train_rows, output_dir: Path, seed: int, callbacks=(), **overrides):
        """trl's DPOTrainer for ``model`` on fx's tokenized preference rows; ``overrides`` replace DPOConfig fields
        (fx bench sets max_steps)."""
        import datasets

        args = self.trainer_args(output_dir, seed)
        if overrides:
            args = dataclasses.replace(args, **overrides)
        rows = [{**r, "length": len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"]))}
                for r in train_rows]  # group_by_length reads the "length" column
        trainer = _trainer_class()(
            model=model,
            ref_model=None,
            args=args,
            train_dataset=datasets.Dataset.from_list(rows),
            processing_class=tokenizer,
            callbacks=list(callbacks),
        )
        if self.settings.init_adapter is None and "ref" in model.peft_config:
            # trl copied the fresh adapter as "ref"; its B matrices are zero, so the copy computes the base: the
            # reference is the base with the adapter off, without a second adapter in memory
            model.delete_adapter("ref")
        return self.finish_trainer(trainer, model)

    def evaluate(self, model, tokenizer, template, rows, examples, settings) -> dict[str, Any]:
        """Held-out preference accuracy against the reference and by the policy's own log-probabilities
        (:func:`fx.evaluate.preference_metrics`), and the ``[stages.evaluate]`` metric on generated answers."""
        from fx.evaluate import preference_metrics, task_metric

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
