"""Shared fixtures: a tiny random Llama's experiment, experiment files written on the fly, finished runs trained once
per session, and inline plugins."""

from __future__ import annotations

import gc
import json
import re
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

import fx
from fx import config, pipeline
from fx.hooks import manager
from fx.stages import builtin
from fx.training.qlora import QLoraMethod

ROOT = Path(__file__).resolve().parents[1]

# A conversation dataset small enough to train a tiny model on in seconds.
TINY_ROWS = [
    {"messages": [{"role": "user", "content": f"What is {a} plus {b}?"}, {"role": "assistant", "content": f"{a + b}"}],
     "expect": [str(a + b)]}
    for a in range(1, 7) for b in range(1, 5)
]
# The same arithmetic as preference pairs (DPO, ORPO, SimPO): the right sum chosen over a fixed wrong answer.
PREF_ROWS = [{"prompt": f"What is {a} plus {b}?", "chosen": f"{a + b}", "rejected": "I do not know.",
              "expect": [str(a + b)]} for a in range(1, 7) for b in range(1, 5)]
# ... and as KTO's thumbs up/down rows: each question once, its answer right (desirable) or a refusal (not).
UNPAIRED_ROWS = [{"prompt": p["prompt"], "completion": p["chosen"] if i % 3 else p["rejected"], "label": bool(i % 3),
                  "expect": p["expect"]} for i, p in enumerate(PREF_ROWS)]


@pytest.fixture(autouse=True)
def fresh_plugins():
    """Every test sees plugins built from scratch (an env var or an installed package may have changed)."""
    manager.get.cache_clear()
    yield
    manager.get.cache_clear()


@pytest.fixture(scope="session", autouse=True)
def summaries_fit_their_schema(tmp_path_factory):
    """Every summary.json a run of the session wrote (fx writes a ``version``) validates against the record's
    schema, fx.run.record.RunSummary."""
    yield
    from pydantic import ValidationError

    from fx.run.record import RunSummary

    bad = []
    for path in tmp_path_factory.getbasetemp().rglob("summary.json"):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and "version" in data:
            try:
                RunSummary.model_validate(data)
            except ValidationError as exc:
                bad.append(f"{path}: {exc}")
    assert not bad, "\n".join(bad)


