"""The core sections of an experiment file and what each key may hold; plugins' sections bring their own."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from fx.plan.gpus import GPUS, budget_gib
from fx.settings import Settings, did_you_mean


class ExperimentSettings(Settings):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    description: str = ""
    seed: int = Field(0, ge=0, le=2**32 - 1)
    output_dir: str = Field("runs", min_length=1, max_length=4096)  # ~ is the user's home

    @field_validator("output_dir")
    @classmethod
    def _a_folder_name(cls, value: str) -> str:
        if "\0" in value:
            raise ValueError("a path can't hold a NUL character")
        return str(Path(value).expanduser()) if value.startswith("~") else value


class DataSettings(Settings):
    source: str
    format: Literal["auto", "messages", "sharegpt", "alpaca", "text", "preference", "sharegpt_preference",
                    "unpaired"] = "auto"
    # the format's column (or turn key) name -> the file's name for it, e.g. {instruction = "question"}
    columns: dict[str, str] = Field(default_factory=dict)
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    max_length: int = Field(1024, ge=16, le=131072)
    max_rows: int | None = Field(None, ge=1, le=10**9)
    # preference pairs -> unpaired rows, for a method that trains on those (kto): each pair becomes its prompt with
    # the chosen answer (label true) and with the rejected one (label false)
    unpair: bool = False


class EvaluateSettings(Settings):
    enabled: bool = True
    metric: Literal["none", "contains", "exact_match"] = "none"
    max_examples: int = Field(32, ge=1, le=100_000)
    max_new_tokens: int = Field(48, ge=1, le=4096)


class GenerateSettings(Settings):
    enabled: bool = True
    prompts: list[str] = Field(default_factory=list, max_length=256)
    count: int = Field(4, ge=0, le=256)
    max_new_tokens: int = Field(64, ge=1, le=4096)


class BenchmarkSettings(Settings):
    """General ability before and after training through lm-evaluation-harness (the ``fx[eval]`` extra): ``tasks``
    (default fx's own probe, ``fx_probe``, which needs no download), ``limit`` items per task (a fraction below 1;
    none: every item), ``chat``: prompt the tasks in the run's template (default: fx's probe yes, the harness's tasks
    no), ``max_drop``: the general score (the tasks' mean) may fall by this much; more marks the run."""

    enabled: bool = False
    tasks: list[str] = Field(default_factory=lambda: ["fx_probe"], min_length=1, max_length=64)
    limit: float | None = Field(None, gt=0, le=10**7)
    chat: bool | None = None
    batch_size: int = Field(16, ge=1, le=1024)
    max_drop: float | None = Field(None, ge=0, le=1)

    @field_validator("limit")
    @classmethod
    def _count_or_fraction(cls, value: float | None) -> float | None:
        if value is not None and value >= 1 and value != int(value):
            raise ValueError("a number of items (1 or more, whole) or a fraction below 1")
        return int(value) if value is not None and value >= 1 else value


class MergeSettings(Settings):
    """Merge the adapter into its base and save a plain transformers model in ``merged/``, checked against the
    adapter on the held-out rows. ``base``: ``trained``, what the adapter was trained against (QLoRA: the 4-bit
    weights, dequantised), or ``original``, the model source's weights. ``dtype`` ``auto``: bfloat16 on GPUs that
    support it, float16 on older GPUs, float32 on CPU (fp16 matmuls there are slow or unsupported)."""

    enabled: bool = False
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    base: Literal["trained", "original"] = "trained"


# the GGUF tensor types the gguf package can write (fx.after.gguf_file maps them); f16 is llama.cpp's usual input
GGUF_QUANTS = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")


class ExportSettings(Settings):
    """After training (and the merge stage, when on), write the merged model as GGUF for llama.cpp (``gguf``) or as
    an Ollama folder with a Modelfile (``ollama``) in ``export/``, and check it against the adapter."""

    enabled: bool = False
    format: Literal["gguf", "ollama"] = "gguf"
    quant: Literal[GGUF_QUANTS] = "f16"  # type: ignore[valid-type]


class BudgetSettings(Settings):
    """``[budget]``: the GPU memory a run may use. fx plans before loading, refuses a run that won't fit
    (``refuse``), or picks the largest micro-batch that fits (``auto``), and caps the CUDA allocator to it."""

    gpu: str | None = None
    vram_gib: float | None = Field(None, gt=0, le=4096)
    auto: bool = False
    refuse: bool = True

    @field_validator("gpu")
    @classmethod
    def _known_gpu(cls, gpu: str | None) -> str | None:
        if gpu is not None and gpu.lower() not in GPUS:
            raise ValueError(f"unknown GPU {gpu!r}{did_you_mean(gpu.lower(), set(GPUS))} (one of: {', '.join(GPUS)})")
        return gpu

    @model_validator(mode="after")
    def _one_size(self):
        if self.gpu is not None and self.vram_gib is not None:
            raise ValueError("set gpu or vram_gib, not both")
        if self.auto and self.gpu is None and self.vram_gib is None:
            raise ValueError("auto needs a budget: set gpu or vram_gib")
        return self

    def gib(self) -> float | None:
        if self.gpu is not None:
            return budget_gib(self.gpu)
        return self.vram_gib

    def label(self) -> str:
        return self.gpu if self.gpu is not None else f"{self.vram_gib:g} GiB"


class StagesSettings(Settings):
    evaluate: EvaluateSettings = EvaluateSettings()
    generate: GenerateSettings = GenerateSettings()
    benchmark: BenchmarkSettings = BenchmarkSettings()
    merge: MergeSettings = MergeSettings()
    export: ExportSettings = ExportSettings()


class CheckpointSettings(Settings):
    every_steps: int = Field(50, ge=0, le=10**9)  # 0: only at the end
    keep: int = Field(2, ge=1, le=1000)  # the newest K checkpoints are kept


class DistributedSettings(Settings):
    """``[distributed]``: how ``fx run --gpus N`` shares the training between N processes, one per GPU (a rank).
    ``ddp``: every rank holds the whole model and trains on its share of each batch; ``fsdp``: the 4-bit weights,
    adapters, gradients and optimizer states are sharded across the ranks (FSDP2), for a model one GPU can't hold;
    ``auto``: DDP when the per-rank DDP plan fits one GPU, else FSDP. docs/distributed.md."""

    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
