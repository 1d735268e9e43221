"""`innerloop sweep`: the sweep file's checks, the cells, resuming and skipping, failed runs, the table, the
statistics, and the Ray-job runner, all without training (a fake runner writes what a run would)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from innerloop.distributed import cli
from innerloop.distributed.cluster import jobs
from innerloop.distributed.config_load import load_config
from innerloop.distributed.lens import accuracy, sweep_stats, sweep_table
from innerloop.distributed.run import sweep

# ---------------------------------------------------------------- statistics


@pytest.mark.parametrize("df, t", [(1, 12.706204736), (2, 4.302652730), (3, 3.182446305), (4, 2.776445105),
                                   (5, 2.570581836), (10, 2.228138852), (30, 2.042272456), (100, 1.983971519)])
def test_t_quantile_matches_the_tables(df, t):
    assert sweep_stats.t_quantile(0.95, df) == pytest.approx(t, abs=1e-6)


def test_t_cdf_known_points():
    assert sweep_stats.t_two_sided_probability(1.0, 1) == pytest.approx(0.5)  # Cauchy: P(|T| <= 1) = 1/2
    assert sweep_stats.t_two_sided_probability(0.0, 7) == 0.0
    assert sweep_stats.t_quantile(0.99, 2) == pytest.approx(9.924843201, abs=1e-6)


def test_mean_ci():
    ci = sweep_stats.mean_ci([0.4, 0.5, 0.6])
    assert (ci.n, ci.mean) == (3, pytest.approx(0.5))
    assert ci.half_width == pytest.approx(4.302652730 * 0.1 / math.sqrt(3))
    assert (ci.low, ci.high) == (pytest.approx(0.5 - ci.half_width), pytest.approx(0.5 + ci.half_width))
    one = sweep_stats.mean_ci([0.7])
    assert one.half_width is None and one.low is None and one.to_dict()["mean"] == 0.7
    assert sweep_stats.mean_ci([]) is None
    assert sweep_stats.mean_ci([0.3, 0.3]).half_width == 0.0


@pytest.mark.parametrize("b, c, p", [
    (2, 8, 2 * (1 + 10 + 45) / 1024),  # by hand: 2 P(Bin(10, 1/2) <= 2)
    (8, 2, 2 * (1 + 10 + 45) / 1024),  # symmetric
    (0, 6, 2 / 64),
    (5, 5, 1.0),  # capped
    (0, 0, 1.0),  # no discordant pair: no evidence
    (1, 0, 1.0),
    (0, 10, 2 / 1024),
])
def test_mcnemar_exact(b, c, p):
    assert sweep_stats.mcnemar_exact(b, c) == pytest.approx(p)


def test_paired_bootstrap():
    none = sweep_stats.paired_bootstrap([0.0] * 50, resamples=2000)
    assert (none.difference, none.low, none.high, none.p_value) == (0.0, 0.0, 0.0, 1.0)
    always = sweep_stats.paired_bootstrap([1.0] * 50, resamples=2000)
    assert (always.low, always.high) == (1.0, 1.0) and always.p_value == pytest.approx(2 / 2001)
    mixed = [1.0] * 30 + [-1.0] * 10 + [0.0] * 60  # A - B = +0.2 on 100 questions
    result = sweep_stats.paired_bootstrap(mixed, resamples=4000, seed=1)
    assert result.difference == pytest.approx(0.2) and result.low < 0.2 < result.high
    assert 0.0 < result.p_value < 0.01  # ~3 standard errors from 0
    assert sweep_stats.paired_bootstrap(mixed, resamples=4000, seed=1) == result  # seeded: reproducible
    with pytest.raises(ValueError):
        sweep_stats.paired_bootstrap([])


def test_paired_counts():
    counts = sweep_stats.paired_counts([(True, True), (True, False), (False, True), (False, True), (False, False)])
    assert (counts.both, counts.a_only, counts.b_only, counts.neither, counts.pairs) == (1, 1, 2, 1, 5)


# ---------------------------------------------------------------- the sweep file


def write_sweep(tmp_path: Path, **data) -> Path:
    base = {"base": {"set": {"train.steps": 2, "tasks.eval_count": 4}}, "grid": {"algorithm.mini_batches": [1, 4]},
            "seeds": [0, 1], "metrics": ["reward_mean"], "last_steps": 2}
    base.update(data)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in base.items() if v is not None}))
    return path


def test_cells_are_the_product_of_the_grid():
    cells = sweep.plan_cells({"algorithm.mini_batches": [1, 4], "learner.lr": [1e-5, 2e-5]}, {})
    assert [c.name for c in cells] == ["mini_batches=1,lr=1e-05", "mini_batches=1,lr=2e-05",
                                       "mini_batches=4,lr=1e-05", "mini_batches=4,lr=2e-05"]
    assert cells[1].overrides == (("algorithm.mini_batches", 1), ("learner.lr", 2e-5))
    assert [c.name for c in sweep.plan_cells({}, {})] == ["base"]
    named = sweep.plan_cells({"algorithm.mini_batches": [1]}, {"grpo": {}, "sft": {"sft.steps": 2}})
    assert [(c.name, c.overrides) for c in named] == [
        ("grpo,mini_batches=1", (("algorithm.mini_batches", 1),)),
        ("sft,mini_batches=1", (("sft.steps", 2), ("algorithm.mini_batches", 1)))]
    clash = sweep.plan_cells({"rollout.temperature": [0.7], "eval.temperature": [0.0]}, {})
    assert clash[0].name == "rollout.temperature=0.7,eval.temperature=0.0"


def test_a_good_sweep_file_reads_and_validates(tmp_path):
    plan = sweep.read_sweep(write_sweep(tmp_path))
    assert [c.name for c in plan.cells] == ["mini_batches=1", "mini_batches=4"] and plan.seeds == (0, 1)
    sweep.validate(plan)
    cfg = sweep.cell_config(plan, plan.cells[1], seed=1)
    assert (cfg.algorithm.mini_batches, cfg.train.seed, cfg.train.steps, cfg.tasks.eval_count) == (4, 1, 2, 4)


def test_the_example_sweep_file_validates():
    plan = sweep.read_sweep(Path(__file__).resolve().parent.parent / "configs" / "sweeps" / "mini-batches.yaml")
    sweep.validate(plan)
    assert len(plan.cells) == 2 and len(plan.seeds) == 3


@pytest.mark.parametrize("data, message", [
    ({"grids": {}}, "unknown key 'grids'"),
    ({"base": {"config": None, "overrides": {}}}, "base: unknown key 'overrides'"),
    ({"seeds": []}, "seeds must be a non-empty list"),
    ({"seeds": None}, "seeds must be a non-empty list"),
    ({"seeds": [0, 0]}, "distinct integers"),
    ({"grid": {"algorithm.mini_batches": 4}}, "grid.algorithm.mini_batches must be a non-empty list"),
    ({"base": {"config": "no/such.yaml"}}, "base.config no/such.yaml does not exist"),
    ({"last_steps": 0}, "last_steps must be an integer >= 1"),
    ({"keep_checkpoints": "yes"}, "keep_checkpoints must be true or false"),
])
def test_a_bad_sweep_file_is_refused(tmp_path, data, message):
    with pytest.raises(sweep.SweepError, match=message):
        sweep.read_sweep(write_sweep(tmp_path, **data))


def test_an_override_that_fails_validation_names_its_cell(tmp_path):
    # 3 does not divide the 64 trajectories of a step; `mini_batch` is a typo: both cells named, nothing run.
    path = write_sweep(tmp_path, grid={"algorithm.mini_batches": [1, 3]},
                       cells={"ok": {}, "typo": {"algorithm.mini_batch": 2}})
    plan = sweep.read_sweep(path)
    with pytest.raises(sweep.SweepError) as caught:
        sweep.run_sweep(plan, tmp_path / "out", FakeRunner())
    text = str(caught.value)
    assert "3 of 4 cells are invalid" in text and "cell ok,mini_batches=1" not in text
    assert "cell ok,mini_batches=3: " in text and "mini_batches = 3 equal mini-batches" in text
    assert "cell typo,mini_batches=1: " in text and "unknown key 'algorithm.mini_batch'" in text
    assert not (tmp_path / "out").exists()  # stopped before any run


def test_cli_refuses_a_bad_sweep_file(tmp_path, capsys):
    path = write_sweep(tmp_path, grid={"algorithm.mini_batches": [1, 3]})
    assert cli.main(["sweep", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "cell mini_batches=3" in capsys.readouterr().err


# ---------------------------------------------------------------- running, resuming, failing


class FakeRunner:
    """Writes what `innerloop train` leaves in a run directory: config.yaml, metrics.jsonl with its step
    records, the eval_after and done records, eval_questions.jsonl; `fail` runs end without them."""

    def __init__(self, fail=(), cut=(), correct=None):
        self.fail, self.cut, self.calls = set(fail), set(cut), []
        self.correct = correct or (lambda cell, seed, q: (q + seed) % 2 == 0)

    def run(self, runs):
        for run in runs:
            self.calls.append((run.key, run.train_args()))
            args = run.train_args()
            if "--resume" in args:
                cfg = load_config(run.run_dir / "config.yaml")
            else:
                cfg = load_config(args[1], [args[3]])
            run.run_dir.mkdir(parents=True, exist_ok=True)
            (run.run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
            (run.run_dir / "checkpoints" / "step-000001").mkdir(parents=True, exist_ok=True)
            (run.run_dir / "checkpoints" / "step-000001" / "state.bin").write_bytes(b"x" * 1000)
            if run.key in self.fail:
                yield run, sweep.RunOutcome(False, "exit code 1:\nTraceback ...\nRuntimeError: engine died", 3.0)
                continue
            if run.key in self.cut:  # killed mid-run: steps logged, no final eval
                self.cut.discard(run.key)
                raise KeyboardInterrupt
            questions = [f"q{i}" for i in range(cfg.tasks.eval_count)]
            strict = [self.correct(run.cell, cfg.train.seed, i) for i in range(len(questions))]
            lenient = [True] * len(questions)
            records = [{"step": s, "reward_mean": 0.1 * s + cfg.algorithm.mini_batches, "accuracy": 0.5}
                       for s in range(1, cfg.train.steps + 1)]
            records += [{"step": cfg.train.steps, "event": "eval_after", "eval_accuracy": sum(strict) / len(strict),
                         "eval_lenient_accuracy": 1.0, "eval_formatted": 0.9, "eval_questions": len(questions)},
                        {"step": cfg.train.steps, "event": "done", "seconds": 5.0}]
            (run.run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
            accuracy.append_eval_questions(run.run_dir, cfg.train.steps, "eval_after", accuracy.EvalOutcome(
                tuple(questions), tuple(strict), tuple(lenient), tuple(strict)))
            yield run, sweep.RunOutcome(True, "", 5.0)


def test_runs_skip_resume_and_record_failures(tmp_path):
    plan, out = sweep.read_sweep(write_sweep(tmp_path)), tmp_path / "out"
    first = FakeRunner(fail={"mini_batches=4/seed-1"})
    summary = sweep.run_sweep(plan, out, first)
    assert [k for k, _ in first.calls] == ["mini_batches=1/seed-0", "mini_batches=1/seed-1",
                                           "mini_batches=4/seed-0", "mini_batches=4/seed-1"]
    assert first.calls[0][1] == ["train", str(out / "mini_batches=1" / "config.yaml"), "--set", "train.seed=0",
                                 "--run-dir", str(out / "mini_batches=1" / "seed-0")]
    states = {(c["name"], r["seed"]): (r["state"], r["error"]) for c in summary["cells"] for r in c["runs"]}
    assert states[("mini_batches=4", 1)] == ("failed", "exit code 1:\nTraceback ...\nRuntimeError: engine died")
    assert states[("mini_batches=1", 0)] == ("done", "")
    table = (out / "sweep.md").read_text()
    assert "RuntimeError: engine died" in table and "| mini_batches=4 | 1 | failed |" in table
    # Again: the finished runs are skipped; the failed one is retried from its own run directory.
    second = FakeRunner()
    summary = sweep.run_sweep(plan, out, second)
    assert second.calls == [("mini_batches=4/seed-1", ["train", "--resume", str(out / "mini_batches=4" / "seed-1")])]
    assert all(r["state"] == "done" for c in summary["cells"] for r in c["runs"])
    assert sweep.run_sweep(plan, out, third := FakeRunner()) and third.calls == []


def test_finished_runs_lose_their_checkpoints_unless_the_file_keeps_them(tmp_path):
    out = tmp_path / "out"
    sweep.run_sweep(sweep.read_sweep(write_sweep(tmp_path)), out, FakeRunner(fail={"mini_batches=4/seed-1"}))
    kept = sorted(str(p.relative_to(out)) for p in out.glob("*/seed-*/checkpoints"))
    assert kept == ["mini_batches=4/seed-1/checkpoints"]  # the failed run resumes from its own
    assert (out / "mini_batches=1" / "seed-0" / "metrics.jsonl").is_file()
    keep = tmp_path / "keep"
    keep.mkdir()
    sweep.run_sweep(sweep.read_sweep(write_sweep(keep, keep_checkpoints=True)), keep / "out", FakeRunner())
    assert len(list((keep / "out").glob("*/seed-*/checkpoints/step-000001/state.bin"))) == 4


def test_a_cut_off_sweep_resumes_where_it_stopped(tmp_path):
    plan, out = sweep.read_sweep(write_sweep(tmp_path)), tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        sweep.run_sweep(plan, out, FakeRunner(cut={"mini_batches=1/seed-1"}))
    interrupted = json.loads((out / "sweep.json").read_text())  # the table is written on the way out too
    assert [r["state"] for r in interrupted["cells"][0]["runs"]] == ["done", "pending"]
    assert sweep.run_status(out / "mini_batches=1" / "seed-1") == "resume"
    again = FakeRunner()
    sweep.run_sweep(plan, out, again)
    assert [args[:2] for _, args in again.calls] == [["train", "--resume"], ["train", str(out / "mini_batches=4" / "config.yaml")],
                                                      ["train", str(out / "mini_batches=4" / "config.yaml")]]


def test_a_changed_sweep_file_does_not_reuse_old_runs(tmp_path):
    out = tmp_path / "out"
    sweep.run_sweep(sweep.read_sweep(write_sweep(tmp_path)), out, FakeRunner())
    changed = sweep.read_sweep(write_sweep(tmp_path, base={"set": {"train.steps": 3, "tasks.eval_count": 4}}))
    with pytest.raises(sweep.SweepError, match="different config than their cell"):
        sweep.run_sweep(changed, out, FakeRunner())


def test_a_run_that_exits_cleanly_without_finishing_is_failed(tmp_path):
    class Silent:
        def run(self, runs):
            for run in runs:
                yield run, sweep.RunOutcome(True, "", 1.0)

    summary = sweep.run_sweep(sweep.read_sweep(write_sweep(tmp_path, seeds=[0])), tmp_path / "out", Silent())
    assert {r["state"] for c in summary["cells"] for r in c["runs"]} == {"failed"}


# ---------------------------------------------------------------- the table


def test_table_means_intervals_metrics_and_paired_tests(tmp_path):
    # Cell mini_batches=4 gets every question right; mini_batches=1 the even questions at seed 0 and
    # the odd ones at seed 1: per seed 2 of 4 right, so 4 discordant pairs for 4 against 0 of the 8.
    plan, out = sweep.read_sweep(write_sweep(tmp_path)), tmp_path / "out"
    runner = FakeRunner(correct=lambda cell, seed, q: cell == "mini_batches=4" or (q + seed) % 2 == 0)
    summary = sweep.run_sweep(plan, out, runner)
    one, four = summary["cells"]
    assert one["strict"]["mean"] == 0.5 and one["strict"]["ci95_half_width"] == 0.0
    assert four["strict"]["mean"] == 1.0 and one["lenient"]["mean"] == 1.0
    assert one["metrics"]["reward_mean"]["mean"] == pytest.approx(1.15)  # mean of steps 1-2: 1.1, 1.2
    [pair] = summary["comparisons"]
    assert (pair["a"], pair["b"], pair["seeds"], pair["questions"]) == ("mini_batches=1", "mini_batches=4", [0, 1], 4)
    strict = pair["strict"]
    assert (strict["both"], strict["a_only"], strict["b_only"], strict["neither"]) == (4, 0, 4, 0)
    assert strict["mcnemar_p"] == pytest.approx(2 / 16)
    assert strict["bootstrap"]["difference"] == pytest.approx(-0.5)
    assert pair["lenient"]["mcnemar_p"] == 1.0
    assert json.loads((out / "sweep.json").read_text())["comparisons"][0]["strict"]["a_only"] == 0
    table = (out / "sweep.md").read_text()
    assert "| mini_batches=1 | algorithm.mini_batches=1 | 2/2 | 50.0% ± 0.0 | 100.0% ± 0.0 | 1.15 ± 0 |" in table
    assert "| mini_batches=1 | mini_batches=4 | 0,1 | 4 | -50.0 [" in table and "| 0 / 4 | 0.125 |" in table
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_of_runs_without_per_question_results_has_no_comparison(tmp_path):
    rows = []
    for cell in ("a", "b"):
        run_dir = tmp_path / cell
        run_dir.mkdir()
        (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 2, "event": "eval_after", "eval_accuracy": 0.5}) + "\n")
        rows.append(sweep_table.RunRow(cell, 0, run_dir, "done"))
    summary = sweep_table.write_tables(tmp_path, "s.yaml", {"a": [], "b": []}, rows, ["reward_mean"], 3)
    assert summary["comparisons"] == [] and summary["cells"][0]["strict"]["ci95_half_width"] is None
    assert summary["unlogged_metrics"] == ["reward_mean"] and "No finished run logged reward_mean" in \
        (tmp_path / "sweep.md").read_text()
    assert summary["cells"][0]["lenient"] is None  # a run from before lenient accuracy was logged
    assert "| a | - | 1/1 | 50.0% (n=1) | - | - |" in (tmp_path / "sweep.md").read_text()


# ---------------------------------------------------------------- the cluster path (Ray jobs, faked client)


class FakeJobClient:
    """Ray's JobSubmissionClient as the runner uses it: each job runs for `polls` status calls."""

    def __init__(self, fail=(), polls=2, resources=None):
        self.fail, self.polls, self.resources = fail, polls, resources or {"CPU": 8.0, "GPU": 4.0}
        self.jobs, self.running_max, self.stopped = {}, 0, []

    def submit_job(self, *, entrypoint, submission_id=None, metadata=None):
        assert submission_id not in self.jobs
        self.jobs[submission_id] = {"entrypoint": entrypoint, "left": self.polls}
        return submission_id

    def get_job_status(self, job):
        info = self.jobs[job]
        running = sum(1 for j in self.jobs.values() if j["left"] > 0 and "probe" not in j["entrypoint"])
        self.running_max = max(self.running_max, running)
        info["left"] -= 1
        if info["left"] > 0:
            return "RUNNING"
        return "FAILED" if any(f in info["entrypoint"] for f in self.fail) else "SUCCEEDED"

    def get_job_logs(self, job):
        if "innerloop-resources" in self.jobs[job]["entrypoint"]:
            return "starting\ninnerloop-resources " + json.dumps(self.resources) + "\n"
        return "line 1\nRuntimeError: out of GPUs\n"

    def stop_job(self, job):
        self.stopped.append(job)
        return True


