"""The watchdog: the deadline rule (pure), stack dumps of a local process, and a deliberately stalled
Ray actor that must fail the wait clearly, with every stack on disk, instead of hanging."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from innerloop.distributed.config import WatchdogConfig

from innerloop.distributed.config_load import load_config
from innerloop.distributed.cluster.watchdog import DISABLED_BOUND_S, PhaseStalled, Watchdog, collect_stacks, dump_all
from innerloop.distributed.stacks import LOCAL_NODE, StackLocation, install_stack_dump


def dog(**fields) -> Watchdog:
    return Watchdog(WatchdogConfig(**fields), dump_dir=None)


# ---------------------------------------------------------------- the deadline rule


def test_first_call_allowance_until_the_phase_has_a_history():
    watchdog = dog(first_s=900.0, floor_s=10.0, factor=3.0)
    assert watchdog.deadline("generate") == 900.0
    watchdog.record("generate", 20.0)
    assert watchdog.deadline("generate") == 60.0
    assert watchdog.deadline("update") == 900.0  # each phase has its own history


def test_factor_times_the_slowest_recent_duration():
    watchdog = dog(floor_s=1.0, factor=5.0)
    for seconds in (2.0, 7.0, 3.0):
        watchdog.record("update", seconds)
    assert watchdog.deadline("update") == 35.0


def test_floor_when_the_phase_is_fast():
    watchdog = dog(floor_s=120.0, factor=5.0)
    watchdog.record("sync", 0.5)
    assert watchdog.deadline("sync") == 120.0


def test_fixed_override_wins_over_history_and_first_call():
    watchdog = dog(update_s=42.0, first_s=900.0)
    assert watchdog.deadline("update") == 42.0
    watchdog.record("update", 100.0)
    assert watchdog.deadline("update") == 42.0
    assert watchdog.deadline("generate") == 900.0


def test_unknown_phase_uses_the_adaptive_rule():
    watchdog = dog(first_s=600.0, floor_s=1.0, factor=2.0)
    assert watchdog.deadline("start") == 600.0
    watchdog.record("start", 30.0)
    assert watchdog.deadline("start") == 60.0
    # A phase named like a config field never picks that field up as a fixed deadline.
    assert dog(first_s=600.0, floor_s=5.0).deadline("floor") == 600.0


def test_history_keeps_only_the_last_n_durations():
    watchdog = dog(history=2, floor_s=1.0, factor=2.0)
    for seconds in (50.0, 3.0, 4.0):  # the slow first one falls out of the window
        watchdog.record("generate", seconds)
    assert watchdog.deadline("generate") == 8.0
    assert watchdog.state() == {"generate": [3.0, 4.0]}


def test_disabled_is_still_bounded():
    watchdog = dog(enabled=False, update_s=5.0)
    assert watchdog.deadline("update") == DISABLED_BOUND_S == 24 * 3600.0
    assert watchdog.deadline("anything") == DISABLED_BOUND_S


def test_state_round_trips_through_json():
    watchdog = dog(floor_s=1.0, factor=4.0, history=3)
    watchdog.record("generate", 6.0)
    watchdog.record("update", 20.0)
    resumed = dog(floor_s=1.0, factor=4.0, history=3)
    resumed.load_state(json.loads(json.dumps(watchdog.state())))
    assert resumed.state() == watchdog.state()
    assert resumed.deadline("generate") == 24.0 and resumed.deadline("update") == 80.0


def test_defaults_come_from_the_config_file_section():
    watchdog = Watchdog(load_config(None, ["watchdog.eval_s=77"]).watchdog, dump_dir=None)
    assert watchdog.deadline("eval") == 77.0


def test_phase_stalled_says_phase_deadline_dump_and_fix_and_pickles():
    err = PhaseStalled("update", "learner rank 0", 12.0, "fixed by watchdog.update_s", Path("/x/stacks.txt"),
                       "raise watchdog.update_s")
    text = str(err)
    for part in ("'update'", "learner rank 0", "12.0 s", "fixed by watchdog.update_s", "/x/stacks.txt",
                 "raise watchdog.update_s"):
        assert part in text
    assert str(pickle.loads(pickle.dumps(err))) == text


# ---------------------------------------------------------------- stack dumps without Ray

CHILD = """
import sys, time
from innerloop.distributed.stacks import install_stack_dump
def stall_in_the_child():
    print("ready", install_stack_dump().path, flush=True)  # a dump after "ready" must show this frame
    while True:
        time.sleep(0.05)
