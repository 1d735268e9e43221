"""Experiment trackers beside metrics.jsonl: TensorBoard, MLflow and W&B (tracking.backends).

metrics.jsonl is the record of a run; a tracker is a mirror of it. RunDir.log writes the JSONL line
first and only then hands the record to `Trackers`, which fans it out to every configured backend.
Each backend has the same five calls: start (the resolved config as params), log_metrics (a step's
numbers), log_event (one `event` record), log_artifact (the final model folder, the report) and
finish. A backend that raises anywhere (a server gone, a full disk, a bug in its client) costs one
warning naming it and the error; it is dropped for the rest of the run and the run goes on.

Resume: what each backend needs to continue the same tracker run (MLflow's run id and store, W&B's
run id) and the last step it was sent are kept in run_dir/trackers.json. A resumed run sends MLflow
and W&B only the steps past that last step: neither can take a logged point back (W&B drops a step
below its last one), so the steps a resume redoes keep their first values there, while metrics.jsonl
holds the redone ones (the first in superseded.jsonl). TensorBoard purges and rewrites them.

mlflow and wandb are optional extras, imported here only, and only when configured.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import netrc
import os
import re
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import Any, Callable

from innerloop.distributed.config_base import ConfigError
from innerloop.distributed.config_extras import TrackingConfig

log = logging.getLogger(__name__)

STATE_FILE = "trackers.json"
EXTRAS = {  # backend: (the module it needs, the command that installs it)
    "tensorboard": ("torch.utils.tensorboard", "pip install tensorboard"),
    "mlflow": ("mlflow", "pip install 'innerloop[mlflow]'"),
    "wandb": ("wandb", "pip install 'innerloop[wandb]'"),
}


def check_trackers(tracking: TrackingConfig) -> None:
    """Every backend in tracking.backends imports; refused with its install command where one does not."""
    for name in tracking.backends:
        module, install = EXTRAS[name]
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ConfigError(f"tracking.backends names {name}, but {module} does not import here ({exc}); "
                              f"install it with `{install}`, or take {name} out of tracking.backends") from None
    if "wandb" in tracking.backends and tracking.wandb_mode == "online" and not wandb_login_found():
        # Without one, wandb asks on the terminal, where innerloop hides third-party output: a silent hang.
        raise ConfigError("tracking.wandb_mode=online needs a W&B login and none was found (WANDB_API_KEY, or "
                          "`wandb login`'s entry in ~/.netrc); log in, or use tracking.wandb_mode=offline and "
                          "`wandb sync` the run later")


def wandb_login_found() -> bool:
    """Whether wandb has credentials without asking: its key variables, or a netrc entry (for
    WANDB_BASE_URL's host; without it, any entry, as a self-hosted server's host is in wandb's settings)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    try:
        entries = netrc.netrc(os.environ.get("NETRC") or None).hosts
    except (OSError, netrc.NetrcParseError):
        return False
    base = os.environ.get("WANDB_BASE_URL")
    return urllib.parse.urlparse(base).hostname in entries if base else bool(entries)


class Tracker:
    """One backend. `resends_steps`: whether a step logged again after a rewind replaces the old point."""

    name = ""
    resends_steps = False
    takes_events = False  # whether finish wants the run's event records

    def start(self, params: dict[str, Any], saved: dict[str, Any]) -> dict[str, Any]:
        """Open (or, from `saved`, continue) the tracker run; returns what continuing it later needs."""
        return {}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def log_event(self, record: dict[str, Any], step: int) -> None:
        raise NotImplementedError

    def log_artifact(self, path: Path, name: str) -> None:
        raise NotImplementedError

    def rewind(self, step: int) -> None:
        """The run went back to `step`; the steps after it will be logged again."""

    def finish(self, events: list[dict[str, Any]], completed: bool) -> None:
        """`events`: every event record of metrics.jsonl (all attempts); `completed`: the run reached its end."""


class TensorBoardTracker(Tracker):
    name = "tensorboard"
    resends_steps = True  # a new writer's purge_step drops the points past the resume step

    def __init__(self, run_dir: Path):
        self.folder = run_dir / "tensorboard"
        self._writer = None
        self._purge_step: int | None = None
        self._config_text: str | None = None

    def start(self, params, saved):
        import yaml

        self._config_text = "    " + yaml.safe_dump(params, sort_keys=False).replace("\n", "\n    ")  # a code block
        return {}

    def _open(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.folder), purge_step=self._purge_step)
            if self._config_text is not None:
                self._writer.add_text("config", self._config_text, 0)
                self._config_text = None
        return self._writer

    def log_metrics(self, metrics, step):
        writer = self._open()
        for key, value in metrics.items():
            writer.add_scalar(key, value, step)
        writer.flush()

    def log_event(self, record, step):
        self._open().add_text("events", "    " + json.dumps(record, default=str), step)

    def log_artifact(self, path, name):
        self._open().add_text("artifacts", f"{name}: `{path}`")

    def rewind(self, step):
        if self._writer is not None:  # the points past `step` are purged when the next writer opens
            self._writer.close()
            self._writer = None
        self._purge_step = step + 1

    def finish(self, events, completed):
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class MlflowTracker(Tracker):
    """An MLflow run in tracking.mlflow_uri, MLFLOW_TRACKING_URI, or else a file store in run_dir/mlruns.

    The file store is the one MLflow store that needs nothing beyond mlflow-skinny (SQLite needs
    SQLAlchemy); MLflow 3 puts it behind MLFLOW_ALLOW_FILE_STORE, set here when that store is ours.
    """

    name = "mlflow"
    # A server that stopped answering must not hold a step for minutes: MLflow's own default is 7
    # retries with doubling waits and a 120 s timeout per request. The user's settings win.
    HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}

    def __init__(self, run_dir: Path, tracking: TrackingConfig):
        self.run_dir, self.tracking = run_dir, tracking
        self.uri = tracking.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or (run_dir / "mlruns").as_uri()
        self.client = None
        self.run_id: str | None = None
        self._event_files: dict[str, int] = {}

    def start(self, params, saved):
        if self.uri.startswith("file:") or "://" not in self.uri:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        for key, value in self.HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=self.uri)
        flat = flatten(params)
        logged: dict[str, str] = {}
        if saved.get("run_id") and saved.get("uri") == self.uri and self._exists(saved["run_id"]):
            self.run_id = saved["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            logged = self.client.get_run(self.run_id).data.params
            log.info("mlflow: continuing run %s in %s", self.run_id, self.uri)
        else:
            experiment = self.client.get_experiment_by_name(self.tracking.project)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(self.tracking.project)
            run = self.client.create_run(experiment_id, run_name=self.tracking.run_name or self.run_dir.name,
                                         tags={"innerloop.run_dir": str(self.run_dir)})
            self.run_id = run.info.run_id
        self._log_params(flat, logged)
        import yaml

        self.client.log_text(self.run_id, yaml.safe_dump(params, sort_keys=False), "config.yaml")  # whole, each start
        return {"run_id": self.run_id, "uri": self.uri}

    def _exists(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_run(run_id)
        except MlflowException:
            log.info("mlflow: run %s is not in %s; starting a new run", run_id, self.uri)
            return False
        return True

    def _log_params(self, flat: dict[str, str], logged: dict[str, str]) -> None:
        """MLflow params cannot change once logged: a resume with a changed config logs the new keys,
        and names the changed ones in a tag (config.yaml, logged each start, holds the values)."""
        from mlflow.entities import Param, RunTag

        new = [Param(k, v) for k, v in flat.items() if k not in logged]
        for i in range(0, len(new), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(self.run_id, params=new[i: i + 100])
        changed = sorted(k for k, v in flat.items() if k in logged and logged[k] != v)
        if changed:
            self.client.log_batch(self.run_id, tags=[RunTag("innerloop.params_changed_on_resume",
                                                            ", ".join(changed)[:8000])])

    def log_metrics(self, metrics, step):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(metric_key(k), v, now, step) for k, v in metrics.items()]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i: i + 1000])

    def log_event(self, record, step):
        """One small JSON artifact per event, events/step-NNNNNN-NAME.json: a redone step's event
        replaces the first one's file."""
        name = f"step-{step:06d}-" + re.sub(r"[^\w.-]", "_", str(record.get("event")))
        seen = self._event_files.get(name, 0)
        self._event_files[name] = seen + 1
        file = f"events/{name}{f'-{seen}' if seen else ''}.json"
        self.client.log_text(self.run_id, json.dumps({"step": step, **record}, default=str), file)

    def log_artifact(self, path, name):
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), name)
        else:
            self.client.log_artifact(self.run_id, str(path))

    def finish(self, events, completed):
        if self.client is not None and self.run_id is not None:  # KILLED: stopped early, --resume continues it
            self.client.set_terminated(self.run_id, "FINISHED" if completed else "KILLED")


