"""GPU checks of the cluster path: skipped without CUDA (the `gpu` marker), run by scripts/gpu_check.sh.

One GPU, colocated (rollout.colocate): a learner rank and a rollout engine on the same GPU, the engine
asleep during the update and given the weights by CUDA IPC. Exactness as on the CPU: after each sync
the engine's log-probs of a fixed sequence match the learner's (float32 tiny model).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tests.test_integration import LOGPROB_ATOL, PROBE_TEXT, _overrides  # noqa: E402
from tests.tiny_model import build_tiny_model  # noqa: E402

COLOCATED = ["learner.gpus_per_rank=1", "rollout.colocate=true", "rollout.kv_cache_gib=null",
             "rollout.memory_fraction=0.2"]


@pytest.fixture(scope="module")
def colocated(tmp_path_factory):
    import ray
    from transformers import AutoTokenizer

    from innerloop.distributed.cluster.fleet import Fleet
    from innerloop.distributed.config_load import load_config
    from innerloop.distributed.run.checks import check_devices

    model = build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")
    cfg = load_config(None, [*_overrides(model), *COLOCATED])
    check_devices(cfg)
    tokenizer = AutoTokenizer.from_pretrained(model)
    probe = [tokenizer.bos_token_id, *tokenizer.encode(PROBE_TEXT, add_special_tokens=False)]
    fleet = Fleet.start(cfg, str(model))
    try:
        yield cfg, fleet, probe
    finally:
        fleet.shutdown()
        ray.shutdown()


def _logprobs(actor, probe) -> torch.Tensor:
    import ray

    return torch.tensor(ray.get(actor.sequence_logprobs.remote(probe), timeout=120), dtype=torch.float64)


def _move_learner(fleet) -> None:
    import ray

    def perturb(learner):
        with torch.no_grad():
            for param in learner.engine.module.parameters():
                param.add_(0.05)

    ray.get(fleet.learners[0].__ray_call__.remote(perturb), timeout=120)


@pytest.mark.gpu
def test_a_colocated_engine_sleeps_for_the_update_and_takes_the_weights_by_cuda_ipc_exactly(colocated):
    import ray

    cfg, fleet, probe = colocated
    worker, learner = fleet.rollouts.workers[0], fleet.learners[0]
    for version in (1, 2):
        _move_learner(fleet)
        fleet.rollouts.sleep()  # as the update does
        fleet.sync_weights(version)  # wakes the weights, IPC, wakes the KV cache
        torch.testing.assert_close(_logprobs(worker, probe), _logprobs(learner, probe), atol=LOGPROB_ATOL, rtol=0)
        assert ray.get(worker.__ray_call__.remote(lambda w: w.policy_version), timeout=60) == version
    assert fleet.rollouts.weights._blob is None  # no blob: the weights never left the GPU


@pytest.mark.gpu
def test_a_colocated_engine_generates_after_waking(colocated):
    cfg, fleet, _ = colocated
    from innerloop.distributed.run.questions import load_questions

    questions = load_questions(cfg.tasks)[0][:2]
    trajectories = fleet.rollouts.generate(questions, 2)
    assert len(trajectories) == 4 and all(t.completion_ids for t in trajectories)
