"""Optional MLflow tracking of training runs, and the MLflow model alias of
the registry's production version.

With a tracking URI (``tracking.mlflow_uri``, else MLFLOW_TRACKING_URI on the
driver) the training driver starts an MLflow run, or, for a run directory that
already has one (``RUN/mlflow.json``), continues it: the config as parameters
(secrets redacted, the tracking URI left out), tags for the data manifest
digest and the code version. Rank 0 logs each epoch's metrics as the epoch
ends (step: the epoch counted over both phases); after training the driver
logs any epoch a failed attempt did not, the evaluation metrics, the plots and
reports as artifacts and the scaling section. ``mlflow`` is imported only when
tracking is configured. Failures to reach the server are logged as warnings:
tracking never fails a training run."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import Optional

from pipeline import storage as st
from pipeline.config import Config
from pipeline.errors import UsageError

log = logging.getLogger(__name__)

RUN_FILE = "mlflow.json"  # in the run directory: {"tracking_uri", "experiment_id", "run_id"}
TAG_PREFIX = "inception_ray."
EPOCH_METRICS = ("loss", "accuracy", "top_k_accuracy", "val_loss", "val_accuracy", "val_top_k_accuracy",
                 "learning_rate", "images_per_s", "seconds", "examples", "skipped_records")
EVALUATION_METRICS = ("examples", "accuracy", "top_k_accuracy", "macro_f1", "skipped_records")
REPORTS = ("metrics.json", "history.json", "training.png", "confusion.png", "config.yaml", "preprocessing.json",
           "labels.json")
LEFT_OUT_PARAMS = ("tracking.mlflow_uri",)  # may carry credentials in the URL
PARAM_LIMIT = 6000  # characters of a parameter value MLflow keeps


def tracking_uri(cfg: Config) -> Optional[str]:
    return cfg.tracking.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or None


def client(uri: str):
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise UsageError("MLflow tracking is configured (tracking.mlflow_uri or MLFLOW_TRACKING_URI) but mlflow is "
                         "not installed: pip install -e .[mlflow]") from None
    return MlflowClient(tracking_uri=uri)


def check(cfg: Config) -> None:
    """Before cluster work: tracking configured means mlflow must be installed."""
    if tracking_uri(cfg) or cfg.tracking.mlflow_model_name:
        client(tracking_uri(cfg) or "")


def flat_params(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flat_params(value, f"{prefix}{key}."))
        elif f"{prefix}{key}" not in LEFT_OUT_PARAMS:
            out[f"{prefix}{key}"] = str(value)[:PARAM_LIMIT]
    return out


def _chunks(items: list, size: int = 100) -> list:
    return [items[i:i + size] for i in range(0, len(items), size)]


def start_run(cfg: Config, output: str, *, tags: dict) -> Optional[dict]:
    """{"tracking_uri", "experiment_id", "run_id"} of the run directory's MLflow
    run: continued when ``RUN/mlflow.json`` names one on this tracking server,
    else created (parameters, tags) and recorded there. None when tracking is
    off or the server cannot be reached."""
    uri = tracking_uri(cfg)
    if not uri:
        return None
    mlflow_client = client(uri)
    from mlflow.entities import Param, RunTag

    record_uri = st.join(output, RUN_FILE)
    try:
        record = st.read_json(record_uri, cfg.storage)
    except FileNotFoundError:
        record = None
    try:
        tag_list = [RunTag(k, str(v)) for k, v in tags.items() if v is not None]
        if record and record.get("tracking_uri") == uri:
            mlflow_client.update_run(record["run_id"], status="RUNNING")
            mlflow_client.log_batch(record["run_id"], tags=tag_list)
            log.info("mlflow: continuing run %s (%s)", record["run_id"], uri)
            return record
        experiment = mlflow_client.get_experiment_by_name(cfg.tracking.mlflow_experiment)
        experiment_id = (experiment.experiment_id if experiment is not None
                         else mlflow_client.create_experiment(cfg.tracking.mlflow_experiment))
        run = mlflow_client.create_run(experiment_id, run_name=output.rstrip("/").rsplit("/", 1)[-1])
        run_id = run.info.run_id
        params = [Param(k, v) for k, v in sorted(flat_params(cfg.to_dict(redact=True)).items())]
        for part in _chunks(params):
            mlflow_client.log_batch(run_id, params=part)
        mlflow_client.log_batch(run_id, tags=tag_list)
    except Exception as exc:  # noqa: BLE001
        log.warning("mlflow: cannot start tracking at %s, training goes on without it: %s", uri, exc)
        return None
    record = {"tracking_uri": uri, "experiment_id": experiment_id, "run_id": run_id}
    st.write_json(record_uri, record, cfg.storage)
    log.info("mlflow: run %s in experiment '%s' (%s)", run_id, cfg.tracking.mlflow_experiment, uri)
    return record


def _metrics(entry: dict, step: int, names=EPOCH_METRICS, prefix: str = "") -> list:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(prefix + k, float(entry[k]), now, step) for k in names
            if isinstance(entry.get(k), (int, float)) and not isinstance(entry.get(k), bool)]


class EpochLogger:
    """Rank 0's per-epoch metrics, logged as each epoch ends."""

    def __init__(self, record: dict):
        self.record = record
        self.client = client(record["tracking_uri"])

    def epoch(self, step: int, entry: dict) -> None:
        try:
            self.client.log_batch(self.record["run_id"], metrics=_metrics(entry, step))
        except Exception as exc:  # noqa: BLE001 - the driver logs what is missing after training
            log.warning("mlflow: epoch %d not logged: %s", step, exc)


