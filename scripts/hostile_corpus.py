"""A hostile-input corpus for fx: several hundred inputs of the kinds users and attackers give (TOML, --set, paths
and symlinks, data files, model folders, budgets, run directories and resume, concurrency), each run through the
real command line, and three things counted: tracebacks (an exception escaping ``fx.cli.main`` or "Traceback" in
what it printed), files written outside the case's run folder and fx's declared cache, and checkpoints lost (a
checkpoint folder there before a resume and gone after, set-aside ``.rejected`` ones counted as kept).

    .venv/bin/python scripts/hostile_corpus.py [--out RESULTS.json] [-k SUBSTRING]

Exit 0 when all three counts are 0. Each case runs in a fresh temporary folder with $HOME pointing into it (so
nothing reaches the real home); the tokenizer comes from the ``random`` source, no network is used.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import TINY_EXPERIMENT, TINY_ROWS  # noqa: E402

BASE = TINY_EXPERIMENT.replace("[stages.generate]", "[stages.generate]\nenabled = false")


def rows_text(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


class Case:
    def __init__(self, category, name, argv, setup=None, expect=(2,)):
        self.category, self.name, self.argv, self.setup, self.expect = category, name, argv, setup, expect


CASES: list[Case] = []


def case(category, name, argv, setup=None, expect=(2,)):
    CASES.append(Case(category, name, argv, setup, expect))


def experiment(text=BASE, rows=TINY_ROWS, name="exp.toml"):
    """A setup writing an experiment (``{out}`` -> the run folder) and its rows."""
    def setup(d: Path):
        if rows is not None:
            (d / "rows.jsonl").write_text(rows_text(rows))
        data = text.replace("{out}", str(d / "runs")) if isinstance(text, str) else text
        (d / name).write_bytes(data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data)
    return setup


# --- TOML ---------------------------------------------------------------------------------------------------------
for label, text in {
    "empty": "", "bom": "\ufeff" + BASE, "syntax": "[experiment\nname = 1", "dup key": BASE + "\n[model]\nsource = 'x'",
    "dup section": BASE + "\n[experiment]\nname = 'x'", "deep array": "x = " + "[" * 5000 + "]" * 5000,
    "deep table": "[" + ".".join(["a"] * 3000) + "]\nb = 1", "deep inline": "x = " + "{a=" * 3000 + "1" + "}" * 3000,
    "unterminated string": 'name = "abc', "nul byte": BASE.replace("tiny", "ti\x00ny", 1), "only comment": "# hi",
    "binary": "\x89PNG\r\n\x1a\n", "huge string": BASE + f"\n[x]\ny = \"{'a' * 2_000_000}\"",
    "unknown section": BASE + "\n[nonesuch]\nk = 1", "array of tables": BASE + "\n[[method]]\nx = 1",
    "no experiment": BASE.split("[model]")[1], "stray key": "k = 1\n" + BASE,
}.items():
    case("toml", label, ["validate", "exp.toml"], experiment(text))
case("toml", "non-utf8", ["validate", "exp.toml"], experiment(b"\xff\xfe[experiment]\nname = \"a\"\n"))
VALUES = ['"x"', "-1", "0", "1e309", "nan", "-inf", "true", "[]", "{}", "[1, [2]]", '"../../etc"', '"\u202e"',
          "9223372036854775807", "2026-01-01", '""']
KEYS = ["experiment.name", "experiment.seed", "experiment.output_dir", "model.source", "model.architecture",
        "model.dtype", "data.source", "data.path", "data.eval_fraction", "data.max_length", "data.format",
        "template.name", "method.name", "method.max_steps", "method.micro_batch_size", "method.learning_rate",
        "method.optim", "method.lora.r", "method.lora.target_modules", "method.lr_scheduler", "checkpoints.every_steps",
        "checkpoints.keep", "stages.evaluate.metric", "budget.gpu", "budget.vram_gib", "trackers.jsonl",
        "method.lora.variant", "method.lora.init", "method.attention", "method.gradient_checkpointing",
        "distributed.strategy", "stages.merge.dtype", "stages.merge.enabled", "stages.export.quant",
        "stages.export.format", "stages.nonesuch.enabled", "trackers.console.every_s"]
for key in KEYS:
    for value in VALUES[: 15 if key.startswith(("method.", "data.")) else 8]:
        case("set", f"{key}={value}", ["validate", "exp.toml", "--set", f"{key}={value}"], experiment(),
             expect=(0, 2))
for bad in ["novalue", "=1", "a.=1", ".a=1", "a..b=1", "method.lora=1", "method.lora.r=[", "experiment=1",
            "method.nonesuch=1", "nonesuch.key=1", "a." * 3000 + "a=1", "method.lora.r=" + "[" * 5000,
            "template.name=nonesuch", "method.name=nonesuch", "model.source=nonesuch", "trackers.nonesuch.x=1"]:
    case("set", f"bad {bad[:30]}", ["validate", "exp.toml", "--set", bad], experiment())


# --- paths and symlinks ---------------------------------------------------------------------------------------------
def link_loop(d: Path):
    experiment()(d)
    (d / "loop.toml").symlink_to(d / "loop2.toml")
    (d / "loop2.toml").symlink_to(d / "loop.toml")


def fifo(d: Path):
    experiment()(d)
    os.mkfifo(d / "fifo.toml")


def output_file(d: Path):
    experiment()(d)
    (d / "taken").write_text("x")


case("paths", "missing file", ["validate", "nope.toml"], experiment())
case("paths", "folder as file", ["validate", "."], experiment())
case("paths", "link loop", ["validate", "loop.toml"], link_loop)
case("paths", "fifo", ["validate", "fifo.toml"], fifo)
case("paths", "too long name", ["validate", "a" * 5000 + ".toml"], experiment())
case("paths", "output_dir is a file", ["run", "exp.toml", "--set", "experiment.output_dir=taken"], output_file)
case("paths", "output_dir NUL", ["validate", "exp.toml", "--set", 'experiment.output_dir="a\\u0000b"'], experiment())
case("paths", "output_dir too long", ["run", "exp.toml", "--set", "experiment.output_dir=" + "b" * 300], experiment())
case("paths", "output_dir tilde", ["data", "exp.toml", "--set", "experiment.output_dir=~/runs"], experiment(),
     expect=(0,))
case("paths", "png at folder", ["data", "exp.toml", "--png", "."], experiment())
case("paths", "png under a file", ["data", "exp.toml", "--png", "exp.toml/x.png"], experiment())


def planted_png_link(d: Path):
    experiment()(d)
    (d / "victim").write_text("keep me")
    (d / "runs").mkdir()
    (d / "runs" / "l.png").symlink_to(d / "victim")


case("paths", "png is a planted link", ["data", "exp.toml", "--png", "runs/l.png"], planted_png_link, expect=(0,))
for name, path in {"data dir": ".", "data loop": "loop.toml", "data fifo": "fifo.toml", "data /dev/null": "/dev/null",
                   "data traversal": "../../../../etc/passwd", "data NUL": "a\\u0000.jsonl",
                   "data long": "c" * 5000 + ".jsonl", "data tilde missing": "~/nope.jsonl",
                   "data wrong ext": "exp.toml"}.items():
    case("paths", name, ["validate", "exp.toml", "--set", f'data.path="{path}"'],
         link_loop if "loop" in name else fifo if "fifo" in name else experiment())

# --- data files -----------------------------------------------------------------------------------------------------
DATA = {
    "empty": b"", "blank lines": b"\n\n\n", "non-utf8": b"\xff\xfe\x00\x80\n", "truncated row": b'{"messages": [',
    "array": b"[1, 2, 3]\n", "scalar rows": b"1\n2\n", "null row": b"null\n", "mixed": rows_text(TINY_ROWS[:3]).encode()
    + b"garbage\n", "escape codes": rows_text([{"prompt": "\x1b[2J\x1b]0;t\x07", "completion": "x"}] * 8).encode(),
    "huge row": rows_text([{"prompt": "a " * 200_000, "completion": "b"}] * 2).encode(),
}
for label, row in {
    "no answer": {"messages": [{"role": "user", "content": "hi"}]},
    "role unknown": {"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]},
    "content int": {"messages": [{"role": "user", "content": 1}, {"role": "assistant", "content": 2}]},
    "messages str": {"messages": "hello"}, "messages empty": {"messages": []},
    "content null": {"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": None}]},
    "prompt only": {"prompt": "x"}, "other columns": {"q": "a", "a": "b"},
    "nested deep": {"messages": [{"role": "user", "content": json.loads("[" * 500 + "]" * 500)}]},
}.items():
    DATA[f"row {label}"] = rows_text(TINY_ROWS[:4] + [row] + TINY_ROWS[4:]).encode()
for label, content in DATA.items():
    for command in ("data", "run"):
        def setup(d, content=content):
            experiment(rows=None)(d)
            (d / "rows.jsonl").write_bytes(content)
        case("data", f"{command} {label}", [command, "exp.toml", "--set", "method.max_steps=1"], setup,
             expect=(0, 2) if label == "escape codes" else (2,))
BAD_FILES = {"csv": b"a,b\n1\n\x00\x00", "parquet": b"PAR1garbage", "json": b"{\"a\": [", "csv empty": b""}
for ext, content in BAD_FILES.items():
    def setup(d, ext=ext, content=content):
        experiment(BASE.replace("rows.jsonl", "rows." + ext.split()[0]), rows=None)(d)
        (d / ("rows." + ext.split()[0])).write_bytes(content)
    case("data", f"file .{ext}", ["data", "exp.toml"], setup)


# --- model folders --------------------------------------------------------------------------------------------------
def model_setup(damage):
    def setup(d: Path):
        import torch
        from safetensors.torch import save_file

        from fx.sources.architectures import llama_config

        folder = d / "model"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(llama_config("tiny").to_dict()))
        save_file({"w": torch.zeros(2)}, folder / "model.safetensors")
        damage(folder)
        experiment(BASE.replace('source = "random"\narchitecture = "tiny"', f'source = "hf"\nname = "{folder}"'))(d)
    return setup


def edit(**changes):
    def damage(folder):
        config = json.loads((folder / "config.json").read_text())
        config.update(changes)
        (folder / "config.json").write_text(json.dumps(config))
    return damage


MODELS = {
    "empty": lambda f: [p.unlink() for p in f.iterdir()], "truncated config": lambda f: (f / "config.json")
    .write_text('{"model_'), "hidden big": edit(hidden_size="big"), "hidden 0": edit(hidden_size=0),
    "heads 0": edit(num_attention_heads=0), "t5": edit(model_type="t5", is_encoder_decoder=True),
    "custom code": edit(model_type="mine", auto_map={"AutoConfig": "conf.Mine"}), "unknown type": edit(model_type="q"),
    "bad tokenizer": lambda f: (f / "tokenizer.json").write_text("{x"), "empty weights": lambda f: (
        f / "model.safetensors").write_bytes(b""),
    "decoy": lambda f: ((f / "model.safetensors").rename(f / "decoy.safetensors"), (f / "decoy.safetensors")
                        .write_bytes(b""), (f / "pytorch_model.bin").write_bytes(b"x")),
    "pickle only": lambda f: ((f / "model.safetensors").unlink(), (f / "pytorch_model.bin").write_bytes(b"x")),
    "vocab -1": edit(vocab_size=-1), "layers str": edit(num_hidden_layers="3"),
}
for label, damage in MODELS.items():
    for command in ("plan", "data", "run", "validate"):
        case("models", f"{command} {label}", [command, "exp.toml"], model_setup(damage))

# --- budgets --------------------------------------------------------------------------------------------------------
for budget in ["abc", "nan", "inf", "-1", "0", "", "1e400", "t5", "10 GiB", "5000"]:
    case("budget", f"--budget {budget!r}", ["plan", "exp.toml", "--budget", budget], experiment())


# --- run directories and resume -------------------------------------------------------------------------------------
def fake_run(damage=None, checkpoints=(4, 8)):
    """A run folder as fx writes one, interrupted after its last checkpoint, with fake checkpoints and manifests."""
    def setup(d: Path):
        from fx import config
        from fx.run.directory import RunDir
        from fx.run.record import RunSummary
        from fx.training import checkpoints as ck

        experiment()(d)
        exp = config.load(d / "exp.toml")
        run = RunDir(d / "run")
        run.path.mkdir()
        run.write_setup(exp.resolved(), {"base_dir": str(d)})
        run.write_summary(RunSummary(name="run", status="interrupted", created="2026-01-01T00:00:00",
                                     started="2026-01-01T00:00:00+00:00", model="random", method="qlora_sft",
                                     template="llama2", steps=max(checkpoints, default=0)).to_dict())
        for step in checkpoints:
            folder = run.checkpoints / f"checkpoint-{step}"
            folder.mkdir(parents=True)
            for name in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"):
                (folder / name).write_bytes(os.urandom(256))
            ck.write_manifest(folder, step, exp.resolved())
        if damage:
            damage(run.path)
    return setup


def everywhere(name, how):
    def damage(run):
        for folder in (run / "checkpoints").glob("checkpoint-*"):
            how(folder / name)
    return damage


def truncate(path: Path):
    path.write_bytes(path.read_bytes()[:10])


RESUME = {
    "not a run": (lambda d: (d / "run").mkdir(), []),
    "a file": (lambda d: (d / "run").write_text("x"), []),
    "config garbage": (fake_run(lambda r: (r / "config.toml").write_text("[[[")), []),
    "config empty": (fake_run(lambda r: (r / "config.toml").write_text("")), []),
    "run.json garbage": (fake_run(lambda r: (r / "run.json").write_text("{")), ["--set", "method.learning_rate=1"]),
    "run.json base_dir list": (fake_run(lambda r: (r / "run.json").write_text('{"base_dir": [1]}')),
                               ["--set", "method.max_steps=1"]),
    "summary garbage completed": (fake_run(lambda r: (r / "summary.json").write_text('{"status": "completed"}')), []),
    "training key --set": (fake_run(), ["--set", "method.learning_rate=0.5"]),
    "lora --set": (fake_run(), ["--set", "method.lora.r=4"]),
    "data --set": (fake_run(), ["--set", "data.max_length=8"]),
    "edited lr": (fake_run(lambda r: (r / "config.toml").write_text((r / "config.toml").read_text()
                                                                      .replace("0.01", "0.5"))), []),
    "edited max_steps": (fake_run(lambda r: (r / "config.toml").write_text(
        (r / "config.toml").read_text().replace("max_steps = 12", "max_steps = 99"))), []),
    "reset without resume": (experiment(), None),
}
ck_name = "fx-manifest.json"
for name in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json", ck_name):
    RESUME[f"all {name} truncated"] = (fake_run(everywhere(name, truncate)), [])
    RESUME[f"all {name} deleted"] = (fake_run(everywhere(name, Path.unlink)), [])
RESUME["manifests list no files"] = (fake_run(everywhere(ck_name, lambda p: p.write_text(json.dumps(
    {"step": int(p.parent.name.split("-")[1]), "files": {}})))), [])
RESUME["summary unknown field"] = (fake_run(lambda r: (r / "summary.json").write_text(
    (r / "summary.json").read_text().replace('"version"', '"tokens_per_joule": 1, "version"'))), [])
RESUME["summary newer schema"] = (fake_run(lambda r: (r / "summary.json").write_text(
    (r / "summary.json").read_text().replace('"version": 1', '"version": 9'))), [])
RESUME["all optimizer deleted, --reset-optimizer, manifest garbage"] = (
    fake_run(lambda r: [everywhere("optimizer.pt", Path.unlink)(r),
                        everywhere(ck_name, lambda p: p.write_text("["))(r)]),
    ["--reset-optimizer"])
for label, (setup, extra) in RESUME.items():
    argv = ["run", "exp.toml", "--reset-optimizer"] if extra is None else ["run", "--resume", "run", *extra]
    case("resume", label, argv, setup)

# --- finished runs: every file a command reads from a run folder -----------------------------------------------------
def finished_run(damage=None):
    """A copy of one real finished run (trained once per corpus run, into the shared cache), then damaged."""
    def setup(d: Path):
        import shutil

        from fx import config, pipeline
        from fx.hooks import manager

        made = Path(os.environ["FX_HOSTILE_RUN"])
        if not (made / "adapter").is_dir():
            experiment(BASE.replace("max_steps = 12", "max_steps = 2"))(made.parent)
            folder = pipeline.execute(config.load(made.parent / "exp.toml"), manager.get())
            folder.rename(made)
        experiment()(d)
        shutil.copytree(made, d / "run")
        origin = json.loads((d / "run" / "run.json").read_text())
        (d / "run" / "run.json").write_text(json.dumps({**origin, "base_dir": str(d)}))
        if damage:
            damage(d / "run")
    return setup


def rewrite(name, change):
    return lambda r: (r / name).write_bytes(change((r / name).read_bytes()))


FINISHED = {
    "adapter junk": rewrite("adapter/adapter_model.safetensors", lambda b: os.urandom(len(b))),
    "adapter truncated": rewrite("adapter/adapter_model.safetensors", lambda b: b[: len(b) // 2]),
    "adapter empty": rewrite("adapter/adapter_model.safetensors", lambda b: b""),
    "adapter config r changed": rewrite("adapter/adapter_config.json", lambda b: b.replace(b'"r": 8', b'"r": 4')),
    "adapter manifest gone, config r changed": lambda r: ((r / "adapter" / ck_name).unlink(), rewrite(
        "adapter/adapter_config.json", lambda b: b.replace(b'"r": 8', b'"r": 4'))(r)),
    "adapter gone, completed": lambda r: __import__("shutil").rmtree(r / "adapter"),
    "config names another architecture": rewrite("config.toml", lambda b: b.replace(b'"tiny"', b'"smollm2-135m"')),
    "held-out data gone": lambda r: (r.parent / "rows.jsonl").unlink(),
    "summary garbage": rewrite("summary.json", lambda b: b"{"),
    "summary unknown field": rewrite("summary.json", lambda b: b.replace(b'"version"', b'"x": 1, "version"')),
    "merged folder junk": lambda r: ((r / "merged").mkdir(), (r / "merged" / "config.json").write_text("{")),
}
COMMANDS = {"merge": ["merge", "run", "--dtype", "float32"], "export": ["export", "run", "--quant", "f32"],
            "eval": ["eval", "run"], "generate": ["generate", "run", "--prompt", "hi"], "runs": ["runs", "."],
            "resume": ["run", "--resume", "run"]}
for label, damage in FINISHED.items():
    for command, argv in COMMANDS.items():
        # fx runs lists a damaged run as such (exit 0); a command that doesn't read the damaged file may go on
        spared = command == "runs" or label.startswith(("summary", "merged")) or (command, label) == (
            "generate", "held-out data gone")  # generate prompts the model; it reads no data
        case("finished", f"{command} {label}", argv, finished_run(damage), expect=(0, 2) if spared else (2,))
def merged_then(damage):
    def setup(r: Path):
        from fx.cli import main

        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            main(["merge", str(r), "--dtype", "float32"])
        damage(r / "merged")
    return setup


for label, damage in {"weights truncated": rewrite("model.safetensors", lambda b: b[:-64]),
                      "config junk": rewrite("config.json", lambda b: b"{"),
                      "record names a gone run": rewrite("fx_merged.json", lambda b: b'{"run": "/nonesuch"}')}.items():
    for argv in (["eval", "run/merged"], ["generate", "run/merged", "--prompt", "hi"], ["export", "run"]):
        # a merged folder whose record names a gone run is still found inside its run (moved together with it)
        case("finished", f"{argv[0]} merged {label}", argv, finished_run(merged_then(damage)),
             expect=(0, 2) if argv[0] == "export" or label == "record names a gone run" else (2,))
case("finished", "export --out where nothing can be made", ["export", "run", "--out", "/proc/x.gguf"], finished_run())
case("finished", "export --out a folder", ["export", "run", "--out", "run"], finished_run())
case("finished", "merge --out the run's config", ["merge", "run", "--out", "run/config.toml"], finished_run())

# --- stages ---------------------------------------------------------------------------------------------------------
for label, text in {
    "export ollama, template without a Go template": BASE + "\n[stages.export]\nenabled = true\nformat = 'ollama'\n",
    "unknown stage": BASE + "\n[stages.startswith]\nenabled = true\n",
    "stage table not a table": BASE.replace("[stages.evaluate]", "[stages]\nevaluate = 3\n[stages.generate2]"),
}.items():
    case("stages", label, ["run", "exp.toml"], experiment(text), expect=(0, 2))
case("stages", "max_steps 0", ["run", "exp.toml", "--set", "method.max_steps=0"], experiment())
case("data", "expect mixes strings and lists", ["data", "exp.toml"], experiment(rows=[
    {**r, "expect": r["expect"][0] if i % 2 else r["expect"]} for i, r in enumerate(TINY_ROWS)]), expect=(0,))

# --- concurrency: two first runs at once with an empty cache --------------------------------------------------------
case("concurrency", "two first fx data at once, empty cache", ["@concurrent", "data", "exp.toml"], experiment(),
     expect=(0,))


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + [n for n in dirnames if os.path.islink(os.path.join(dirpath, n))]:
            p = os.path.join(dirpath, name)
            try:
                st = os.lstat(p)
                out[p] = (st.st_size, st.st_mtime_ns)
            except OSError:
                pass
    return out


def checkpoint_dirs(root: Path) -> set[str]:
    return {p.name.split(".rejected")[0] for p in root.glob("run/checkpoints/checkpoint-*")}


class Timeout(Exception):
    pass


def run_case(c: Case, cache: Path) -> dict:
    from fx.cli import main
    from fx.hooks import manager

    with tempfile.TemporaryDirectory(prefix="fx-hostile-") as tmp:
        d = Path(tmp)
        (d / "home").mkdir()
        if c.setup:
            c.setup(d)
        before, kept = snapshot(d), checkpoint_dirs(d)
        env = {**os.environ, "HOME": str(d / "home"), "FX_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
        os.chdir(d)
        out, err, code, escaped = io.StringIO(), io.StringIO(), None, None
        if c.argv[0] == "@concurrent":
            env["FX_CACHE"] = str(d / "cache-fresh")  # an empty cache, shared by the two
            procs = [subprocess.Popen([sys.executable, "-m", "fx.cli", *c.argv[1:], "--png", f"p{i}.png"], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
            results = [p.communicate(timeout=300) for p in procs]
            code = max(p.returncode for p in procs)
            err.write("".join(e for _, e in results))
            allowed = (str(d / "runs"), str(d / "cache-fresh"), str(d / "p0.png"), str(d / "p1.png"),
                       str(d / "home" / ".cache" / "matplotlib"))  # matplotlib's font list, made once per home
        else:
            saved = dict(os.environ)
            os.environ.update(env)
            manager.get.cache_clear()
            old = signal.signal(signal.SIGALRM, lambda *a: (_ for _ in ()).throw(Timeout()))
            signal.alarm(120)
            try:
                with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                    code = main(c.argv)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 2
            except Timeout:
                code, escaped = "hang", "Timeout"
            except BaseException:
                escaped = traceback.format_exc()
            finally:
                signal.alarm(0)
                signal.signal(signal.SIGALRM, old)
                os.environ.clear()
                os.environ.update(saved)
                os.chdir(ROOT)
            # output_dir = "~/runs"; matplotlib's font list, made once per process in the home of its first plot
            allowed = (str(d / "runs"), str(d / "run"), str(d / "home" / "runs"),
                       str(d / "home" / ".cache" / "matplotlib"))
        after = snapshot(d)
        outside = sorted(p for p, v in after.items() if before.get(p) != v and not p.startswith(allowed))
        outside += sorted(p for p in before if p not in after and not p.startswith(allowed))
        victim = d / "victim"
        if victim.exists() and victim.read_text() != "keep me":
            outside.append(str(victim))
        lost = sorted(kept - checkpoint_dirs(d))
        text = err.getvalue()
        return {"category": c.category, "name": c.name, "exit": code,
                "traceback": bool(escaped) or "Traceback" in text, "outside": [p.replace(tmp, "<case>")
                                                                              for p in outside],
                "lost_checkpoints": lost, "unexpected_exit": code not in c.expect,
                "message": (escaped or text.strip().splitlines()[-1:] or [""])[-1][:300] if not escaped
                else escaped[-600:]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("-k", default="")
    args = p.parse_args()
    cases = [c for c in CASES if args.k in f"{c.category} {c.name}"]
    started = time.time()
    results = []
    with tempfile.TemporaryDirectory(prefix="fx-hostile-cache-") as cache:
        (Path(cache) / "finished").mkdir()
        os.environ["FX_HOSTILE_RUN"] = str(Path(cache) / "finished" / "run")  # made by the first case that needs it
        for i, c in enumerate(cases, 1):
            r = run_case(c, Path(cache))
            results.append(r)
            flag = ("TRACEBACK " * r["traceback"] + "OUTSIDE " * bool(r["outside"])
                    + "LOST " * bool(r["lost_checkpoints"]))
            print(f"[{i}/{len(cases)}] {c.category}: {c.name[:60]!s} -> exit {r['exit']} {flag}{r['message'][:100]!r}",
                  flush=True)
    totals = {"cases": len(results), "tracebacks": sum(r["traceback"] for r in results),
              "written_outside": sum(bool(r["outside"]) for r in results),
              "lost_checkpoints": sum(bool(r["lost_checkpoints"]) for r in results),
              "unexpected_exit": sum(r["unexpected_exit"] for r in results),
              "by_category": {cat: sum(r["category"] == cat for r in results) for cat in dict.fromkeys(
                  r["category"] for r in results)},
              "seconds": round(time.time() - started)}
    print(json.dumps(totals, indent=1))
    if args.out:
        args.out.write_text(json.dumps({"totals": totals, "results": results}, indent=1) + "\n")
    return 0 if not (totals["tracebacks"] or totals["written_outside"] or totals["lost_checkpoints"]) else 1


if __name__ == "__main__":
    sys.exit(main())
