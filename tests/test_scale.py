"""The rollout pool and the streamed sync read every finished call with one fetch; only when a
worker died do they read them one by one, to know which (scripts/bench_scale.py measured why)."""

from __future__ import annotations

import pytest
import ray

from innerloop.distributed.cluster import fleet, rollout_pool, weight_sync


class _Watchdog:
    def settle(self, refs, phase, what):
        pass


class _Get:
    """Stands in for ray.get on finished calls: 'dead' refs raise as a dead actor's would."""

    def __init__(self):
        self.calls = 0

    def __call__(self, refs, timeout=None):
        self.calls += 1
        for ref in refs if isinstance(refs, list) else [refs]:
            if ref.startswith("dead"):
                raise ray.exceptions.RayActorError()
            if ref.startswith("oom"):  # Ray's memory monitor killed the worker running this call
                raise ray.exceptions.OutOfMemoryError("1 worker(s) were killed due to the node running low on memory")
        return [f"result-{r}" for r in refs] if isinstance(refs, list) else f"result-{refs}"


def _pool():
    pool = object.__new__(rollout_pool.RolloutPool)
    pool._watchdog = _Watchdog()
    return pool


def test_finished_calls_are_fetched_at_once(monkeypatch):
    get = _Get()
    monkeypatch.setattr(rollout_pool.ray, "get", get)
    done, lost = _pool()._settle({i: f"ref{i}" for i in range(64)}, "generate", "generation")
    assert get.calls == 1 and lost == [] and done == {i: f"result-ref{i}" for i in range(64)}


def test_a_dead_worker_is_still_found_by_reading_the_calls_one_by_one(monkeypatch):
    get = _Get()
    monkeypatch.setattr(rollout_pool.ray, "get", get)
    done, lost = _pool()._settle({0: "ref0", 1: "dead1", 2: "ref2"}, "generate", "generation")
    assert lost == [1] and done == {0: "result-ref0", 2: "result-ref2"}
    assert get.calls == 1 + 3


def test_the_streamed_sync_reads_its_workers_outcomes_at_once(monkeypatch):
    get = _Get()
    monkeypatch.setattr(weight_sync.ray, "get", get)
    sync = object.__new__(weight_sync.StreamedSync)
    sync._watchdog = _Watchdog()
    calls = lambda refs, phase, what: []  # noqa: E731 (the learners' side answered)
    assert sync._outcomes([], {f"w{i}": f"ref{i}" for i in range(16)}, calls, "sync") == ([], [])
    assert get.calls == 1
    failed, lost = sync._outcomes([], {"w0": "ref0", "w1": "dead1"}, calls, "sync")
    assert (failed, lost) == ([], ["w1"])


def test_a_worker_killed_for_memory_counts_as_dead_not_as_a_crash_of_the_run(monkeypatch):
    get = _Get()
    monkeypatch.setattr(rollout_pool.ray, "get", get)
    monkeypatch.setattr(weight_sync.ray, "get", get)
    done, lost = _pool()._settle({0: "ref0", 1: "oom1"}, "sync", "the weight sync")
    assert lost == [1] and done == {0: "result-ref0"}
    sync = object.__new__(weight_sync.StreamedSync)
    sync._watchdog = _Watchdog()
    assert sync._outcomes([], {"w0": "ref0", "w1": "oom1"}, lambda refs, phase, what: [], "sync") == ([], ["w1"])


def test_a_learner_rank_killed_for_memory_is_a_lost_rank_the_run_recovers_from():
    class _OomWatchdog:
        def wait(self, refs, phase, what):
            raise ray.exceptions.OutOfMemoryError("1 worker(s) were killed due to the node running low on memory")

    learners = object.__new__(fleet.Fleet)
    learners.watchdog = _OomWatchdog()
    with pytest.raises(fleet.LearnerLost, match="died during the update: 1 worker.s. were killed .* low on memory"):
        learners._learner_call([], "update", "the update")


class _DiesOnStartWatchdog:
    """The node of the workers being started left: their first call raises as a dead actor's would."""

    def wait(self, refs, phase, what):
        raise ray.exceptions.ActorDiedError()


class _Placement:
    def workers_that_fit(self, resources):
        return 1


def test_a_node_that_leaves_while_its_worker_starts_is_logged_and_the_run_goes_on(monkeypatch):
    """The race the chaos soak once lost: a node joined, its worker was starting, the node left. The
    pool goes on with the workers it had; the half-started one is killed, not left running."""
    killed = []
    monkeypatch.setattr(rollout_pool, "alive_nodes", lambda: {"old": {"CPU": 16}, "new": {"CPU": 1}})
    monkeypatch.setattr(rollout_pool, "kill", killed.append)
    pool = _pool()
    pool._watchdog, pool._placement = _DiesOnStartWatchdog(), _Placement()
    pool.workers, pool.shards, pool._events, pool._known_nodes = ["w0"], {"w0": 1}, [], {"old"}
    pool._locations, pool.weights = {}, None

    class _Actor:
        location = type("M", (), {"remote": staticmethod(lambda: "ref")})()

    started = _Actor()
    monkeypatch.setattr(pool, "_start_worker", lambda index, node: pool.shards.setdefault(started, 1) and started)
    pool.grow_onto_new_nodes(max_workers=2)
    assert pool.workers == ["w0"] and killed == [started] and started not in pool.shards
    assert pool.drain_events() == [{"event": "rollout_workers_not_started", "reason": "node_left", "node": "new",
                                    "workers": 1}]
    assert pool._known_nodes == {"old", "new"}  # not tried again: the node is gone
