"""MLflow tracking: each run an MLflow run, side by side with the others.

Needs the ``mlflow`` package (``pip install 'trainer-core[mlflow]'``).  By
default the runs go to a SQLite store beside the run folders
(``<runs root>/mlflow.db``, artifacts in ``<runs root>/mlartifacts``): it
works offline with nothing running, and ``mlflow ui --backend-store-uri
sqlite:///runs/mlflow.db`` shows them.  ``tracking_uri`` (or the
``MLFLOW_TRACKING_URI`` environment variable) sends them to a server instead.

Logged: the resolved config as params; every metric of every evaluation and
every training-log interval, with its step; ``summary.json``,
``config.toml`` and the best checkpoint's weights (as ``model.safetensors``,
which ``trainer eval --checkpoint`` reads) as artifacts; tags ``model``,
``dataset``, ``task`` and ``status``.  A resumed run continues the same MLflow
run (its id travels in the checkpoint); a run that fails ends ``FAILED``, one
stopped by a signal or Ctrl-C ``KILLED``.  Nothing happens during training
steps: the intervals' values wait in memory and go out together every
``flush_secs``, at each evaluation, checkpoint and at the end, as
tensorboard's do.  Rank zero only.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from trainer_core import UsageError, flat_settings, hookimpl, rank_zero_only

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from trainer_core import Trainer

log = logging.getLogger("trainer_core")

MISSING = "the mlflow plugin needs the mlflow package: pip install 'trainer-core[mlflow]'"
STORE, ARTIFACTS = "mlflow.db", "mlartifacts"  # the default store, in the runs root
_RUN_ID = re.compile(r"[0-9a-f]{32}")  # MLflow's run ids: what a checkpoint may name, nothing else
_UNSAFE_KEY = re.compile(r"[^\w./\- :]")  # characters MLflow refuses in metric and param names
_BATCH = 1000  # metrics per log_batch request (MLflow's limit)
_PARAM_BATCH, _PARAM_LENGTH = 100, 6000  # params per request and characters per value (MLflow's limits)


@rank_zero_only  # its only effects are in the tracking store
class MLflow:
    """Logs the run to MLflow: params, metrics with their steps, artifacts, tags and status."""

    def __init__(self, tracking_uri: str | None = None, experiment: str = "trainer-core", run_name: str | None = None,
                 artifacts: bool = True, flush_secs: int = 30) -> None:
        """:param tracking_uri: where the runs go (``http://host:5000``, ``sqlite:///path.db``...);
            default ``MLFLOW_TRACKING_URI``, else ``sqlite:///<runs root>/mlflow.db``.
        :param experiment: the MLflow experiment the run belongs to (created if new).
        :param run_name: the MLflow run's name (default: the run folder's name).
        :param artifacts: log summary.json, config.toml and the best checkpoint's weights at the end.
        :param flush_secs: most seconds training-log values wait in memory before they are sent."""
        try:
            import mlflow  # noqa: F401  (here, so a missing package stops the run before its folder exists)
        except ImportError:
            raise UsageError(MISSING) from None
        if flush_secs < 1:
            raise ValueError(f"mlflow.flush_secs must be >= 1 (got {flush_secs})")
        if not experiment:
            raise ValueError("mlflow.experiment must not be empty")
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_name = run_name
        self.artifacts = artifacts
        self.flush_secs = flush_secs
        #: The MLflow run's id, once it is started (or continued, on resume).
        self.run_id: str | None = None
        self.client: MlflowClient | None = None
        self._experiment_id: str | None = None
        self._resumed_id: str | None = None
        self._pending: list[tuple[str, float, int, int]] = []  # (key, value, timestamp ms, step) not yet sent
        self._next_flush = 0.0

    # -- the store and the run --------------------------------------------------

    @hookimpl
    def on_fit_start(self, trainer: Trainer) -> None:
        from mlflow import MlflowClient

        uri = self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        artifact_root = None
        if not uri:
            if trainer.run_path is None:
                raise UsageError("mlflow has no store: this run has no run folder; set -o mlflow.tracking_uri=URI "
                                 "or MLFLOW_TRACKING_URI")
            root = trainer.run_path.resolve().parent
            uri, artifact_root = f"sqlite:///{root / STORE}", (root / ARTIFACTS).as_uri()
        # A new SQLite store announces its table migrations at INFO on stderr: noise in a run's output (-q too).
        for name in ("mlflow.store.db.utils", "alembic.runtime.migration"):
            logging.getLogger(name).setLevel(logging.WARNING)
        self.client = client = MlflowClient(tracking_uri=uri)
        self._experiment_id = self._experiment(client, artifact_root)
        self.run_id, self._resumed_id, self._pending = None, None, []
        self._next_flush = time.monotonic() + self.flush_secs

    def _experiment(self, client: MlflowClient, artifact_root: str | None) -> str:
        from mlflow.exceptions import MlflowException

        try:
            found = client.get_experiment_by_name(self.experiment)
            if found is None:
                try:
                    return client.create_experiment(self.experiment, artifact_location=artifact_root)
                except MlflowException:  # created meanwhile by a run started at the same time
                    found = client.get_experiment_by_name(self.experiment)
        except MlflowException as exc:
            raise UsageError(f"mlflow: the tracking store at {client.tracking_uri} cannot be used: "
                             f"{_first_line(exc)}; check -o mlflow.tracking_uri or MLFLOW_TRACKING_URI") from None
        if found is None or found.lifecycle_stage != "active":
            raise UsageError(f"mlflow: experiment '{self.experiment}' is deleted in {client.tracking_uri}; restore it "
                             "(mlflow experiments restore) or choose another with -o mlflow.experiment=NAME")
        if artifact_root is not None and found.artifact_location != artifact_root:
            # The default store is a file in the runs root: what it says must not choose where the run writes.
            raise UsageError(f"mlflow: experiment '{self.experiment}' in {client.tracking_uri} keeps its artifacts at "
                             f"{found.artifact_location}, not beside the store ({artifact_root}); choose another with "
                             "-o mlflow.experiment=NAME, or name the store with -o mlflow.tracking_uri=URI")
        return found.experiment_id

    def _start(self, trainer: Trainer) -> None:
        """Start the MLflow run, or continue the one a resumed checkpoint names: at the
        first epoch, once a resume has restored this plugin's state."""
        from mlflow.exceptions import MlflowException

        assert self.client is not None and self._experiment_id is not None, "mlflow used before on_fit_start"
        client, logged = self.client, {}
        if self._resumed_id is not None:
            try:
                previous = client.get_run(self._resumed_id)
                self.run_id, logged = previous.info.run_id, previous.data.params
                client.update_run(self.run_id, status="RUNNING")
            except MlflowException:
                log.warning("mlflow: the run %s this checkpoint continues is not in %s; starting a new MLflow run",
                            self._resumed_id, client.tracking_uri)
        if self.run_id is None:
            name = self.run_name or (trainer.run_path.name if trainer.run_path is not None else None)
            self.run_id = client.create_run(self._experiment_id, run_name=name).info.run_id
        self._log_params(trainer, logged)
        client.set_tag(self.run_id, "status", "running")
        for key, value in (("model", trainer.config.model), ("dataset", trainer.config.dataset), ("task", trainer.task.name),
                           ("run_folder", str(trainer.run_path.resolve()) if trainer.run_path is not None else None)):
            if value is not None:
                client.set_tag(self.run_id, key, value)

    def _log_params(self, trainer: Trainer, logged: Mapping[str, str]) -> None:
        """The resolved config as params.  MLflow keeps a param's first value: on a resume,
        settings the user changed (more epochs) are named in a warning, not logged."""
        from mlflow.entities import Param

        assert self.client is not None and self.run_id is not None
        params = {_UNSAFE_KEY.sub("_", key): str(value)[:_PARAM_LENGTH] for key, value in flat_settings(trainer.config.to_toml())}
        changed = sorted(k for k, v in params.items() if k in logged and logged[k] != v)
        if changed:
            log.warning("mlflow: the resumed run keeps its first value of %s (MLflow params cannot change)", ", ".join(changed))
        new = [Param(k, v) for k, v in params.items() if k not in logged]
        for start in range(0, len(new), _PARAM_BATCH):
            self.client.log_batch(self.run_id, params=new[start:start + _PARAM_BATCH])

    @hookimpl
    def on_epoch_start(self, trainer: Trainer) -> None:
        if self.run_id is None:
            self._start(trainer)

    # -- metrics ----------------------------------------------------------------

    def _add(self, values: Mapping[str, Any], step: int) -> None:
        now = int(time.time() * 1000)
        self._pending.extend((key, float(value), now, step) for key, value in values.items())

    def _flush(self) -> None:
        """Send the waiting values, in requests of MLflow's largest size.  A store that
        fails (a server gone) costs a warning, not the training: the values wait for the
        next flush."""
        from mlflow.entities import Metric
        from mlflow.exceptions import MlflowException

        self._next_flush = time.monotonic() + self.flush_secs
        if self.run_id is None or self.client is None:
            return
        while self._pending:
            chunk = self._pending[:_BATCH]
            try:
                self.client.log_batch(self.run_id, metrics=[Metric(_UNSAFE_KEY.sub("_", key), value, stamp, step)
                                                            for key, value, stamp, step in chunk])
            except MlflowException as exc:
                log.warning("mlflow: %d values not sent (%s); they wait for the next flush", len(self._pending),
                            _first_line(exc))
                return
            del self._pending[:len(chunk)]

    @hookimpl
    def on_train_log(self, trainer: Trainer, metrics: Mapping[str, float]) -> None:
        self._add({"train/loss": metrics["train/loss"], "lr": metrics["lr"]}, trainer.state.step)
        if time.monotonic() >= self._next_flush:
            self._flush()

    @hookimpl
    def on_eval(self, trainer: Trainer, metrics: Mapping[str, Any]) -> None:
        if self.run_id is None:  # an evaluation before any epoch (a resume that had finished training)
            self._start(trainer)
        # The evaluation of weights restored at the end (the best) is no point of the epochs' curves.
        prefix = "restored/" if trainer.state.restored is not None else ""
        self._add({prefix + ("train/loss_epoch" if key == "train/loss" else key): value for key, value in metrics.items()
                   if key not in ("epoch", "step") and isinstance(value, (int, float))}, trainer.state.step)
        self._flush()

    # -- resume -----------------------------------------------------------------

    @hookimpl
    def plugin_state_dict(self, trainer: Trainer) -> dict[str, Any] | None:
        self._flush()  # in the store before the checkpoint a resume starts from
        return {"run_id": self.run_id} if self.run_id is not None else None

    @hookimpl
    def load_plugin_state(self, trainer: Trainer, state: dict[str, Any]) -> None:
        run_id = state.get("run_id")
        if isinstance(run_id, str) and _RUN_ID.fullmatch(run_id):
            self._resumed_id = run_id
        else:
            log.warning("mlflow: the checkpoint's MLflow run id %r is not one; starting a new MLflow run", run_id)

    # -- the end ----------------------------------------------------------------

    @hookimpl
    def on_fit_end(self, trainer: Trainer) -> None:
        if self.run_id is None:
            self._start(trainer)
        self._flush()

    @hookimpl
    def on_exception(self, trainer: Trainer) -> None:
        self._flush()  # the curves up to the failure explain it; the status follows in on_run_end

    @hookimpl
    def on_run_end(self, trainer: Trainer, status: str, summary: Mapping[str, Any] | None) -> None:
        if self.run_id is None or self.client is None:
            return  # refused before its first epoch: no MLflow run was started
        try:
            self._flush()
            if self.artifacts:
                self._log_artifacts(trainer, summary)
        finally:
            signalled = status == "stopped" and (trainer.state.stop_reason or "").startswith("received SIG")
            ended = "FAILED" if status == "failed" else "KILLED" if status == "interrupted" or signalled else "FINISHED"
            self.client.set_tag(self.run_id, "status", status)
            if trainer.state.stop_reason:
                self.client.set_tag(self.run_id, "stop_reason", trainer.state.stop_reason)
            self.client.set_terminated(self.run_id, ended)

    def _log_artifacts(self, trainer: Trainer, summary: Mapping[str, Any] | None) -> None:
        import tomli_w

        from trainer_core import checkpoint_weights, export_info, load_checkpoint, write_safetensors  # (torch: not at import)

        assert self.client is not None and self.run_id is not None
        if summary is not None:
            self.client.log_dict(self.run_id, dict(summary), "summary.json")
        self.client.log_text(self.run_id, tomli_w.dumps(trainer.config.to_toml()), "config.toml")
        best = _best_checkpoint(trainer, summary)
        if best is None:
            return
        payload = load_checkpoint(best)
        state = payload.get("state") or {}
        info = export_info(trainer.config, trainer.data, trainer.task, state.get("epoch"), state.get("step"))
        with tempfile.TemporaryDirectory() as folder:
            weights = Path(folder) / "model.safetensors"
            write_safetensors(weights, checkpoint_weights(payload, trainer.model), {**info, "checkpoint": best.name})
            self.client.log_artifact(self.run_id, str(weights))


def _best_checkpoint(trainer: Trainer, summary: Mapping[str, Any] | None) -> Path | None:
    """The run's best checkpoint: the one its summary names, or its only ``best-*.pt``."""
    from trainer_core import CHECKPOINT_FOLDER
    if trainer.run_path is None:
        return None
    named = ((summary or {}).get("checkpoints") or {}).get("best")
    found = ([trainer.run_path / named] if isinstance(named, str) and named
             else sorted((trainer.run_path / CHECKPOINT_FOLDER).glob("best-*.pt")))
    if len(found) > 1:
        log.warning("mlflow: %d best checkpoints and none named best; no weights logged", len(found))
    return found[0] if len(found) == 1 and found[0].is_file() else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