def planned(tmp_path, n=5):
    plan = sweep.read_sweep(write_sweep(tmp_path, seeds=list(range(n))))
    sweep.validate(plan)
    return sweep.plan_runs(plan, tmp_path / "out")


def test_ray_jobs_fill_the_cluster_and_record_failures(tmp_path):
    runs = planned(tmp_path)
    client = FakeJobClient(fail=("seed-3",))
    runner = jobs.RayJobRunner("http://head:8265", needs={"CPU": 2.0, "GPU": 2.0}, client=client, poll_s=0)
    assert runner.parallel == 2  # 4 GPUs / 2 per run; the probe job read the cluster's resources
    outcomes = dict((run.key, outcome) for run, outcome in runner.run(runs))
    assert len(outcomes) == 10 and client.running_max == 2
    failed = outcomes["mini_batches=1/seed-3"]
    assert not failed.ok and "FAILED" in failed.error and "RuntimeError: out of GPUs" in failed.error
    assert all(o.ok for k, o in outcomes.items() if "seed-3" not in k)
    entry = next(j["entrypoint"] for j in client.jobs.values() if "mini_batches=4/seed-0" in j["entrypoint"])
    assert entry == (f"innerloop train {tmp_path / 'out' / 'mini_batches=4' / 'config.yaml'} --set train.seed=0 "
                     f"--run-dir {tmp_path / 'out' / 'mini_batches=4' / 'seed-0'} --address auto")
    assert "Ray job" in runs[0].log_file.read_text()