stall_in_the_child()
"""


def test_a_local_process_dumps_its_stacks_on_request(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    bystander = subprocess.Popen(["sleep", "60"])  # never installed a handler: SIGUSR1 would kill it
    try:
        word, path = child.stdout.readline().split()
        assert word == "ready"
        where = StackLocation(LOCAL_NODE, child.pid, path)
        stacks = collect_stacks({"child": where, "bystander": StackLocation(LOCAL_NODE, bystander.pid, path)})
        assert "stall_in_the_child" in stacks["child"]
        assert "never called install_stack_dump" in stacks["bystander"]
        assert bystander.poll() is None and child.poll() is None  # neither was killed by the signal

        dump = tmp_path / "dump.txt"
        dump_all(dump, {"child": where}, "a test")
        text = dump.read_text()
        assert text.index("driver") < text.index("test_a_local_process_dumps_its_stacks_on_request") \
            < text.index("child (node local") < text.index("stall_in_the_child")
    finally:
        for process in (child, bystander):
            process.kill()
            process.wait(timeout=10)
    assert "is gone" in collect_stacks({"child": where})["child"]


# ---------------------------------------------------------------- a stalled Ray actor


class StalledActor:
    def __init__(self):
        self._location = install_stack_dump()

    def location(self) -> StackLocation:
        return self._location

    def quick(self) -> int:
        return 1

    def stall_here_forever(self) -> None:
        while True:
            time.sleep(0.05)


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_a_stalled_actor_fails_the_wait_with_every_stack_on_disk(tmp_path):
    import ray
    import ray.cloudpickle
    from ray.exceptions import RayActorError

    from innerloop.distributed.cluster.placement import remote_class, start_ray

    # The actor's class travels by value: Ray's workers cannot import this test module by name.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    start_ray(None)  # joins the session's cluster if another test started it; never shut down here
    actor = remote_class(StalledActor, {"num_cpus": 0}).remote()
    location = None
    try:
        location = ray.get(actor.location.remote(), timeout=60)
        lost = StackLocation("ab" * 28, 1, "/nowhere")  # a node id no cluster has: its reader cannot be scheduled
        watchdog = Watchdog(WatchdogConfig(update_s=1.0), tmp_path,
                            lambda: {"stalled actor": location, "actor on a lost node": lost})
        assert watchdog.wait(actor.quick.remote(), "generate", "a quick call") == 1
        assert len(watchdog.state()["generate"]) == 1  # a success is recorded

        stalled = actor.stall_here_forever.remote()
        started = time.monotonic()
        with pytest.raises(PhaseStalled) as caught:
            watchdog.wait(stalled, "update", "the stalled test actor")
        assert time.monotonic() - started < 30
        message = str(caught.value)
        assert "'update'" in message and "the stalled test actor" in message and "1.0 s" in message
        assert "fixed by watchdog.update_s" in message and "raise watchdog.update_s" in message
        dump = caught.value.dump_path
        assert dump is not None and dump.parent == tmp_path and str(dump) in message
        text = dump.read_text()
        assert "test_a_stalled_actor_fails_the_wait_with_every_stack_on_disk" in text  # the driver's stack
        assert "stall_here_forever" in text  # the actor's stack
        assert "no stacks: the reader on node abab" in text.split("actor on a lost node")[1]
        assert "update" not in watchdog.state()  # an overrun is not a duration

        ray.kill(actor)
        patient = Watchdog(WatchdogConfig(update_s=60.0), tmp_path)  # the kill takes a moment to land
        with pytest.raises(RayActorError):  # the call's own failure passes through unchanged
            patient.wait(stalled, "update", "the killed test actor")
    finally:
        ray.kill(actor)
        if location is not None:  # a killed actor leaves its private folder: remove it here
            shutil.rmtree(Path(location.path).parent, ignore_errors=True)
