"""Experiment trackers (tracking.backends), each read back by its own means: MLflow through its own
client from the local store in the run directory, W&B from the run file an offline run writes,
TensorBoard through its event reader. No Ray, no vLLM: the driver runs on the fake fleet."""

from __future__ import annotations

import ast
import json
import logging
import struct
import sys
import time
from pathlib import Path

import pytest

from innerloop.distributed.config_base import ConfigError
from innerloop.distributed.config_load import load_config
from innerloop.distributed.run.checks import check_run
from innerloop.distributed.run.driver import Trainer
from innerloop.distributed.state.trackers import check_trackers
from innerloop.distributed.state.tracking import RunDir
from tests.doubles import FakeFleet

ROOT = Path(__file__).resolve().parent.parent
ALL = "tracking.backends=[tensorboard,mlflow,wandb]"


@pytest.fixture(autouse=True)
def no_outside_state(tmp_path, monkeypatch):
    """No tracker reaches outside the test: no W&B login or home folders, no MLflow server; the
    environment variables the MLflow tracker sets are put back after the test."""
    for name in ("MLFLOW_TRACKING_URI", "WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR", "WANDB_RUN_ID", "WANDB_RESUME",
                 "MLFLOW_ALLOW_FILE_STORE", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.setenv(name, "unset")  # then deleted: the undo restores whatever was there before
        monkeypatch.delenv(name)
    home = tmp_path / "wandb-home"
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(home / name.lower()))
    monkeypatch.setenv("NETRC", str(home / "no-netrc"))


def started(path: Path, *overrides: str) -> tuple[RunDir, object]:
    cfg = load_config(None, list(overrides))
    run = RunDir(path)
    run.write_config(cfg)
    run.start_trackers(cfg)
    return run, cfg


def mlflow_client(run_dir: Path):
    from mlflow.tracking import MlflowClient

    state = json.loads((run_dir / "trackers.json").read_text())["mlflow"]
    assert state["uri"] == (run_dir / "mlruns").as_uri()  # the default store: inside the run directory
    return MlflowClient(tracking_uri=state["uri"]), state["run_id"]


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def artifact_paths(client, run_id: str, folder: str | None = None) -> set[str]:
    found = set()
    for entry in client.list_artifacts(run_id, folder):
        found |= artifact_paths(client, run_id, entry.path) if entry.is_dir else {entry.path}
    return found


def wandb_runs(run_dir: Path) -> list[list]:
    """The records of each offline run in run_dir/wandb, oldest first, parsed with wandb's own schema.

    wandb 0.31 reads its run files in its Go core and no longer ships a Python reader, so the framing
    is read here: a 7-byte header (':W&B', magic, version), then LevelDB-log records in 32 KiB blocks,
    each a 7-byte header (checksum, length, type: 1 whole, 2 first, 3 middle, 4 last) and its bytes.
    The core writes the file in the background: a run's file is read once it ends in the exit record.
    """
    runs = []
    for file in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        deadline = time.monotonic() + 30
        while (records := read_wandb_file(file)) and records[-1].WhichOneof("record_type") != "exit":
            assert time.monotonic() < deadline, f"{file} never got its exit record"
            time.sleep(0.2)
        runs.append(records)
    return runs


def read_wandb_file(file: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    data, pos, chunks, pending = file.read_bytes(), 7, [], b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768
        if room < 7:  # a block's tail too short for a header is padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos: pos + 7])
        if kind == 0 or pos + 7 + length > len(data):  # padding, or a record not written out yet
            pos += room
            continue
        chunk, pos = data[pos + 7: pos + 7 + length], pos + 7 + length
        if kind == 1:
            chunks.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        else:
            chunks.append(pending + chunk)
    return [wandb_internal_pb2.Record.FromString(c) for c in chunks] or [wandb_internal_pb2.Record()]


def wandb_history(records) -> dict[int, dict]:
    rows: dict[int, dict] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            rows.setdefault(r.history.step.num, {}).update(items)
    return rows


def of_kind(records, kind: str) -> list:
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


def tensorboard_points(run_dir: Path, key: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir / "tensorboard"))
    accumulator.Reload()
    return [(e.step, e.value) for e in accumulator.Scalars(key)]


def log_steps(run: RunDir, steps, reward=lambda s: s / 4):
    for step in steps:
        run.log({"reward_mean": reward(step), "reward/trl:accuracy_reward": 0.5, "loss": float("nan"),
                 "phase": "grpo"}, step)


