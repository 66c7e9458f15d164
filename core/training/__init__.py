"""What every method shares: the method contract (``method``), QLoRA loading and saving (``qlora``), the shared
settings (``settings``) and trainer arguments (``arguments``), the run contract that drives any trainer
(``contract``, ``checkpoints``, ``oom``), budgets and the allocator cap (``budget``), and the speed levers (``kernels``,
``attention``, ``graphs``, ``microbatch``, ``sft``, ``checkpointing``, ``lora4bit``)."""

from fx.training.method import Method, Session
from fx.training.qlora import QLoraMethod
from fx.training.settings import LoraSettings, PackingSettings, QLoraSettings, TokenBudgetSettings, execution

__all__ = ["LoraSettings", "Method", "PackingSettings", "QLoraMethod", "QLoraSettings", "Session",
           "TokenBudgetSettings", "execution"]