def test_ray_jobs_are_stopped_when_the_sweep_is_interrupted(tmp_path):
    client = FakeJobClient(polls=100)
    runner = jobs.RayJobRunner("auto", parallel=3, client=client, poll_s=0)

    def ctrl_c(job):  # Ctrl-C while the sweep waits on its first three jobs
        raise KeyboardInterrupt

    client.get_job_status = ctrl_c
    with pytest.raises(KeyboardInterrupt):
        next(iter(runner.run(planned(tmp_path, 2))))
    assert len(client.jobs) == 3 and sorted(client.stopped) == sorted(client.jobs)  # SIGTERM: each checkpoints


@pytest.mark.parametrize("have, needs, fits", [
    ({"CPU": 16.0, "GPU": 8.0}, {"CPU": 2.0, "GPU": 2.0}, 4),
    ({"CPU": 16.0}, {"CPU": 2.0, "GPU": 0.0}, 8),
    ({"CPU": 1.0}, {"CPU": 2.0, "GPU": 0.0}, 1),  # too small even for one: that run says so itself
])
def test_runs_that_fit(have, needs, fits):
    assert jobs.runs_that_fit(have, needs) == fits


def test_run_needs_counts_what_placement_reserves():
    cfg = load_config(None, ["learner.ranks=2", "learner.gpus_per_rank=1", "rollout.workers=2",
                             "rollout.gpus_per_worker=1"])
    assert jobs.run_needs(cfg) == {"CPU": 4.0, "GPU": 4.0}