class WandbTracker(Tracker):
    """A W&B run, offline by default: its files go to run_dir/wandb/offline-run-*/ and `wandb sync`
    uploads them later; offline needs no login. Events go to an `events` table at the end."""

    name = "wandb"
    takes_events = True

    def __init__(self, run_dir: Path, tracking: TrackingConfig):
        self.run_dir, self.tracking = run_dir, tracking
        self.run = None

    def start(self, params, saved):
        import wandb

        run_id = saved.get("run_id") or uuid.uuid4().hex[:8]
        # console="off": innerloop routes its process output itself; reinit: the run is this object's,
        # never wandb's global one, so tests and a caller's own wandb run stay apart.
        self.run = wandb.init(project=self.tracking.project, name=self.tracking.run_name or self.run_dir.name,
                              id=run_id, resume="allow", dir=str(self.run_dir), mode=self.tracking.wandb_mode,
                              config=params, reinit="create_new",
                              settings=wandb.Settings(console="off", silent=True, save_code=False))
        if saved.get("run_id"):
            log.info("wandb: continuing run %s (%s)", run_id, self.tracking.wandb_mode)
        return {"run_id": run_id}

    def log_metrics(self, metrics, step):
        self.run.log(metrics, step=step)

    def log_event(self, record, step):
        pass  # all events, from metrics.jsonl, as one table at the end (a W&B table is written whole)

    def log_artifact(self, path, name):
        import wandb

        kind = "model" if path.is_dir() else "report"
        artifact = wandb.Artifact(f"{name}-{self.run.id}", type=kind)
        # immutable, no cache: W&B reads the files where they are when it uploads, no copy of the model
        if path.is_dir():
            artifact.add_dir(str(path), skip_cache=True, policy="immutable")
        else:
            artifact.add_file(str(path), skip_cache=True, policy="immutable")
        self.run.log_artifact(artifact)

    def finish(self, events, completed):
        if self.run is None:
            return
        import wandb

        if events:
            rows = [[r.get("step"), str(r.get("event")), json.dumps(r, default=str)] for r in events]
            self.run.log({"events": wandb.Table(columns=["step", "event", "record"], data=rows)}, commit=True)
        self.run.finish(exit_code=0 if completed else 1)
        self.run = None