def finish_run(record: Optional[dict], cfg: Config, output: str, *, history: list, metrics: dict,
               scaling: Optional[dict], status: str = "FINISHED") -> None:
    """After training: epochs no attempt logged, evaluation metrics, reports as
    artifacts, the scaling section; then the run's status."""
    if not record:
        return
    mlflow_client = client(record["tracking_uri"])
    run_id = record["run_id"]
    try:
        logged = {m.step for m in mlflow_client.get_metric_history(run_id, "loss")}
        missing = [m for step, entry in enumerate(history, start=1) if step not in logged
                   for m in _metrics(entry, step)]
        for part in _chunks(missing, 1000):
            mlflow_client.log_batch(run_id, metrics=part)
        if metrics:
            mlflow_client.log_batch(run_id, metrics=_metrics(metrics, len(history), EVALUATION_METRICS, "eval_"))
        if scaling:
            mlflow_client.log_dict(run_id, scaling, "scaling.json")
        with tempfile.TemporaryDirectory(prefix="inception-ray-mlflow-") as tmp:
            for name in REPORTS:
                try:
                    data = st.read_bytes(st.join(output, name), cfg.storage)
                except FileNotFoundError:
                    continue
                with open(os.path.join(tmp, name), "wb") as f:
                    f.write(data)
                mlflow_client.log_artifact(run_id, os.path.join(tmp, name), "plots" if name.endswith(".png") else
                                           "reports")
        mlflow_client.set_terminated(run_id, status)
    except Exception as exc:  # noqa: BLE001
        log.warning("mlflow: the end of run %s was not logged: %s", run_id, exc)


def fail_run(record: Optional[dict]) -> None:
    if not record:
        return
    try:
        client(record["tracking_uri"]).set_terminated(record["run_id"], "FAILED")
    except Exception as exc:  # noqa: BLE001
        log.warning("mlflow: run %s not marked failed: %s", record["run_id"], exc)


def set_production_alias(cfg: Config, registry: str, name: str, version: str, folder: str) -> Optional[dict]:
    """Point alias ``tracking.mlflow_alias`` of MLflow's registered model
    ``tracking.mlflow_model_name`` at the model version for registry
    ``version`` (created on first use: tagged with the registry, name and
    version; its source is the MLflow run that trained it, ``runs:/ID``, else
    the registry folder when it is not on local disk). Returns
    {"model", "alias", "version"}; None when not configured or it failed."""
    model = cfg.tracking.mlflow_model_name
    uri = tracking_uri(cfg)
    if not model or not uri:
        return None
    mlflow_client = client(uri)
    try:
        trained_by = st.read_json(st.join(folder, RUN_FILE), cfg.storage)
    except Exception:  # noqa: BLE001 - a version without a tracked run
        trained_by = None
    run_id = trained_by["run_id"] if trained_by and trained_by.get("tracking_uri") == uri else None
    tags = {f"{TAG_PREFIX}registry": registry, f"{TAG_PREFIX}name": name, f"{TAG_PREFIX}version": version}
    try:
        from mlflow.exceptions import MlflowException

        try:
            mlflow_client.create_registered_model(model)
        except MlflowException as exc:
            if getattr(exc, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                raise
        found = [v for v in mlflow_client.search_model_versions(f"name='{model}'")
                 if v.tags.get(f"{TAG_PREFIX}version") == version and v.tags.get(f"{TAG_PREFIX}registry") == registry]
        if found:
            number = found[0].version
        else:
            if run_id:
                source = f"runs:/{run_id}"
            elif not st.is_local(folder):
                source = folder
            else:
                log.warning("mlflow: version %s of '%s' has no MLflow run and lives on local disk, which MLflow "
                            "takes as a source only inside a run; alias not set", version, name)
                return None
            number = mlflow_client.create_model_version(model, source, run_id=run_id, tags=tags).version
        mlflow_client.set_registered_model_alias(model, cfg.tracking.mlflow_alias, number)
    except Exception as exc:  # noqa: BLE001 - the registry's production.json is what serving reads
        log.warning("mlflow: alias %s of model '%s' not set to registry version %s: %s", cfg.tracking.mlflow_alias,
                    model, version, exc)
        return None
    log.info("mlflow: model '%s' alias '%s' -> version %s (registry version %s)", model, cfg.tracking.mlflow_alias,
             number, version)
    return {"model": model, "alias": cfg.tracking.mlflow_alias, "version": str(number)}