# ---------------------------------------------------------------- one real run (the real stack, the tiny model)


@pytest.mark.integration
def test_a_real_one_run_sweep_end_to_end(tmp_path):
    import os
    import subprocess
    import sys

    from tests.tiny_model import build_tiny_model

    repo = Path(__file__).resolve().parent.parent
    model = build_tiny_model(tmp_path / "tiny")
    settings = {"model.name": str(model), "model.dtype": "float32", "rollout.max_tokens": 8,
                "rollout.questions_per_step": 2, "rollout.group_size": 4, "learner.micro_batch_size": 8,
                "tasks.eval_count": 6, "tasks.train_count": 20, "train.steps": 1, "train.max_minutes": 0,
                "train.export_final_model": False, "rollout.max_model_len": 512, "rollout.kv_cache_gib": 0.25,
                "eval.max_tokens": 8}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"base": {"set": settings}, "grid": {"learner.lr": [1e-3]}, "seeds": [0],
                                    "metrics": ["reward_mean"], "last_steps": 1}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-m", "innerloop.distributed.cli", "sweep", str(path), "--out", str(tmp_path / "out")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    run_log = tmp_path / "out" / "lr=0.001" / "seed-0.log"
    assert done.returncode == 0, done.stderr[-3000:] + (run_log.read_text()[-3000:] if run_log.is_file() else "")
    summary = json.loads((tmp_path / "out" / "sweep.json").read_text())
    [run] = summary["cells"][0]["runs"]
    assert run["state"] == "done" and run["steps"] == 1 and run["eval_questions"] == 6
    assert 0.0 <= run["strict"] <= run["lenient"] <= 1.0
    per_question = accuracy.read_eval_questions(tmp_path / "out" / "lr=0.001" / "seed-0")
    assert len(per_question) == 6
    again = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert again.returncode == 0 and run_log.read_text().count("$ innerloop train") == 1  # finished: skipped
    assert json.loads((tmp_path / "out" / "sweep.json").read_text())["cells"][0]["runs"][0]["train_seconds"] > 0


def test_an_unreachable_job_server_is_a_clear_error(monkeypatch):
    import ray.job_submission

    from innerloop.distributed.errors import RunStopped

    def refuse(address):
        raise ConnectionError(f"Failed to connect to Ray at address: {address}.\nmore detail")

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", refuse)
    with pytest.raises(RunStopped, match="cannot reach the Ray job server at http://head:8265: ConnectionError: "
                                         "Failed to connect"):
        jobs.RayJobRunner("http://head:8265", parallel=1)