# ---------------------------------------------------------------- MLflow


def test_mlflow_holds_metrics_params_events_and_artifacts_read_back_with_its_own_client(tmp_path):
    run, cfg = started(tmp_path / "run", "tracking.backends=[mlflow]", "tracking.project=arith",
                       "rollout.temperature=0.7")
    run.rewind(None)
    log_steps(run, [1, 2, 3])
    run.log({"event": "checkpoint", "path": "step-000003", "seconds": 1.5}, 3)
    run.final_model.mkdir()
    (run.final_model / "config.json").write_text('{"model_type": "llama"}')
    run.track_outputs(run.final_model)
    run.close()

    client, run_id = mlflow_client(run.path)
    record = client.get_run(run_id)
    assert record.info.status == "FINISHED" and record.info.run_name == "run"
    assert client.get_experiment(record.info.experiment_id).name == "arith"
    assert history(client, run_id, "reward_mean") == [(1, 0.25), (2, 0.5), (3, 0.75)]
    assert history(client, run_id, "reward/trl:accuracy_reward") == [(1, 0.5), (2, 0.5), (3, 0.5)]
    assert "loss" not in record.data.metrics  # NaN: in metrics.jsonl only
    assert history(client, run_id, "seconds") == [(3, 1.5)]  # an event's numbers are metrics too
    params = record.data.params
    assert params["rollout.temperature"] == "0.7" and params["tracking.backends"] == '["mlflow"]'
    assert params["model.name"] == cfg.model.name
    paths = artifact_paths(client, run_id)
    assert {"config.yaml", "final_model/config.json", "events/step-000003-checkpoint.json"} <= paths
    event = json.loads(Path(client.download_artifacts(run_id, "events/step-000003-checkpoint.json",
                                                      str(tmp_path))).read_text())
    assert event == {"step": 3, "time": event["time"], "event": "checkpoint", "path": "step-000003", "seconds": 1.5}
    assert len(run.read_metrics()) == 4  # metrics.jsonl, always written, holds them all


def test_a_resumed_run_continues_the_same_mlflow_run_and_sends_no_step_twice(tmp_path):
    path = tmp_path / "run"
    first, _ = started(path, "tracking.backends=[mlflow]")
    first.rewind(None)
    log_steps(first, [1, 2, 3])
    first.close()  # killed after step 3; the last checkpoint is step 2
    client, run_id = mlflow_client(path)
    assert client.get_run(run_id).info.status == "KILLED"  # ended early: --resume continues it

    second, _ = started(path, "tracking.backends=[mlflow]", "rollout.temperature=0.9")
    second.rewind(2)
    log_steps(second, [3, 4], reward=lambda s: s / 4 + 10)  # step 3 redone, with other values
    second.close()

    _, same_id = mlflow_client(path)
    assert same_id == run_id
    # step 3 keeps its first value (an MLflow point cannot be taken back); step 4 is new; none twice
    assert history(client, run_id, "reward_mean") == [(1, 0.25), (2, 0.5), (3, 0.75), (4, 11.0)]
    assert [r["reward_mean"] for r in second.read_metrics()] == [0.25, 0.5, 10.75, 11.0]  # the redone value
    tags = client.get_run(run_id).data.tags
    assert tags["innerloop.params_changed_on_resume"] == "rollout.temperature"  # params are immutable
    assert len(client.search_runs([client.get_run(run_id).info.experiment_id])) == 1


# ---------------------------------------------------------------- W&B


