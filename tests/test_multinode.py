"""GPU placement on a simulated two-node cluster (Ray's own test cluster, GPUs declared, none real).

It runs in its own process, because this test session's Ray is already a single-node cluster.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _script_result(script: str, *args: str, timeout: float = 300) -> dict:
    """Run a script in a fresh Python (its own Ray cluster) and return what it printed after RESULT."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-c", script, *args], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-5000:]
    return json.loads(lines[0].removeprefix("RESULT "))


SCRIPT = r"""
import json, os
import ray
from ray.cluster_utils import Cluster
from ray.util.placement_group import placement_group_table

from innerloop.distributed.config_load import load_config
from innerloop.distributed.errors import RunStopped
from innerloop.distributed.cluster.placement import Placement, remote_class

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "num_gpus": 2})
cluster.add_node(num_cpus=4, num_gpus=2)
ray.init(address=cluster.address)
cluster.wait_for_nodes()

def config(ranks, workers):
    return load_config("configs/multinode-gpu.yaml", [f"learner.ranks={ranks}", f"rollout.workers={workers}",
                       "rollout.questions_per_step=8", "learner.micro_batch_size=8"])

class Where:  # stands in for a learner rank or a rollout worker: reports where Ray put it
    def where(self):
        return ray.get_runtime_context().get_node_id(), os.environ.get("CUDA_VISIBLE_DEVICES", "")

cfg = config(2, 2)
placement = Placement(cfg, timeout_s=60)
options = [placement.learner_options(r) for r in range(2)] + [placement.rollout_options(i) for i in range(2)]
actors = [remote_class(Where, o).remote() for o in options]
where = ray.get([a.where.remote() for a in actors], timeout=60)
bundles = placement_group_table(placement.group)["bundles_to_node_id"]
ip, port = placement.rendezvous()
try:
    Placement(config(4, 2), timeout_s=5)
    too_big = ""
except RunStopped as exc:
    too_big = str(exc)
print("RESULT " + json.dumps({"where": where, "bundles": {str(k): v for k, v in bundles.items()},
                              "gpus": [o["num_gpus"] for o in options], "ip": ip, "port": port,
                              "too_big": too_big}))
ray.shutdown()
cluster.shutdown()
"""


@pytest.mark.integration
def test_learners_and_rollout_workers_get_one_gpu_each_across_two_nodes():
    result = _script_result(SCRIPT)

    assert result["gpus"] == [1, 1, 1, 1]
    nodes = [node for node, _ in result["where"]]
    assert len(set(nodes)) == 2 and all(nodes.count(n) == 2 for n in set(nodes))  # 2 GPUs per node, both full
    # Each actor runs on its own bundle's node and sees exactly one GPU, never one another actor has.
    assert nodes == [result["bundles"][str(i)] for i in range(4)]
    seen = [(node, gpus) for node, gpus in result["where"]]
    assert all(len(gpus.split(",")) == 1 for _, gpus in seen) and len(set(seen)) == 4
    assert result["port"] > 0 and result["ip"]
    assert "could not place 4 learner ranks and 2 rollout workers" in result["too_big"]
    assert "the cluster has 4 GPUs" in result["too_big"]


ELASTIC_SCRIPT = r"""
import json, sys, threading, time
from pathlib import Path
import ray
from ray.cluster_utils import Cluster

from innerloop.distributed.config_load import load_config
from innerloop.distributed.run.driver import Trainer
from tests.test_integration import _overrides
from tests.tiny_model import build_tiny_model

work = Path(sys.argv[1])
model = build_tiny_model(work / "model")
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 8})
ray.init(address=cluster.address)
cfg = load_config(None, [*_overrides(model), "train.steps=24", "eval.before_and_after=false",
                         "train.export_final_model=false", "rollout.max_workers=2", "train.checkpoint_every=0"])
run_dir = work / "run"

def steps_done():
    path = run_dir / "ledger.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0

def events(name):
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line) for line in lines if name in line]

def wait_for(condition):
    deadline = time.monotonic() + 240
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)

outcome = {}
training = threading.Thread(target=lambda: outcome.update(result=Trainer(cfg, run_dir).train()))
training.start()
# Nodes come and go from this (main) thread: Ray starts a node's processes with signal handlers.
wait_for(lambda: steps_done() >= 1)
node = cluster.add_node(num_cpus=2)  # a node joins mid-run
wait_for(lambda: events("rollout_workers_scaled"))
scaled_at = steps_done()
wait_for(lambda: steps_done() >= scaled_at + 1)  # the new worker took part in a step
cluster.remove_node(node)  # and its node goes away mid-run
training.join(timeout=300)
result = outcome["result"]
lines = [json.loads(line) for line in (run_dir / "trajectories.jsonl").read_text().splitlines()]
per_step = {}
for line in lines:
    per_step[line["step"]] = per_step.get(line["step"], 0) + 1
print("RESULT " + json.dumps({
    "steps": result.steps_done, "per_step": per_step, "group": cfg.rollout.group_size,
    "questions": cfg.rollout.questions_per_step, "scaled": events("rollout_workers_scaled"),
    "dropped": events("rollout_worker_dropped"), "replaced": events("rollout_worker_replaced")}))
ray.shutdown()
cluster.shutdown()
"""


