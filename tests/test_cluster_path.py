"""The cluster path's settings, without a cluster: tensor-parallel engines, colocation, and what a
device cannot do, refused before any actor starts and naming the setting."""

from __future__ import annotations

import pytest
import torch

from innerloop.actors.rollout import cpu_shard_binding
from innerloop.distributed.cluster.placement import _gpu_bundles, check_fits
from innerloop.distributed.cluster.weight_sync import rank_offsets
from innerloop.distributed.config import ConfigError
from innerloop.distributed.config_load import load_config
from innerloop.distributed.errors import RunStopped
from innerloop.distributed.run.checks import check_devices
from innerloop.distributed.transfer import ipc_buckets

GPU_RUN = ["learner.gpus_per_rank=1", "rollout.gpus_per_worker=1", "rollout.kv_cache_gib=null"]
COLOCATED = ["learner.gpus_per_rank=1", "rollout.colocate=true", "rollout.kv_cache_gib=null"]


def test_a_tensor_parallel_engine_takes_one_bundle_of_k_gpus_after_the_learners():
    cfg = load_config(None, [*GPU_RUN, "learner.ranks=2", "rollout.workers=2", "rollout.tensor_parallel=4"])
    assert cfg.rollout.engine_gpus == 4
    assert _gpu_bundles(cfg) == [{"CPU": 1, "GPU": 1}] * 2 + [{"CPU": 1, "GPU": 4}] * 2


def test_colocated_ranks_and_engines_share_one_bundle_per_gpu():
    cfg = load_config(None, [*COLOCATED, "learner.ranks=2", "rollout.workers=2"])
    assert _gpu_bundles(cfg) == [{"CPU": 2, "GPU": 1}] * 2


@pytest.mark.parametrize("share", [0.5, 2.0])
def test_tensor_parallel_shards_need_a_whole_gpu_each(share):
    with pytest.raises(ConfigError, match=r"rollout.tensor_parallel = 2 with rollout.gpus_per_worker"):
        load_config(None, ["rollout.tensor_parallel=2", f"rollout.gpus_per_worker={share}"])


@pytest.mark.parametrize("extra, message", [
    (["rollout.tensor_parallel=2"], r"rollout.colocate with rollout.tensor_parallel > 1 is not built yet"),
    (["rollout.asynchronous=true"], r"rollout.colocate with rollout.asynchronous"),
])
def test_colocation_refuses_what_it_cannot_do_yet(extra, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["rollout.colocate=true", *extra])


@pytest.mark.parametrize("overrides, message", [
    (["rollout.colocate=true"], r"rollout.colocate needs GPUs \(learner.gpus_per_rank is 0: a CPU run\)"),
    ([*COLOCATED, "rollout.workers=2"], r"rollout.workers \(2\) must equal learner.ranks \(1\)"),
    ([*COLOCATED, "learner.zero_stage=3"], r"rollout.colocate with learner.zero_stage=3 is not built yet"),
    ([*COLOCATED, "rollout.sync=object_store"], r"leave rollout.sync=transfer and rollout.sync_backend=auto"),
    (["rollout.tensor_parallel=64"], r"rollout.tensor_parallel=64 on CPU puts each shard on cores of its own"),
])
def test_what_the_device_cannot_do_is_refused_naming_the_setting(overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_devices(load_config(None, overrides))


def test_a_colocated_gpu_run_and_a_cpu_tensor_parallel_engine_pass():
    check_devices(load_config(None, COLOCATED))
    check_devices(load_config(None, ["rollout.tensor_parallel=1"]))


def test_an_engine_wider_than_every_node_is_refused_naming_tensor_parallel():
    cfg = load_config(None, [*GPU_RUN, "rollout.tensor_parallel=8"])
    check_fits(cfg, {"CPU": 16.0, "GPU": 16.0}, joined=False, widest=8.0)  # one 8-GPU node holds it
    with pytest.raises(RunStopped, match=r"rollout.tensor_parallel=8 needs 8 GPUs on one node for each engine, "
                                         r"but the widest node has 4"):
        check_fits(cfg, {"CPU": 16.0, "GPU": 16.0}, joined=False, widest=4.0)


def test_colocated_runs_need_one_gpu_per_learner_rank():
    cfg = load_config(None, [*COLOCATED, "learner.ranks=2", "rollout.workers=2"])
    check_fits(cfg, {"CPU": 8.0, "GPU": 2.0}, joined=False, widest=2.0)
    with pytest.raises(RunStopped, match=r"2 GPUs needed, 1 in the cluster"):
        check_fits(cfg, {"CPU": 8.0, "GPU": 1.0}, joined=False, widest=1.0)


def test_each_engine_takes_as_many_transfer_ranks_as_it_has_shards():
    assert rank_offsets([1, 1]) == [1, 2, 3]
    assert rank_offsets([2, 1, 4]) == [1, 3, 4, 8]  # the last: the group's size, learner rank 0 included
    assert rank_offsets([]) == [1]


def test_cpu_shards_get_cores_of_their_own(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert cpu_shard_binding(2) == "0,1|2,3"
    assert cpu_shard_binding(4) == "0|1|2|3"
    assert cpu_shard_binding(2, threads=1) == "0|1"
    with pytest.raises(ValueError, match=r"needs 6 cores; this machine has 4"):
        cpu_shard_binding(2, threads=3)


def test_ipc_buckets_share_parameters_in_place_and_copy_only_what_needs_another_dtype():
    named = [("a", torch.zeros(256, dtype=torch.bfloat16)), ("b", torch.zeros(256, dtype=torch.float32)),
             ("c", torch.zeros(16, 16, dtype=torch.bfloat16).t())]  # not contiguous
    shared = []
    infos, copies = ipc_buckets(named, torch.bfloat16, limit=1100, device_uuid="GPU-1",
                                reduce=lambda t: shared.append(t) or ("handle", len(shared)))
    assert [info["names"] for info in infos] == [["a", "b"], ["c"]]  # 3 x 512 bytes > 1100: c goes on
    assert infos[0]["dtype_names"] == ["bfloat16", "bfloat16"] and infos[1]["shapes"] == [[16, 16]]
    assert infos[0]["ipc_handles"] == [{"GPU-1": ("handle", 1)}, {"GPU-1": ("handle", 2)}]
    assert shared[0] is not None and shared[0].data_ptr() == named[0][1].data_ptr()  # no copy
    assert [c.dtype for c in copies] == [torch.bfloat16, torch.bfloat16] and copies[1].is_contiguous()


def test_tensor_parallel_must_split_the_attention_heads_evenly(tmp_path):
    from transformers import LlamaConfig

    from innerloop.distributed.run.checks import check_shards_divide

    LlamaConfig(num_attention_heads=9, num_key_value_heads=3, hidden_size=576).save_pretrained(tmp_path)
    check_shards_divide(load_config(None, ["rollout.tensor_parallel=3"]), str(tmp_path))
    with pytest.raises(ConfigError, match=r"rollout.tensor_parallel=2 cannot split .*'s 9 attention heads evenly; "
                                          r"choose a divisor of 9 \(the widest below 2: 1\)"):
        check_shards_divide(load_config(None, ["rollout.tensor_parallel=2"]), str(tmp_path))