def test_wandb_offline_run_file_holds_config_metrics_events_and_the_model(tmp_path):
    run, _ = started(tmp_path / "run", "tracking.backends=[wandb]", "rollout.temperature=0.7")
    run.rewind(None)
    log_steps(run, [1, 2, 3])
    run.log({"event": "eval_after", "eval_accuracy": 0.625}, 3)
    run.final_model.mkdir()
    (run.final_model / "config.json").write_text("{}")
    run.track_outputs(run.final_model)
    run.close()

    [records] = wandb_runs(run.path)  # offline, with no login anywhere (no key, no netrc)
    state = json.loads((run.path / "trackers.json").read_text())["wandb"]
    [info] = of_kind(records, "run")
    assert info.run_id == state["run_id"] and info.project == "innerloop" and info.display_name == "run"
    config = {i.key: json.loads(i.value_json) for i in info.config.update}
    assert config["rollout"]["temperature"] == 0.7 and config["tracking"]["backends"] == ["wandb"]
    rows = wandb_history(records)
    assert {s: rows[s]["reward_mean"] for s in (1, 2, 3)} == {1: 0.25, 2: 0.5, 3: 0.75}
    assert rows[3]["eval_accuracy"] == 0.625 and "loss" not in rows[1]
    [model] = [a for a in of_kind(records, "artifact") if a.type == "model"]
    assert model.name == f"final_model-{state['run_id']}" and [c.path for c in model.manifest.contents] == ["config.json"]
    [table] = (run.path / "wandb").glob("offline-run-*/files/media/table/events_*.table.json")
    events = json.loads(table.read_text())
    assert events["columns"] == ["step", "event", "record"] and [row[:2] for row in events["data"]] == [[3, "eval_after"]]
    assert [e.exit_code for e in of_kind(records, "exit")] == [0]


def test_a_resumed_run_continues_the_same_wandb_run_past_its_last_step(tmp_path):
    path = tmp_path / "run"
    first, _ = started(path, "tracking.backends=[wandb]")
    first.rewind(None)
    log_steps(first, [1, 2, 3])
    first.close()
    second, _ = started(path, "tracking.backends=[wandb]")
    second.rewind(2)
    log_steps(second, [3, 4])
    second.close()

    one, two = wandb_runs(path)  # one offline run folder per attempt, the same W&B run id in both
    assert of_kind(one, "run")[0].run_id == of_kind(two, "run")[0].run_id
    assert sorted(wandb_history(one)) == [1, 2, 3] and sorted(wandb_history(two)) == [4]  # step 3 not resent
    assert [e.exit_code for e in of_kind(one, "exit")] == [1]  # the first attempt ended early


# ---------------------------------------------------------------- failures


def test_a_tracker_failing_mid_run_warns_once_and_the_run_goes_on(tmp_path, monkeypatch, caplog):
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    run, _ = started(tmp_path / "run", ALL)
    run.rewind(None)
    log_steps(run, [1])

    def server_gone(*args, **kwargs):
        raise MlflowException("API request to http://tracking:5000 failed: Connection refused")

    with monkeypatch.context() as patch, caplog.at_level(logging.WARNING):
        for method in ("log_batch", "log_text", "set_terminated"):  # every call it would make from here
            patch.setattr(MlflowClient, method, server_gone)
        log_steps(run, [2, 3])
        run.log({"event": "checkpoint", "path": "step-000003"}, 3)
        run.close()

    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "tracker" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "tracker mlflow failed" in warnings[0] and "Connection refused" in warnings[0]
    assert [r["step"] for r in run.read_metrics()] == [1, 2, 3, 3]  # metrics.jsonl lost nothing
    assert tensorboard_points(run.path, "reward_mean") == [(1, 0.25), (2, 0.5), (3, 0.75)]
    [records] = wandb_runs(run.path)
    assert {s: r["reward_mean"] for s, r in wandb_history(records).items() if "reward_mean" in r} == \
        {1: 0.25, 2: 0.5, 3: 0.75}
    client, run_id = mlflow_client(run.path)
    assert history(client, run_id, "reward_mean") == [(1, 0.25)]  # what it got before it failed


def test_a_tracker_whose_server_is_unreachable_at_start_is_dropped_and_the_others_go_on(tmp_path, caplog):
    import socket

    with socket.socket() as probe:  # a port nothing listens on: the connection is refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with caplog.at_level(logging.WARNING):
        run, _ = started(tmp_path / "run", "tracking.backends=[tensorboard,mlflow]",
                         f"tracking.mlflow_uri=http://127.0.0.1:{port}")
    assert run.trackers.names == ["tensorboard"]
    assert [r.getMessage() for r in caplog.records if "tracker mlflow failed in start" in r.getMessage()]
    run.rewind(None)
    log_steps(run, [1, 2])
    run.close()
    assert tensorboard_points(run.path, "reward_mean") == [(1, 0.25), (2, 0.5)]
    assert [r["step"] for r in run.read_metrics()] == [1, 2]


