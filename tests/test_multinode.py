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

SCRIPT = r"""
import json, os
import ray
from ray.cluster_utils import Cluster
from ray.util.placement_group import placement_group_table

from innerloop.distributed.config import load_config
from innerloop.distributed.errors import RunStopped
from innerloop.distributed.placement import Placement, remote_class

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
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(lines[0].removeprefix("RESULT "))

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