@pytest.fixture
def write_experiment(tmp_path):
    """Write an experiment file (and its data) into tmp_path; returns its path."""

    def write(text: str, rows: list[dict] | None = None, name: str = "exp.toml") -> Path:
        if rows is not None:
            (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        path = tmp_path / name
        path.write_text(text.replace("{out}", str(tmp_path / "runs")))
        return path

    return write


TINY_EXPERIMENT = """
[experiment]
name = "tiny"
seed = 0
output_dir = "{out}"

[model]
source = "random"
architecture = "tiny"
dtype = "float32"

[data]
source = "file"
path = "rows.jsonl"
eval_fraction = 0.25
max_length = 64

[template]
name = "llama2"
system_prompt = "Answer with a number."

[method]
name = "qlora_sft"
max_steps = 12
micro_batch_size = 4
learning_rate = 0.01
optim = "adamw_torch"
gradient_checkpointing = false
warmup_ratio = 0.0
lr_scheduler = "constant"
max_grad_norm = 1.0

[method.lora]
r = 8
alpha = 16
dropout = 0.0
target_modules = "all-linear"

[trackers.jsonl]

[stages.evaluate]
metric = "contains"
max_new_tokens = 4

[stages.generate]
count = 2
max_new_tokens = 4
"""


@pytest.fixture
def tiny_experiment(write_experiment):
    return write_experiment(TINY_EXPERIMENT, TINY_ROWS)


@pytest.fixture(scope="session")
def train_tiny(tmp_path_factory):
    """``train_tiny(name, text=TINY_EXPERIMENT, rows=TINY_ROWS, overrides=(), plugins=())``: the experiment trained
    to its end once per session (a finished run shared by every test that asks for the same ``name``), with extra
    plugin objects registered; returns ``(experiment, run folder)``."""
    done: dict[str, tuple[config.Experiment, Path]] = {}

    def train(name: str, text: str = TINY_EXPERIMENT, rows: list[dict] = TINY_ROWS, overrides=(), plugins=()):
        if name not in done:
            root = tmp_path_factory.mktemp(name)
            (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            (root / "exp.toml").write_text(text.replace("{out}", str(root / "runs")))
            built = manager.build()
            for plugin, plugin_name in plugins:
                built.pm.register(plugin, name=plugin_name)
            chosen = manager.Plugins(built.pm, built.versions)  # the register hooks again, the extra plugins' too
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(manager, "get", lambda: chosen)
                exp = config.load(root / "exp.toml", list(overrides))
                done[name] = exp, pipeline.execute(exp, chosen)
        return done[name]

    return train


class StageObserver:
    """A plugin that records the stages of a run, the trained model's logits on ``PROBE`` as the adapter is saved,
    and whether that model is still alive when the merge stage loads the 16-bit base."""

    PROBE = torch.tensor([[1, 40, 41, 42, 300, 301, 302, 7]])  # any ids; logits are compared on them

    def __init__(self):
        self.started, self.ended, self.runs = [], {}, []

    @fx.hookimpl
    def fx_run_start(self, run):
        self.runs.append(("start", run.name, run.resume_step))

    @fx.hookimpl
    def fx_run_end(self, run, summary, error):
        self.runs.append(("end", summary["status"], error))

    @fx.hookimpl
    def fx_stage_start(self, run, stage):
        self.started.append(stage)

    @fx.hookimpl
    def fx_stage_end(self, run, stage, result):
        self.ended[stage] = dict(result)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.fixture(scope="session")
def tiny_run(train_tiny):
    """The tiny experiment trained once, merge stage on (float32), watched by a :class:`StageObserver`:
    ``(experiment, run folder, observer)``."""
    observer = StageObserver()
    save, merge = QLoraMethod.save, builtin.merge

    def save_and_probe(self, model, folder):
        observer.trained_logits = logits(model.eval(), StageObserver.PROBE)
        observer.trained_model = weakref.ref(model)
        save(self, model, folder)

    def merge_and_check(*args, **kwargs):
        gc.collect()
        observer.trained_model_alive_at_merge = observer.trained_model() is not None
        return merge(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(QLoraMethod, "save", save_and_probe)
        mp.setattr(builtin, "merge", merge_and_check)
        exp, folder = train_tiny("tiny", overrides=["stages.merge.enabled=true", 'stages.merge.dtype="float32"'],
                                 plugins=[(observer, "observer")])
    return exp, folder, observer


@pytest.fixture
def register_plugin(monkeypatch):
    """Register an inline plugin object for one test (llm's tests/conftest.py pattern); gone after the test."""

    def register(plugin, name: str) -> manager.Plugins:
        base = manager.build()
        base.pm.register(plugin, name=name)
        plugins = manager.Plugins(base.pm, base.versions)  # runs the register hooks again, this plugin included
        monkeypatch.setattr(manager, "get", lambda: plugins)
        return plugins

    return register


@pytest.fixture
def register_stage(register_plugin):
    """``register_stage(name, cls, plugin_name)``: an inline plugin that registers one stage (``fx_register_stages``)
    for one test; the plugins built with it."""

    def register(name: str, cls, plugin_name: str) -> manager.Plugins:
        class OneStage:
            @fx.hookimpl
            def fx_register_stages(self, register):
                register(name, cls)

        return register_plugin(OneStage(), plugin_name)

    return register


@pytest.fixture
def hungry_method(register_plugin):
    """A method named ``hungry`` whose trainer runs out of GPU memory as CUDA reports it (simulated on the CPU)."""

    class Hungry(fx.QLoraMethod):
        def trainer(self, model, tokenizer, rows, session):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 48.00 MiB.")

    class Plugin:
        @fx.hookimpl
        def fx_register_methods(self, register):
            register("hungry", Hungry)

    return register_plugin(Plugin(), "hungry-method")


def assert_stopped_run_resumes_to_the_uninterrupted_adapter(path: Path, tmp_path: Path, register) -> None:
    """Train ``path`` straight through, and again stopped after step 3 as SIGTERM would stop it (the step finished,
    a checkpoint written) then resumed: the resumed run continues from the checkpoint at step 4 and ends with the
    straight run's adapter."""
    import signal

    from safetensors.torch import load_file

    from fx.errors import Interrupted
    from fx.run.resume import load_run

    sets = ["checkpoints.every_steps=4", "stages.evaluate.enabled=false", "stages.generate.enabled=false"]
    straight = pipeline.execute(config.load(path, [*sets, f'experiment.output_dir="{tmp_path / "straight"}"']),
                                manager.get())

    class StopAtStep3:
        @fx.hookimpl
        def fx_log(self, run, step, metrics):
            if step == 3 and "loss" in metrics:
                run.stop(signal.SIGTERM)

    plugins = register(StopAtStep3(), "stop-at-3")
    with pytest.raises(Interrupted):
        pipeline.execute(config.load(path, [*sets, f'experiment.output_dir="{tmp_path / "stopped"}"']), plugins)
    (folder,) = (tmp_path / "stopped").iterdir()
    plugins.pm.unregister(name="stop-at-3")
    pipeline.execute(load_run(folder), plugins, resume=folder)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["resumed_from_step"] == 4 and summary["steps"] == 8
    a = load_file(str(straight / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(folder / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def guide_files(start: str, end: str, names: tuple[str, ...]) -> dict[str, str]:
    """The files of a complete example package as docs/plugins.md prints them, between the headings ``start`` and
    ``end``."""
    guide = (ROOT / "docs" / "plugins.md").read_text()
    section = guide[guide.index(start):guide.index(end)]
    return {name: re.search(rf"`{re.escape(name)}`:\n\n```\w+\n(.*?)```", section, re.S).group(1) for name in names}


def install_package(files: dict[str, str], root: Path) -> Path:
    """Build and install a package from its files into a folder of its own (as ``pip install`` would); the folder
    to put on the path."""
    src, target = root / "src", root / "site"
    src.mkdir(parents=True)
    for name, text in files.items():
        (src / name).write_text(text)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(src)], check=True, capture_output=True)
    return target


def importable(site: Path, monkeypatch) -> Path:
    """An installed package's folder importable in this process (its entry point found) and in the fx processes a
    test starts."""
    import os

    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    manager.get.cache_clear()
    return site


# the guide's complete example packages: (first heading, the heading after, the package's files)
GUIDE_METHOD = ("## Writing a method", "### A complete example: a preference method", ("pyproject.toml",
                                                                                       "fx_anchored.py"))
GUIDE_PREFERENCE = ("### A complete example: a preference method", "## Writing a template", ("pyproject.toml",
                                                                                              "fx_slic.py"))
GUIDE_STAGE = ("## Writing a stage", "## Rules the host enforces", ("pyproject.toml", "fx_startswith.py"))


def has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` skip cleanly on a machine without CUDA (``pytest -m gpu`` selects them on one with)."""
    if has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
