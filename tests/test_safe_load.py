"""A checkpoint file that would run code when unpickled is refused, naming it, and nothing runs.

The learner's guards are tested here without a DeepSpeed engine: `refuse_unsafe_files` reads pickles
without executing them, and `weights_only_loads` makes even `torch.load(..., weights_only=False)`
(as DeepSpeed calls it) refuse anything but tensors, plain data and DeepSpeed's own state types.
"""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from innerloop.distributed.errors import UntrustedCheckpoint
from innerloop.learners.learner import _deepspeed_state_types
from innerloop.learners.safe_load import refuse_unsafe_files, weights_only_loads


class Payload:
    """Unpickling it would create a marker file: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def deepspeed_like_state():
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    return {"module": {"w": torch.ones(2, 2)}, "loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.gradients,
            "innerloop_rng": {"torch": torch.get_rng_state(), "python": __import__("random").getstate()}}


def test_deepspeed_state_passes_both_guards(tmp_path):
    folder = tmp_path / "state"
    folder.mkdir()
    torch.save(deepspeed_like_state(), folder / "optim_states.pt")
    refuse_unsafe_files(folder, _deepspeed_state_types())
    with weights_only_loads(_deepspeed_state_types()):
        loaded = torch.load(folder / "optim_states.pt", weights_only=False)  # what DeepSpeed asks for
    assert torch.equal(loaded["module"]["w"], torch.ones(2, 2)) and loaded["loss_scaler"].cur_scale == 1.0
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # the switch is undone afterwards


def test_a_tampered_file_is_refused_by_name_and_runs_nothing(tmp_path):
    folder, marker = tmp_path / "state", tmp_path / "PWNED"
    folder.mkdir()
    state = deepspeed_like_state()
    torch.save(state, folder / "mp_rank_00_model_states.pt")
    torch.save({**state, "evil": Payload(marker)}, folder / "zero_pp_rank_0_optim_states.pt")
    with pytest.raises(UntrustedCheckpoint) as caught:
        refuse_unsafe_files(folder, _deepspeed_state_types())
    message = str(caught.value)
    assert "zero_pp_rank_0_optim_states.pt holds posix.system" in message and "refused without being loaded" in message
    with weights_only_loads(_deepspeed_state_types()), pytest.raises(pickle.UnpicklingError):
        torch.load(folder / "zero_pp_rank_0_optim_states.pt", weights_only=False)
    assert not marker.exists()


def test_a_file_that_is_not_a_torch_archive_is_refused(tmp_path):
    folder = tmp_path / "state"
    folder.mkdir()
    (folder / "model_states.pt").write_bytes(pickle.dumps({"a": 1}))  # a bare pickle, not torch's zip
    with pytest.raises(UntrustedCheckpoint, match="model_states.pt holds an unreadable file"):
        refuse_unsafe_files(folder, _deepspeed_state_types())
