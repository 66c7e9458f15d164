"""Tracker ``mlflow``: one MLflow run per fx run.

Params are the resolved experiment, flattened (``method.lora.r``); metrics are logged by optimizer step;
at the end the summary's numbers become metrics too, and the adapter, ``plots/``, ``config.toml``,
``summary.json`` and ``samples.md`` become artifacts. The MLflow experiment is named after the fx experiment.

By default the store is local: ``<output_dir>/mlflow.db`` (SQLite) with artifacts in
``<output_dir>/mlartifacts``, so every run of an output folder is in one place:
``mlflow ui --backend-store-uri sqlite:///runs/mlflow.db``. ``tracking_uri`` points elsewhere (a server,
another database). Needs the ``mlflow`` extra: ``pip install 'fx[mlflow]'``.
"""

from __future__ import annotations

import logging
import time

from pydantic import Field

import fx
from fx.run.tracking import Tracker, needs_extra

PARAM_LENGTH = 6000  # MLflow refuses longer parameter values
PARAMS_PER_BATCH = 100  # and more parameters in one log_batch call
STATUS = {"completed": "FINISHED", "interrupted": "KILLED"}


def flat_params(config: dict, prefix: str = "") -> dict[str, str]:
    params: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            params.update(flat_params(value, f"{prefix}{key}."))
        else:
            params[f"{prefix}{key}"] = str(value)[:PARAM_LENGTH]
    return params


class MlflowTracker(Tracker):
    description = ("an MLflow run (params, metrics by step, adapter and plots as artifacts); "
                   "local SQLite store by default")

    class Settings(Tracker.Settings):
        tracking_uri: str | None = Field(None, min_length=1, max_length=4096)

    @classmethod
    def check(cls, settings) -> list[str]:
        uri = settings.tracking_uri
        modules = ["mlflow"] + (["sqlalchemy", "alembic"] if uri is None or uri.startswith("sqlite:") else [])
        return needs_extra("mlflow", *modules)

    def start(self) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        for name in ("mlflow", "alembic"):  # table creation and migrations are chatty at INFO
            logging.getLogger(name).setLevel(logging.WARNING)
        output_dir = self.run.dir.parent.resolve()
        uri = self.settings.tracking_uri or f"sqlite:///{output_dir / 'mlflow.db'}"
        self.client = MlflowClient(tracking_uri=uri)
        name = self.run.config["experiment"]["name"]
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
            # deleted in the UI, still holding the name: runs can't be added
            if experiment.lifecycle_stage == "deleted":
                self.client.restore_experiment(experiment_id)
        elif self.settings.tracking_uri is None:
            experiment_id = self.client.create_experiment(name, artifact_location=(output_dir / "mlartifacts").as_uri())
        else:
            experiment_id = self.client.create_experiment(name)
        tags = {"fx.run_dir": str(self.run.dir.resolve()), "fx.model": self.run.config["model"]["source"],
                "fx.method": self.run.config["method"]["name"]}
        self.run_id = self.client.create_run(experiment_id, run_name=self.run.name, tags=tags).info.run_id
        params = [Param(k, v) for k, v in flat_params(self.run.config).items()]
        for i in range(0, len(params), PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[i : i + PARAMS_PER_BATCH])
        self.last_step = 0

    def log(self, step, metrics) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, (int, float))]
        self.client.log_batch(self.run_id, metrics=batch)
        self.last_step = max(self.last_step, step)

    def finish(self, summary, error) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        numbers = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.client.log_batch(self.run_id,
                              metrics=[Metric(k, float(v), now, self.last_step) for k, v in numbers.items()])
        folder = self.run.dir
        if (folder / "adapter").is_dir():
            self.client.log_artifacts(self.run_id, str(folder / "adapter"), "adapter")
        if (folder / "plots").is_dir():
            self.client.log_artifacts(self.run_id, str(folder / "plots"), "plots")
        for name in ("config.toml", "summary.json", "samples.md"):
            if (folder / name).is_file():
                self.client.log_artifact(self.run_id, str(folder / name))
        self.client.set_terminated(self.run_id, STATUS.get(summary.get("status"), "FAILED"))


@fx.hookimpl
def fx_register_trackers(register):
    register("mlflow", MlflowTracker)