@pytest.mark.parametrize("backend", ["mlflow", "wandb"])
def test_a_tracker_extra_not_installed_is_refused_before_anything_starts(tmp_path, monkeypatch, backend):
    cfg = load_config(None, [f"tracking.backends=[tensorboard,{backend}]"])
    check_trackers(cfg.tracking)  # installed here (the dev extra)
    monkeypatch.setitem(sys.modules, backend, None)  # `import mlflow` now raises ImportError
    with pytest.raises(ConfigError, match=rf"pip install 'innerloop\[{backend}\]'"):
        check_run(cfg)  # its first check: before the model, the questions or any actor
    check_trackers(load_config(None, ["tracking.backends=[tensorboard]"]).tracking)  # not named: not needed


def test_online_wandb_without_a_login_is_refused_at_start_not_left_to_prompt(tmp_path, monkeypatch):
    cfg = load_config(None, ["tracking.backends=[wandb]", "tracking.wandb_mode=online"])
    with pytest.raises(ConfigError, match=r"wandb_mode=online needs a W&B login.*wandb_mode=offline"):
        check_trackers(cfg.tracking)  # no WANDB_API_KEY, an empty netrc (the fixture)
    (tmp_path / "netrc").write_text("machine api.wandb.ai login user password " + "k" * 40 + "\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    check_trackers(cfg.tracking)  # `wandb login`'s entry is enough


def test_a_password_in_the_mlflow_uri_reaches_no_tracker(tmp_path):
    uri = "https://bob:s3cret@mlflow.example.com:5000"
    run, _ = started(tmp_path / "run", "tracking.backends=[wandb]", f"tracking.mlflow_uri={uri}")
    run.close()
    [records] = wandb_runs(run.path)
    config = {i.key: json.loads(i.value_json) for i in of_kind(records, "run")[0].config.update}
    assert config["tracking"]["mlflow_uri"] == "https://bob:***@mlflow.example.com:5000"
    assert not [f for f in (run.path / "wandb").rglob("*") if f.is_file() and b"s3cret" in f.read_bytes()]


def test_mlflow_and_wandb_are_imported_only_by_the_tracker_module():
    users = {"mlflow": set(), "wandb": set()}
    for source in sorted(p for folder in ("actors", "learners", "distributed") for p in (ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(source.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                if name.split(".")[0] in users:
                    users[name.split(".")[0]].add(source.relative_to(ROOT).as_posix())
                    assert node.col_offset > 0, f"{source}: {name} imported at module level"  # lazily
    assert users == {"mlflow": {"distributed/state/trackers.py"}, "wandb": {"distributed/state/trackers.py"}}


# ---------------------------------------------------------------- through the driver


def test_a_trained_and_resumed_run_reaches_every_tracker_through_the_driver(tmp_path):
    base = ["train.checkpoint_every=2", "eval.before_and_after=false", "train.max_minutes=0",
            "tasks.train_count=100", "tasks.eval_count=8", ALL]
    cfg = load_config(None, ["train.steps=4", *base])
    Trainer(cfg, tmp_path / "run").train(FakeFleet(cfg))
    longer = load_config(None, ["train.steps=6", *base])
    Trainer(longer, tmp_path / "run", resume=True).train(FakeFleet(longer))  # from checkpoint step-4

    path = tmp_path / "run"
    steps = [r["step"] for r in RunDir(path).read_metrics() if "event" not in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    client, run_id = mlflow_client(path)
    record = client.get_run(run_id)
    assert record.info.status == "FINISHED"
    assert [s for s, _ in history(client, run_id, "reward_mean")] == steps  # one run, each step once
    assert record.data.params["train.steps"] == "4"
    assert record.data.tags["innerloop.params_changed_on_resume"] == "train.steps"
    paths = artifact_paths(client, run_id)
    assert "final_model/config.json" in paths  # the fake fleet's exported folder
    assert {"events/step-000002-checkpoint.json", "events/step-000006-checkpoint.json",
            "events/step-000004-done.json", "events/step-000006-done.json"} <= paths
    one, two = wandb_runs(path)
    assert sorted(s for s, r in wandb_history(one).items() if "reward_mean" in r) == [1, 2, 3, 4]
    assert sorted(s for s, r in wandb_history(two).items() if "reward_mean" in r) == [5, 6]
    assert [e.exit_code for e in of_kind(two, "exit")] == [0]
    assert [a.type for a in of_kind(two, "artifact") if a.type == "model"] == ["model"]
    assert tensorboard_points(path, "reward_mean")[-1][0] == 6