@pytest.mark.integration
def test_a_node_joining_mid_run_brings_a_worker_and_its_loss_loses_nothing(tmp_path):
    """Real stack (tiny model) on Ray's simulated cluster: a node added mid-run gets a rollout worker
    (rollout.max_workers); removing that node mid-run drops the worker, its questions are redone by
    the others, and every step still trains on all its questions."""
    result = _script_result(ELASTIC_SCRIPT, str(tmp_path), timeout=600)

    assert result["steps"] == 24
    whole_step = result["questions"] * result["group"]
    assert result["per_step"] == {str(step): whole_step for step in range(1, 25)}  # nothing lost, nothing twice
    assert [(e["from"], e["to"], e["reason"]) for e in result["scaled"]] == [(1, 2, "node_joined")]
    assert len(result["dropped"]) == 1 and result["dropped"][0]["workers"] == 1
    assert result["replaced"] == []  # the base worker was never touched


SHARDS_SCRIPT = r"""
import json, os
import ray
from ray.cluster_utils import Cluster

from innerloop.distributed.config_load import load_config
from innerloop.distributed.errors import RunStopped
from innerloop.distributed.cluster.placement import Placement, check_fits, remote_class, widest_node_gpus

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 6, "num_gpus": 2})
cluster.add_node(num_cpus=6, num_gpus=4)
ray.init(address=cluster.address)
cluster.wait_for_nodes()

class Where:
    def where(self):
        return ray.get_runtime_context().get_node_id(), os.environ.get("CUDA_VISIBLE_DEVICES", "")

def placed(overrides, ranks, workers):
    cfg = load_config("configs/multinode-gpu.yaml", [f"learner.ranks={ranks}", f"rollout.workers={workers}",
                      "rollout.questions_per_step=8", "learner.micro_batch_size=4", *overrides])
    check_fits(cfg, ray.cluster_resources(), joined=False, widest=widest_node_gpus())
    placement = Placement(cfg, timeout_s=60)
    options = [placement.learner_options(r) for r in range(ranks)] + [placement.rollout_options(i) for i in range(workers)]
    actors = [remote_class(Where, o).remote() for o in options]
    where = ray.get([a.where.remote() for a in actors], timeout=60)
    for actor in actors:
        ray.kill(actor)
    ray.util.remove_placement_group(placement.group)
    return {"where": where, "gpus": [o["num_gpus"] for o in options],
            "fit_on_wide_node": placement.workers_that_fit({"GPU": 4.0})}

tensor_parallel = placed(["rollout.tensor_parallel=2"], 2, 2)
colocated = placed(["rollout.colocate=true", "rollout.gpus_per_worker=0"], 2, 2)
try:
    placed(["rollout.tensor_parallel=8"], 1, 1)
    too_wide = ""
except RunStopped as exc:
    too_wide = str(exc)
print("RESULT " + json.dumps({"tp": tensor_parallel, "colocated": colocated, "too_wide": too_wide}))
ray.shutdown()
cluster.shutdown()
"""


@pytest.mark.integration
def test_tensor_parallel_engines_span_one_node_and_colocated_pairs_share_a_gpu():
    """A 2-GPU and a 4-GPU node (declared): each 2-way engine gets two GPUs of one node; a colocated
    learner rank and its engine see the same GPU; an 8-way engine no node holds is refused."""
    result = _script_result(SHARDS_SCRIPT)
    tp = result["tp"]
    assert tp["gpus"] == [1, 1, 2, 2] and tp["fit_on_wide_node"] == 2
    engines = tp["where"][2:]
    assert all(len(gpus.split(",")) == 2 for _, gpus in engines)  # each engine's two shards' GPUs, one node
    taken = [(node, gpu) for node, gpus in tp["where"] for gpu in gpus.split(",")]
    assert len(set(taken)) == 6  # all six GPUs of the cluster, none given twice

    colocated = result["colocated"]
    assert colocated["gpus"] == [0.5, 0.5, 0.5, 0.5]
    learners, workers = [tuple(w) for w in colocated["where"][:2]], [tuple(w) for w in colocated["where"][2:]]
    assert learners == workers  # rank i and engine i: same node, same single GPU
    assert len(set(learners)) == 2 and all(len(gpus.split(",")) == 1 for _, gpus in learners)

    assert "rollout.tensor_parallel=8 needs 8 GPUs on one node" in result["too_wide"]
    assert "the widest node has 4" in result["too_wide"]