def make_tracker(name: str, run_dir: Path, tracking: TrackingConfig) -> Tracker:
    if name == "tensorboard":
        return TensorBoardTracker(run_dir)
    return {"mlflow": MlflowTracker, "wandb": WandbTracker}[name](run_dir, tracking)


class Trackers:
    """The configured backends, fed from RunDir.log; a failing one is dropped with one warning."""

    def __init__(self, run_dir: Path, backends: list[Tracker]):
        self.run_dir = run_dir
        self.backends = list(backends)
        self._state: dict[str, dict[str, Any]] = {}
        self._skip_through: dict[str, int] = {}  # per backend: steps it already holds from before a rewind
        self._completed = False

    @classmethod
    def default(cls, run_dir: Path) -> "Trackers":
        """Before the config is known (and for tools that write a RunDir without one): TensorBoard."""
        return cls(run_dir, [TensorBoardTracker(run_dir)])

    @classmethod
    def start(cls, run_dir: Path, tracking: TrackingConfig, params: dict[str, Any]) -> "Trackers":
        trackers = cls(run_dir, [make_tracker(name, run_dir, tracking) for name in tracking.backends])
        params = redacted(params)
        trackers._state = read_state(run_dir / STATE_FILE)
        for backend in list(trackers.backends):
            saved = trackers._state.get(backend.name, {})
            started = trackers._call(backend, "start", lambda: backend.start(params, saved))
            if backend in trackers.backends:
                started = started or {}
                same_run = started.get("run_id") == saved.get("run_id")  # False where a new run was made
                trackers._state[backend.name] = {**started, "last_step": saved.get("last_step") if same_run else None}
        trackers._save()
        return trackers

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.backends]

    def log(self, record: dict[str, Any], step: int) -> None:
        """A metrics.jsonl record (already written): its finite numbers as metrics, an event as text."""
        metrics = {k: float(v) for k, v in record.items() if k not in ("step", "time")
                   and isinstance(v, (int, float)) and math.isfinite(v)}
        advanced = False
        for backend in list(self.backends):
            state = self._state.setdefault(backend.name, {})
            last = state.get("last_step")
            fresh = backend.resends_steps or (step > self._skip_through.get(backend.name, -1)
                                              and (last is None or step >= last))
            if metrics and fresh:
                self._call(backend, "log_metrics", lambda: backend.log_metrics(metrics, step))
                if backend in self.backends and not backend.resends_steps and (last is None or step > last):
                    state["last_step"], advanced = step, True
            if "event" in record:
                self._call(backend, "log_event", lambda: backend.log_event(record, step))
        if advanced:
            self._save()

    def rewind(self, step: int | None) -> None:
        """The run goes back to `step` (None: to the start): the backends that cannot take points
        back skip the steps they already hold."""
        for backend in list(self.backends):
            last = self._state.get(backend.name, {}).get("last_step")
            if last is not None:
                self._skip_through[backend.name] = last
            self._call(backend, "rewind", lambda: backend.rewind(step or 0))

    def log_artifacts(self, paths: dict[str, Path]) -> None:
        """The run's outputs at its end (name: file or folder); those that do not exist are left out."""
        for name, path in paths.items():
            if path is not None and path.exists():
                for backend in list(self.backends):
                    self._call(backend, "log_artifact", lambda: backend.log_artifact(path, name))
        self._completed = True

    def finish(self, events: Callable[[], list[dict[str, Any]]]) -> None:
        records = events() if any(b.takes_events for b in self.backends) else []
        for backend in list(self.backends):
            self._call(backend, "finish", lambda: backend.finish(records, self._completed))
        self.backends = []

    def _call(self, backend: Tracker, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:  # any client error: the run goes on without this backend
            self.backends.remove(backend)
            log.warning("tracker %s failed in %s (%s: %s); it is dropped for the rest of the run, metrics.jsonl "
                        "keeps every record", backend.name, what, type(exc).__name__, exc)
            return None

    def _save(self) -> None:
        path = self.run_dir / STATE_FILE
        partial = path.with_suffix(".partial")
        partial.write_text(json.dumps(self._state, indent=1) + "\n")
        partial.replace(path)


def redacted(params: dict[str, Any]) -> dict[str, Any]:
    """The config as the trackers get it: a password in tracking.mlflow_uri (user:password@host) masked."""
    uri = params.get("tracking", {}).get("mlflow_uri")
    if not uri or "@" not in uri:
        return params
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None:
        return params
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return {**params, "tracking": {**params["tracking"], "mlflow_uri": parts._replace(netloc=netloc).geturl()}}


def read_state(path: Path) -> dict[str, dict[str, Any]]:
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def flatten(params: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as MLflow params: `section.key` -> its value as text (at most 6000 characters)."""
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name[:250]] = (value if isinstance(value, str) else json.dumps(value, default=str))[:6000]
    return out


def metric_key(key: str) -> str:
    """MLflow allows letters, digits, `_ - . / :` and spaces in a metric's name."""
    return re.sub(r"[^\w./: -]", "_", key)
