"""Method ``qlora_sft``: supervised fine-tuning of LoRA adapters on a 4-bit (NF4) base with trl's SFTTrainer, loss on
the answers, with padding-free batches, token budgets and CUDA-graphed steps (fx.training.sft)."""

from __future__ import annotations

import fx
from fx.training import sft
from fx.training.settings import PackingSettings


class QLoraSFT(fx.QLoraMethod):
    description = "4-bit NF4 base + LoRA adapters, supervised fine-tuning (trl SFTTrainer), loss on answers only"

    class Settings(fx.QLoraMethod.Settings, PackingSettings):
        pass

    def check(self) -> list[str]:
        return super().check() + sft.check(self.settings)

    def trainer(self, model, tokenizer, rows, session):
        return sft.trainer(self, model, tokenizer, rows, session)


@fx.hookimpl
def fx_register_methods(register):
    register("qlora_sft", QLoraSFT)
