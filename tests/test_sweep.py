"""``fx sweep`` and ``fx report`` on the tiny model: bad sweeps refused before any training with every problem at
once; a grid sweep stopped with Ctrl-C in the middle resumes without training anything twice; an optuna sweep
optimises its metric in SQLite and a second sweep process on the same storage takes other trials; the report opens
in a real browser (headless Chromium, skipped where there is none) with its tables, curves and samples."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY_EXPERIMENT, TINY_ROWS

pytestmark = pytest.mark.slow  # every point trains the tiny model

SLOW_STEPS = '''
import os
if os.environ.get("FX_TEST_SLOW_STEPS"):  # a training step takes this much longer (a point to stop mid-way)
    import time

    import transformers

    step, pause = transformers.Trainer.training_step, float(os.environ["FX_TEST_SLOW_STEPS"])

    def training_step(self, *args, **kwargs):
        time.sleep(pause)
        return step(self, *args, **kwargs)

    transformers.Trainer.training_step = training_step
'''
QUICK = """
[checkpoints]
every_steps = 4

[stages.generate]
count = 1
max_new_tokens = 4
"""


def sweep_file(root: Path, sweep: str, extra: str = "") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TINY_ROWS))
    text = TINY_EXPERIMENT.replace("{out}", str(root / "out")).replace(
        "[stages.generate]\ncount = 2\nmax_new_tokens = 4\n", "") + QUICK + extra + "\n[sweep]\n" + sweep
    (root / "sweep.toml").write_text(text)
    return root / "sweep.toml"


def fx(*args, cwd: Path | None = None, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fx.cli", *args], capture_output=True, text=True, timeout=900,
                          cwd=cwd, env={**os.environ, **env})


def state(folder: Path) -> dict:
    return json.loads((folder / "sweep.json").read_text())


def steps_of(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "history.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


def test_bad_sweeps_are_refused_before_any_training_with_every_problem(tmp_path):
    path = sweep_file(tmp_path, '''"method.max_step" = [4, 8]
"method.learning_rate" = ["fast"]
"template.name" = []
''', '\n[budget]\ngpu = "t4"\n')
    done = fx("sweep", str(path))
    assert done.returncode == 2, done.stderr
    assert "sweep.parameters.template.name: no values (an empty grid)" in done.stderr
    assert not (tmp_path / "out").exists()
    path.write_text(path.read_text().replace('"template.name" = []\n', ""))
    done = fx("sweep", str(path))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    err = done.stderr
    assert "sweep: method.max_step: unknown key; did you mean 'max_steps'?" in err and err.count("max_step:") == 1
    assert "sweep: method.learning_rate:" in err and "'fast'" in err
    assert not (tmp_path / "out").exists()  # nothing started
    big = sweep_file(tmp_path / "big", '''"model.architecture" = ["tiny", "llama2-70b"]
''', '\n[budget]\ngpu = "t4"\n')
    done = fx("sweep", str(big))
    assert done.returncode == 2 and "sweep: point model.architecture='llama2-70b' is over the budget" in done.stderr
    assert not (tmp_path / "big" / "out").exists()
    ranged = sweep_file(tmp_path / "ranged", '''strategy = "grid"
"method.learning_rate" = {low = 0.01, high = 0.001}
''')
    done = fx("sweep", str(ranged))
    assert done.returncode == 2 and "must be below high" in done.stderr


@pytest.fixture(scope="module")
def stopped_and_resumed(tmp_path_factory):
    """A grid of three points, stopped with Ctrl-C while its second point trains, then resumed."""
    root = tmp_path_factory.mktemp("grid")
    path = sweep_file(root, '''"method.learning_rate" = [0.01, 0.003, 0.001]
metric = "eval_after.loss"
''')
    site = root / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SLOW_STEPS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
           "FX_TEST_SLOW_STEPS": "0.4"}
    proc = subprocess.Popen([sys.executable, "-m", "fx.cli", "sweep", str(path)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        runs = [p for p in (root / "out").glob("*-sweep-*/tiny-p01-*") if (p / "history.jsonl").is_file()]
        if runs and len(steps_of(runs[0])) >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=600)
    (folder,) = (root / "out").glob("*-sweep-*")
    stopped = state(folder)
    resumed = fx("sweep", "--resume", str(folder))
    return folder, proc.returncode, out + err, stopped, resumed


def test_a_grid_sweep_stopped_in_the_middle_resumes_without_training_twice(stopped_and_resumed):
    folder, code, said, stopped, resumed = stopped_and_resumed
    assert code == 130 and f"Resume with: fx sweep --resume {folder}" in said
    assert [p["status"] for p in stopped["points"]] == ["completed", "interrupted", "pending"]
    first_summary = json.loads((Path(stopped["points"][0]["run"]) / "summary.json").read_text())
    assert resumed.returncode == 0, resumed.stderr
    after = state(folder)
    assert [p["status"] for p in after["points"]] == ["completed"] * 3
    assert json.loads((Path(after["points"][0]["run"]) / "summary.json").read_text()) == first_summary  # kept
    interrupted = json.loads((Path(after["points"][1]["run"]) / "summary.json").read_text())
    assert 2 <= interrupted["resumed_from_step"] < 12 and len(interrupted["segments"]) == 2  # its stop checkpoint
    for point in after["points"]:
        assert steps_of(Path(point["run"])) == list(range(1, 13))  # every step once
    values = [p["value"] for p in after["points"]]
    table = [line for line in resumed.stdout.splitlines() if line.startswith("  p")]
    assert len(table) == 3 and "<- best" in table[values.index(min(values))]


def test_an_optuna_sweep_optimises_in_sqlite_and_a_second_process_takes_other_trials(tmp_path):
    optuna = pytest.importorskip("optuna")
    db = tmp_path / "study.db"
    spec = f'''strategy = "optuna"
storage = "sqlite:///{db}"
study = "lr"
"method.learning_rate" = {{low = 0.0005, high = 0.03, log = true}}
"method.lora.r" = [4, 8]
'''
    first = fx("sweep", str(sweep_file(tmp_path / "a", spec + "count = 2\n")))
    second = fx("sweep", str(sweep_file(tmp_path / "b", spec + "count = 4\n")))
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    (a,), (b,) = (tmp_path / "a" / "out").glob("*-sweep-*"), (tmp_path / "b" / "out").glob("*-sweep-*")
    trials_a = {p["trial"]: p for p in state(a)["points"]}
    trials_b = {p["trial"]: p for p in state(b)["points"]}
    assert set(trials_a) == {0, 1} and set(trials_b) == {2, 3}  # the second process took the study's next trials
    study = optuna.load_study(study_name="lr", storage=f"sqlite:///{db}")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 4
    values = {**{t: p["value"] for t, p in trials_a.items()}, **{t: p["value"] for t, p in trials_b.items()}}
    assert study.best_value == min(values.values())  # eval_after.loss: minimised
    for t in complete:
        assert t.params["method.learning_rate"] == pytest.approx(
            {**trials_a, **trials_b}[t.number]["values"]["method.learning_rate"])


def chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)),
                None)


def test_the_report_opens_in_a_real_browser_with_its_tables_curves_and_samples(stopped_and_resumed, tmp_path):
    folder = stopped_and_resumed[0]
    done = fx("report", str(folder))
    assert done.returncode == 0, done.stderr
    page = folder / "report.html"
    text = page.read_text()
    # self-contained: nothing fetched (the SVGs' namespace names are names, not requests)
    assert not re.search(r"(src|href)=[\"']?(https?:)?//", text) and "<script" not in text and "<link" not in text
    browser = chromium()
    if browser is None:
        pytest.skip("no Chromium here (Debian: apt-get install chromium)")
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    assert "<h2 id=\"results\">Results</h2>" in dom
    names = [Path(p["run"]).name for p in state(folder)["points"]]
    assert all(dom.count(name) >= 4 for name in names)  # what differs, results, cost, samples
    assert dom.count("★") == 1 and dom.count("<svg") >= 2  # the best marked; loss curves and the swept key
    assert "What is 1 plus 1?" in dom  # the samples, one table per prompt
    shot = tmp_path / "report.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1200,1600", page.as_uri()], capture_output=True, timeout=120)
    assert shot.stat().st_size > 10_000


def test_a_report_of_one_run(train_tiny, tmp_path):
    _, run = train_tiny("tiny")
    out = tmp_path / "one.html"
    done = fx("report", str(run), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "the runs' configs are the same" in out.read_text() and "<svg" in out.read_text()
    assert fx("report", str(tmp_path / "nothing")).returncode == 2


def test_each_free_gpu_gets_a_point_not_yet_running(tmp_path):
    """With several GPUs, the next point is one that no GPU runs yet (a point left running by a dead sweep too)."""
    from fx.sweep.plan import SweepSettings
    from fx.sweep.run import Point, Sweep, _next

    settings = SweepSettings(parameters={"method.lora.r": [4, 8, 16]})
    sweep = Sweep(tmp_path, tmp_path / "s.toml", [], settings, "s",
                  [Point(0, {"method.lora.r": 4}, "running"), Point(1, {"method.lora.r": 8}, "running"),
                   Point(2, {"method.lora.r": 16})])
    assert _next(sweep, None, {0}).index == 1  # point 1 ran when an earlier sweep died: resumed first
    assert _next(sweep, None, {0, 1}).index == 2
    assert _next(sweep, None, {0, 1, 2}) is None


def test_the_shipped_sweeps_check_clean_and_a_list_sweep_takes_its_points_as_they_are(tmp_path):
    from conftest import ROOT
    from fx.errors import ConfigError
    from fx.sweep import plan

    for name in ("templates", "methods"):
        path = ROOT / "experiments" / "sweeps" / f"{name}.toml"
        _, settings = plan.read(path)
        assert plan.check(path, settings, []) == []
    _, methods = plan.read(ROOT / "experiments" / "sweeps" / "methods.toml")
    assert [p["method.name"] for p in plan.points(methods)] == ["qlora_sft", "dpo", "orpo"]
    assert methods.keys()[:2] == ["method.name", "data.path"]
    with pytest.raises(ConfigError, match="belong to grid, random or optuna"):
        plan.settings_of({"sweep": {"strategy": "list", "points": [{"method.name": "dpo"}],
                                    "template.name": ["llama2"]}}, tmp_path / "s.toml")
