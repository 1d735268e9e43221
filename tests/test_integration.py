"""Integration tests: the real stack on a tiny fp32 Llama built locally.

Real Ray (a local cluster), a real vLLM CPU engine, real DeepSpeed (gloo). The stack starts once per
session and is shared:

- `stack`: one learner rank and one rollout worker (`Fleet.start`, as the driver starts them).
- `trained`: two training steps through `Trainer` into a run directory. Everything the tests check
  about that run (log-probs, learner weights, every generate call) is measured inside the fixture,
  so a later test that moves the shared learner on cannot change what they see.
- `resumed`: a copy of that run directory resumed on the same fleet for a third step.
- the data-parallel test starts its own two learner ranks in the same Ray cluster.

The CLI test at the end starts nothing (no Ray, no engine) and carries no integration marker.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `tests.doubles` and `tests.tiny_model`, as the workers import them
    sys.path.insert(0, str(REPO_ROOT))

from innerloop.distributed import cli  # noqa: E402

from innerloop.distributed.run import driver

from innerloop.distributed.state import checkpoints
from innerloop.distributed.config_load import load_config  # noqa: E402
from innerloop.distributed.run.driver import Trainer, TrainResult  # noqa: E402
from tests.doubles import length_reward  # noqa: E402
from tests.tiny_model import build_tiny_model  # noqa: E402

PROBE_TEXT = "What is 12 + 9? 12 + 9 = 21. The answer is \\boxed{21}."
LOGPROB_ATOL = 1e-4  # engine vs learner on the same fp32 weights: different kernels, same numbers
MOVED_AT_LEAST = 1e-2  # two steps at lr 1e-3 move some log-prob of the probe at least this much
PHASES = ("time_generate", "time_update", "time_sync", "time_step", "time_other")


def _overrides(model: Path) -> list[str]:
    # temperature != 1 on purpose: the sampler's and the learner's log-probs must agree there too.
    return [f"model.name={model}", "model.dtype=float32", "rollout.max_tokens=16", "rollout.temperature=0.7",
            "rollout.questions_per_step=4", "rollout.group_size=4", "learner.micro_batch_size=4",
            "reward.kind=custom", "reward.custom=tests.doubles:length_reward", "tasks.eval_count=8",
            "tasks.train_count=50", "train.steps=2", "train.checkpoint_every=1", "learner.lr=1e-3",
            "rollout.max_model_len=512", "rollout.kv_cache_gib=0.25",  # the tiny model has 512 positions
            # What the assertions rely on, pinned against changes to the demo defaults:
            "rollout.top_p=1.0", "learner.warmup_steps=2", "eval.before_and_after=true", "eval.every=0",
            "train.keep_checkpoints=2", "train.keep_best=0", "train.export_final_model=true", "train.max_minutes=0"]


# ---------------------------------------------------------------- fixtures: one stack per session


@dataclass
class Stack:
    model: Path
    cfg: object
    fleet: object
    probe_ids: list[int]

    @property
    def learner(self):
        return self.fleet.learners[0]

    @property
    def worker(self):
        return self.fleet.rollouts.workers[0]

    def engine_logprobs(self) -> torch.Tensor:
        import ray

        return torch.tensor(ray.get(self.worker.sequence_logprobs.remote(self.probe_ids)), dtype=torch.float64)

    def learner_logprobs(self, learner=None) -> torch.Tensor:
        import ray

        learner = learner or self.learner
        return torch.tensor(ray.get(learner.sequence_logprobs.remote(self.probe_ids)), dtype=torch.float64)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def stack(tiny_model):
    import ray
    import ray.cloudpickle
    from transformers import AutoTokenizer

    from innerloop.distributed.cluster.fleet import Fleet

    # Functions of this module that run inside actors travel by value: the actors cannot import it.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    # Ray workers inherit this environment (the raylet starts them), and the reward's scoring process
    # is spawned from a worker: both must import `tests.doubles` whatever directory pytest ran from.
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *([saved] if saved else [])])
    try:
        tokenizer = AutoTokenizer.from_pretrained(tiny_model)
        probe_ids = [tokenizer.bos_token_id, *tokenizer.encode(PROBE_TEXT, add_special_tokens=False)]
        cfg = load_config(None, _overrides(tiny_model))
        fleet = Fleet.start(cfg, str(tiny_model))
        try:
            yield Stack(tiny_model, cfg, fleet, probe_ids)
        finally:
            fleet.shutdown()  # closes the engines (vLLM's processes) before killing the actors
    finally:
        ray.shutdown()
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


@dataclass
class GenerateCall:
    questions: int
    samples_per_question: int
    is_eval: bool
    trajectories: list


@contextmanager
def recording_generate(fleet):
    """Every generation the driver collects (training and eval), with what it returned."""
    calls: list[GenerateCall] = []
    real = fleet.rollouts.collect

    def spy(call):
        fresh = call.trajectories is None  # a generation drained early is collected twice; count it once
        out = real(call)
        if fresh:
            calls.append(GenerateCall(len(call.questions), call.samples_per_question, call.sampling is not None, out))
        return out

    fleet.rollouts.collect = spy  # generate() is submit() then collect(): both the driver's paths pass here
    try:
        yield calls
    finally:
        del fleet.rollouts.collect


@dataclass
class TrainedRun:
    cfg: object
    run_dir: Path
    result: TrainResult
    calls: list[GenerateCall]
    engine_before: torch.Tensor
    learner_before: torch.Tensor
    engine_after: torch.Tensor
    learner_after: torch.Tensor
    learner_state: dict[str, torch.Tensor]  # the learner's weights right after training
    worker_version: int

    def records(self) -> list[dict]:
        return [json.loads(line) for line in (self.run_dir / "metrics.jsonl").read_text().splitlines()]

    def step_records(self) -> list[dict]:
        return [r for r in self.records() if "policy_version" in r]

    def train_calls(self) -> list[GenerateCall]:
        return [c for c in self.calls if not c.is_eval]


@pytest.fixture(scope="session")
def trained(stack, tmp_path_factory) -> TrainedRun:
    import ray

    run_dir = tmp_path_factory.mktemp("runs") / "run"
    engine_before, learner_before = stack.engine_logprobs(), stack.learner_logprobs()
    with recording_generate(stack.fleet) as calls:
        result = Trainer(stack.cfg, run_dir).train(stack.fleet)
    return TrainedRun(
        cfg=stack.cfg, run_dir=run_dir, result=result, calls=calls,
        engine_before=engine_before, learner_before=learner_before,
        engine_after=stack.engine_logprobs(), learner_after=stack.learner_logprobs(),
        learner_state=ray.get(stack.learner.full_state_dict.remote()),
        worker_version=ray.get(stack.worker.__ray_call__.remote(lambda worker: worker.policy_version)))


def _perturb_learner(stack) -> None:
    """Move every weight of the shared learner, so only a real checkpoint load can bring them back."""
    import ray

    def perturb(learner):
        with torch.no_grad():
            for param in learner.engine.module.parameters():
                param.add_(0.05)

    ray.get(stack.learner.__ray_call__.remote(perturb))


@dataclass
class ResumedRun:
    run_dir: Path
    result: TrainResult
    records_before: int
    calls: list[GenerateCall]
    checkpoint_logprobs: torch.Tensor
    perturbed_logprobs: torch.Tensor
    restored_logprobs: list[torch.Tensor]  # the learner's, at each weight sync of the resumed run


@pytest.fixture(scope="session")
def resumed(stack, trained, tmp_path_factory) -> ResumedRun:
    """A copy of the trained run, resumed from its step-2 checkpoint for one more step."""
    run_dir = tmp_path_factory.mktemp("runs") / "resumed"
    shutil.copytree(trained.run_dir, run_dir)
    records_before = len(trained.records())
    checkpoint_logprobs = stack.learner_logprobs()  # the live learner is still at step 2
    _perturb_learner(stack)
    perturbed_logprobs = stack.learner_logprobs()
    cfg = load_config(None, [*_overrides(stack.model), "train.steps=3"])
    restored: list[torch.Tensor] = []
    real_sync = stack.fleet.sync_weights

    def sync_spy(version, wait=True):
        restored.append(stack.learner_logprobs())
        return real_sync(version, wait)

    stack.fleet.sync_weights = sync_spy
    try:
        with recording_generate(stack.fleet) as calls:
            result = Trainer(cfg, run_dir, resume=True).train(stack.fleet)
    finally:
        del stack.fleet.sync_weights
    return ResumedRun(run_dir, result, records_before, calls, checkpoint_logprobs, perturbed_logprobs, restored)


# ---------------------------------------------------------------- two steps through the driver


@pytest.mark.integration
def test_two_steps_advance_the_policy_version(trained):
    assert trained.result.steps_done == 2
    assert [(r["step"], r["policy_version"]) for r in trained.step_records()] == [(1, 1), (2, 2)]
    # The driver's generate calls: held-out eval, step 1, step 2, held-out eval.
    assert [c.is_eval for c in trained.calls] == [True, False, False, True]
    versions = [{t.policy_version for t in c.trajectories} for c in trained.calls]
    assert versions == [{0}, {0}, {1}, {2}]  # each trajectory names the weights that generated it
    assert trained.worker_version == 2


@pytest.mark.integration
def test_training_trajectories_are_whole_groups_scored_by_the_custom_reward(trained):
    cfg = trained.cfg
    for call in trained.train_calls():
        assert call.questions == cfg.rollout.questions_per_step
        assert len(call.trajectories) == cfg.rollout.questions_per_step * cfg.rollout.group_size
        sizes = {}
        for t in call.trajectories:
            sizes[t.question_id] = sizes.get(t.question_id, 0) + 1
            assert len(t.logprobs) == len(t.completion_ids) > 0
            assert all(lp <= 0.0 and math.isfinite(lp) for lp in t.logprobs)
            assert len(t.completion_ids) <= cfg.rollout.max_tokens
            # Scored in the worker's scoring process, by the test double imported there.
            assert t.reward_error == ""
            assert t.reward == length_reward(t.text, None)
        assert set(sizes.values()) == {cfg.rollout.group_size}


@pytest.mark.integration
def test_synced_engine_logprobs_match_the_learner_and_moved_from_step_0(trained):
    assert len(trained.engine_after) == len(trained.learner_after) > 10
    # Before training both load the same folder; after, the engine holds the learner's synced weights.
    torch.testing.assert_close(trained.engine_before, trained.learner_before, atol=LOGPROB_ATOL, rtol=0)
    torch.testing.assert_close(trained.engine_after, trained.learner_after, atol=LOGPROB_ATOL, rtol=0)
    moved = (trained.engine_after - trained.engine_before).abs().max().item()
    assert moved > MOVED_AT_LEAST, f"two steps moved the probe's log-probs by only {moved:.2e}"


@pytest.mark.integration
def test_step_metrics_are_sane(trained):
    records, calls = trained.step_records(), trained.train_calls()
    assert len(records) == len(calls) == 2
    for record, call in zip(records, calls):
        rewards = [t.reward for t in call.trajectories]
        assert math.isfinite(record["reward_mean"])
        assert record["reward_mean"] == pytest.approx(sum(rewards) / len(rewards))
        assert record["generated_tokens"] == sum(len(t.completion_ids) for t in call.trajectories)
        assert record["tokens"] == record["generated_tokens"]  # every completion token carries loss
        assert record["reward_errors"] == 0
        # The learner's log-probs of the sampled tokens are the sampler's (fp32, same weights).
        assert 0.0 <= record["sampler_logprob_gap"] < LOGPROB_ATOL
        assert math.isfinite(record["grad_norm"]) and record["grad_norm"] > 0.0
        assert record["learning_rate"] > 0.0
        for phase in PHASES:
            assert math.isfinite(record[phase]) and record[phase] >= 0.0, phase
        assert record["time_step"] >= record["time_generate"] + record["time_update"] + record["time_sync"]
    # Warm-up: the learning rate grows over the first steps.
    assert records[0]["learning_rate"] < records[1]["learning_rate"] <= trained.cfg.learner.lr


# ---------------------------------------------------------------- what the run directory holds


@pytest.mark.integration
def test_run_directory_holds_config_metrics_and_tensorboard(trained):
    run = trained.run_dir
    text = (run / "config.yaml").read_text()
    assert trained.cfg.fingerprint() in text.splitlines()[0]
    assert yaml.safe_load(text) == trained.cfg.model_dump(mode="json")

    records = trained.records()
    assert [r.get("event") for r in records] == ["eval_before", None, "checkpoint", None, "checkpoint", "eval_after",
                                                 "done"]
    evals = [r for r in records if str(r.get("event", "")).startswith("eval_")]
    assert [r["step"] for r in evals] == [0, 2]
    for r in evals:
        assert r["eval_questions"] == trained.cfg.tasks.eval_count
        assert 0.0 <= r["eval_accuracy"] <= 1.0
    assert trained.result.accuracy_before == evals[0]["eval_accuracy"]
    assert trained.result.accuracy_after == evals[1]["eval_accuracy"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    event_files = sorted((run / "tensorboard").glob("events.out.tfevents.*"))
    assert event_files
    scalars = EventAccumulator(str(run / "tensorboard")).Reload().Scalars("reward_mean")
    assert [s.step for s in scalars] == [1, 2]
    assert [s.value for s in scalars] == pytest.approx([r["reward_mean"] for r in trained.step_records()])


@pytest.mark.integration
def test_checkpoints_hold_model_deepspeed_state_and_driver_state(trained):
    root = trained.run_dir / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-000001", "step-000002"]  # no partial left
    latest = checkpoints.latest(root)
    assert latest == root / "step-000002"
    assert (latest / "model" / "config.json").is_file()
    assert checkpoints.model_folder(latest) == latest / "model"
    deepspeed_files = [p for p in (latest / "deepspeed").rglob("*") if p.is_file()]
    assert any(p.suffix == ".pt" for p in deepspeed_files), deepspeed_files
    state = json.loads((latest / "state.json").read_text())
    assert {k: state[k] for k in ("step", "policy_version", "question_position", "config_fingerprint")} == {
        "step": 2, "policy_version": 2, "question_position": 2 * trained.cfg.rollout.questions_per_step,
        "config_fingerprint": trained.cfg.fingerprint()}
    assert checkpoints.verify(latest) == []  # every file matches the manifest's checksum
    manifest = json.loads((latest / "manifest.json").read_text())
    assert manifest["packages"]["deepspeed"] and manifest["packages"]["torch"]
    assert state["rng"]["python"] and "watchdog" in state["extra"]


def _assert_same_weights(folder: Path, learner_state: dict[str, torch.Tensor]) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    loaded = model.state_dict()
    assert set(learner_state) <= set(loaded)
    assert set(loaded) - set(learner_state) <= {"lm_head.weight"}  # tied to the embeddings
    for name, tensor in learner_state.items():
        assert torch.equal(loaded[name], tensor), name


@pytest.mark.integration
def test_final_model_loads_in_transformers_with_the_learner_weights(trained):
    from transformers import AutoTokenizer

    assert trained.result.final_model == trained.run_dir / "final_model"
    _assert_same_weights(trained.run_dir / "final_model", trained.learner_state)
    _assert_same_weights(trained.run_dir / "checkpoints" / "step-000002" / "model", trained.learner_state)
    tokenizer = AutoTokenizer.from_pretrained(trained.run_dir / "final_model")
    assert tokenizer.chat_template


# ---------------------------------------------------------------- resume


@pytest.mark.integration
def test_resume_restores_the_checkpoint_and_continues_the_step_count(resumed):
    assert resumed.result.steps_done == 3
    new = [json.loads(line) for line in (resumed.run_dir / "metrics.jsonl").read_text().splitlines()]
    new = new[resumed.records_before:]
    # No held-out eval "before" on a resumed run; one step (3), then the eval "after".
    assert [r.get("event") for r in new] == [None, "checkpoint", "eval_after", "done"]
    assert (new[0]["step"], new[0]["policy_version"]) == (3, 3)
    assert new[0]["sampler_logprob_gap"] < LOGPROB_ATOL  # the engine sampled with the restored weights
    train_calls = [c for c in resumed.calls if not c.is_eval]
    assert len(train_calls) == 1 and {t.policy_version for t in train_calls[0].trajectories} == {2}
    # The first sync pushes the restored weights: those of the checkpoint, not the perturbed live ones.
    restored = resumed.restored_logprobs[0]
    assert (resumed.perturbed_logprobs - resumed.checkpoint_logprobs).abs().max() > MOVED_AT_LEAST
    torch.testing.assert_close(restored, resumed.checkpoint_logprobs, atol=1e-6, rtol=0)
    root = resumed.run_dir / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-000002", "step-000003"]  # keep_checkpoints=2
    state = json.loads((root / "step-000003" / "state.json").read_text())
    assert (state["step"], state["policy_version"], state["question_position"]) == (3, 3, 12)


# ---------------------------------------------------------------- two data-parallel learner ranks


@pytest.mark.integration
def test_a_tampered_checkpoint_is_refused_naming_the_file_and_runs_nothing(stack, trained, tmp_path):
    """A pickle that would run code, put into a real checkpoint whose manifest is then fixed up to
    match, is refused by the learner before DeepSpeed opens it; the run stops with the file named."""
    run_dir, marker = tmp_path / "run", tmp_path / "PWNED"
    shutil.copytree(trained.run_dir, run_dir)
    latest = checkpoints.latest(run_dir / "checkpoints")
    [target] = (latest / "deepspeed").rglob("*model_states.pt")

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    state = torch.load(target, weights_only=False)
    torch.save({**state, "innerloop_rng": Payload()}, target)
    manifest = json.loads((latest / "manifest.json").read_text())
    manifest["files"] = checkpoints._describe_files(latest)  # what a careful attacker would do
    (latest / "manifest.json").write_text(json.dumps(manifest))
    assert checkpoints.verify(latest) == []
    with pytest.raises(checkpoints.CheckpointError) as caught:
        checkpoints.load(latest, stack.fleet)
    assert f"{target} holds posix.system" in str(caught.value) and "refused without being loaded" in str(caught.value)
    assert not marker.exists()


@pytest.mark.integration
def test_two_zero2_learner_ranks_hold_identical_weights_matching_one_rank(stack):
    """Two ZeRO-2 ranks, each given half the batch, end the update with identical weights, and the
    same gradient norm, loss and weights as one rank given the whole batch."""
    import ray

    from innerloop.distributed.cluster.fleet import Fleet
    from innerloop.distributed.run.questions import load_questions
    from innerloop.distributed.run.samples import build_samples, group_advantages, group_by_question, loss_normalizers

    pair_cfg = load_config(None, [*_overrides(stack.model), "learner.ranks=2", "learner.zero_stage=2"])
    single_cfg = load_config(None, [*_overrides(stack.model), "learner.ranks=1", "learner.zero_stage=2"])
    # One real step's batch, rolled out by the shared engine.
    questions = load_questions(pair_cfg.tasks)[0][: pair_cfg.rollout.questions_per_step]
    trajectories = stack.fleet.rollouts.generate(questions, pair_cfg.rollout.group_size)
    groups = group_by_question(trajectories)
    samples = build_samples(groups, group_advantages(groups, pair_cfg.algorithm), pair_cfg.algorithm)
    normalizers = loss_normalizers(samples, pair_cfg.algorithm)
    assert any(s.advantage != 0.0 for s in samples), "no reward variance: the update would not move"

    pair = Fleet.start(pair_cfg, str(stack.model), rollout_workers=0)
    single = Fleet.start(single_cfg, str(stack.model), rollout_workers=0)
    try:
        before = stack.learner_logprobs(pair.learners[1])
        pair_metrics = pair.update(samples, normalizers)
        single_metrics = single.update(samples, normalizers)

        def module_weights(learner):  # runs in the actor: that rank's own copy of the weights
            return {k: v.detach().clone() for k, v in learner.engine.module.state_dict().items()}

        # Loss pieces are summed over ranks, and every rank steps with the whole batch's gradient:
        # the same loss and gradient norm as one rank (the norm is what a wrong scale would change).
        assert pair_metrics.sums.tokens == single_metrics.sums.tokens == sum(len(t.completion_ids) for t in trajectories)
        for key in ("loss", "grad_norm", "learning_rate"):
            assert pair_metrics.record()[key] == pytest.approx(single_metrics.record()[key], rel=1e-5, abs=1e-7), key
        assert single_metrics.grad_norm > 0.0

        rank0, rank1, alone = ray.get([l.__ray_call__.remote(module_weights)
                                       for l in pair.learners + single.learners])
        assert set(rank0) == set(rank1) == set(alone)
        # Adam's first step is about lr * sign(gradient); where a gradient is near Adam's eps, fp noise
        # from a different split moves it by a few percent of a step, so compare against the step size.
        step_size = single_metrics.learning_rate
        for name in rank0:
            assert torch.equal(rank0[name], rank1[name]), f"the ranks disagree on {name}"
            gap = (rank0[name] - alone[name]).abs().max().item()
            assert gap < 0.05 * step_size, f"{name}: two ranks vs one differ by {gap:.2e} (lr {step_size:.1e})"
        after = [stack.learner_logprobs(l) for l in pair.learners]
        assert torch.equal(after[0], after[1])
        assert (after[1] - before).abs().max() > 1e-3, "the update did not move rank 1's weights"
    finally:
        pair.shutdown()
        single.shutdown()


@pytest.mark.integration
def test_the_fused_optimizer_steps_the_same_weights_as_the_per_tensor_loop(stack):
    """learner.fused_optimizer hands DeepSpeed torch's fused AdamW, and one update with it lands on the
    weights the default per-tensor AdamW reaches from the same batch (to float rounding)."""
    import ray

    from innerloop.distributed.cluster.fleet import Fleet
    from innerloop.distributed.run.questions import load_questions
    from innerloop.distributed.run.samples import build_samples, group_advantages, group_by_question, loss_normalizers

    configs = {fused: load_config(None, [*_overrides(stack.model), f"learner.fused_optimizer={fused}"])
               for fused in (True, False)}
    questions = load_questions(configs[True].tasks)[0][: configs[True].rollout.questions_per_step]
    groups = group_by_question(stack.fleet.rollouts.generate(questions, configs[True].rollout.group_size))
    samples = build_samples(groups, group_advantages(groups, configs[True].algorithm), configs[True].algorithm)
    normalizers = loss_normalizers(samples, configs[True].algorithm)
    assert any(s.advantage != 0.0 for s in samples), "no reward variance: the update would not move"

    def optimizer_and_weights(learner):  # runs in the actor
        inner = learner.engine.optimizer.optimizer  # ZeRO's wrapper holds torch's optimizer
        return inner.defaults.get("fused"), {k: v.detach().clone() for k, v in learner.engine.module.state_dict().items()}

    fleets = {fused: Fleet.start(cfg, str(stack.model), rollout_workers=0) for fused, cfg in configs.items()}
    try:
        before = stack.learner_logprobs(fleets[True].learners[0])
        metrics = {fused: fleet.update(samples, normalizers) for fused, fleet in fleets.items()}
        (fused_flag, fused), (loop_flag, loop) = ray.get(
            [fleets[f].learners[0].__ray_call__.remote(optimizer_and_weights) for f in (True, False)])
        assert fused_flag is True and not loop_flag
        assert metrics[True].record()["grad_norm"] == pytest.approx(metrics[False].record()["grad_norm"], rel=1e-5)
        step_size = metrics[True].learning_rate
        gap = max((fused[name] - loop_weight).abs().max().item() for name, loop_weight in loop.items())
        assert gap < 0.05 * step_size, f"fused and per-tensor AdamW differ by {gap:.2e} (lr {step_size:.1e})"
        after = stack.learner_logprobs(fleets[True].learners[0])
        assert (after - before).abs().max() > 1e-3, "the fused update did not move the weights"
    finally:
        for fleet in fleets.values():
            fleet.shutdown()


@pytest.mark.integration
def test_a_checkpoint_resumes_on_a_different_number_of_learner_ranks(stack, tmp_path):
    """2 ranks -> checkpoint -> 1 rank -> checkpoint -> 2 ranks: the model, optimizer (Adam moments)
    and LR schedule carry over, so the next update matches the one the writer would have made."""
    from innerloop.distributed.cluster.fleet import Fleet
    from innerloop.distributed.run.questions import load_questions
    from innerloop.distributed.run.samples import build_samples, group_advantages, group_by_question, loss_normalizers

    def cfg(ranks):
        return load_config(None, [*_overrides(stack.model), f"learner.ranks={ranks}", "learner.zero_stage=2"])

    questions = load_questions(stack.cfg.tasks)[0][: stack.cfg.rollout.questions_per_step]
    groups = group_by_question(stack.fleet.rollouts.generate(questions, stack.cfg.rollout.group_size))
    samples = build_samples(groups, group_advantages(groups, stack.cfg.algorithm), stack.cfg.algorithm)
    normalizers = loss_normalizers(samples, stack.cfg.algorithm)

    def handoff(writer, ranks_then, reader_cfg, folder):
        """Update the writer, save it, update it again; the reader loads the save and makes that update."""
        writer.update(samples, normalizers)
        writer.save_learners(folder, "state")
        expected = writer.update(samples, normalizers)
        reader = Fleet.start(reader_cfg, str(stack.model), rollout_workers=0)
        reader.load_learners(folder, "state", saved_ranks=ranks_then)
        got = reader.update(samples, normalizers)
        for key in ("grad_norm", "learning_rate"):
            assert getattr(got, key) == pytest.approx(getattr(expected, key), rel=1e-4), key
        # Adam's second step uses the restored moments: a lost optimizer state would move weights differently.
        torch.testing.assert_close(stack.learner_logprobs(reader.learners[0]),
                                   stack.learner_logprobs(writer.learners[0]), atol=1e-4, rtol=0)
        assert not list(folder.parent.parent.glob(".universal-*"))  # the converted copy is removed
        return reader

    pair = Fleet.start(cfg(2), str(stack.model), rollout_workers=0)
    single = pair2 = None
    try:
        single = handoff(pair, 2, cfg(1), tmp_path / "two" / "deepspeed")
        pair2 = handoff(single, 1, cfg(2), tmp_path / "one" / "deepspeed")
    finally:
        for fleet in (pair, single, pair2):
            if fleet is not None:
                fleet.shutdown()


@pytest.mark.integration
def test_innerloop_scale_grows_the_rollout_pool_of_a_running_job(stack, tmp_path):
    """`innerloop scale RUN_DIR --rollout-workers 2` mid-run: a second engine starts, gets the current
    weights before it generates, and takes half of every later step's questions."""
    import ray

    cfg = load_config(None, [*_overrides(stack.model), "train.steps=3", "eval.before_and_after=false",
                             "train.export_final_model=false"])
    run_dir = tmp_path / "run"
    ask = threading.Thread(target=lambda: _when(lambda: (run_dir / "ledger.jsonl").exists(),
                                               lambda: cli.main(["scale", str(run_dir), "--rollout-workers", "2"])))
    ask.start()
    try:
        with recording_generate(stack.fleet) as calls:
            Trainer(cfg, run_dir).train(actors=stack.fleet)
        ask.join()
        assert len(stack.fleet.rollouts.workers) == 2
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        scaled = [r for r in records if r.get("event") == "rollout_workers_scaled"]
        assert [(r["from"], r["to"]) for r in scaled] == [(1, 2)] and scaled[0]["step"] in (1, 2)
        # Every question still gets G trajectories, and the new engine samples with the learner's weights.
        assert all(len(c.trajectories) == c.questions * c.samples_per_question for c in calls)
        new = stack.fleet.rollouts.workers[1]
        engine = torch.tensor(ray.get(new.sequence_logprobs.remote(stack.probe_ids), timeout=120), dtype=torch.float64)
        torch.testing.assert_close(engine, stack.learner_logprobs(), atol=LOGPROB_ATOL, rtol=0)
    finally:
        stack.fleet.rollouts.resize(1)  # the shared fleet goes back to one engine
        stack.fleet.rollouts.drain_events()
    assert len(stack.fleet.rollouts.workers) == 1


@pytest.mark.integration
def test_asynchronous_rollouts_train_on_trajectories_one_version_old_with_importance_weights(stack, tmp_path):
    """rollout.asynchronous with max_staleness 1: each step after the first trains on trajectories the
    engine sampled one policy version back; they carry importance weights, and at the end the engine
    holds exactly the learner's weights."""
    cfg = load_config(None, [*_overrides(stack.model), "train.steps=3", "eval.before_and_after=false",
                             "train.export_final_model=false", "rollout.asynchronous=true",
                             "rollout.max_staleness=1"])
    run_dir = tmp_path / "run"
    with recording_generate(stack.fleet) as calls:
        result = Trainer(cfg, run_dir).train(actors=stack.fleet)
    assert result.steps_done == 3
    assert all(len(c.trajectories) == c.questions * c.samples_per_question for c in calls)
    lines = [json.loads(line) for line in (run_dir / "trajectories.jsonl").read_text().splitlines()]
    staleness = {(line["step"], line["staleness"]) for line in lines}
    assert staleness == {(1, 0), (2, 1), (3, 1)}
    records = [r for r in (json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines())
               if "policy_version" in r]
    # A fresh batch is not weighted; a stale one is, by min(pi / mu, cap): different from 1, never above the cap.
    assert records[0]["is_weight_mean"] == 1.0
    assert all(0.0 < r["is_weight_mean"] <= cfg.algorithm.tis_cap and r["is_weight_mean"] != 1.0 for r in records[1:])
    assert [r["staleness_max"] for r in records] == [0, 1, 1]
    torch.testing.assert_close(stack.engine_logprobs(), stack.learner_logprobs(), atol=LOGPROB_ATOL, rtol=0)


@pytest.mark.integration
def test_an_sft_stage_trains_the_real_learner_then_hands_over_to_grpo(stack, tmp_path):
    """sft.steps=2 on the generator's worked solutions, then a GRPO step, in one run: the NLL of the
    same four solutions falls from the first SFT step to the second, and the engines hold the
    learner's weights after the hand-off."""
    cfg = load_config(None, [*_overrides(stack.model), "train.steps=1", "eval.before_and_after=false",
                             "train.export_final_model=false", "sft.steps=2", "sft.questions_per_step=4",
                             "tasks.train_count=4"])
    result = Trainer(cfg, tmp_path / "run").train(actors=stack.fleet)
    assert result.steps_done == 3
    records = [r for r in (json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
               if "policy_version" in r]
    assert [r["stage"] for r in records] == ["sft", "sft", "grpo"]
    first, second = records[0], records[1]
    assert first["tokens"] == second["tokens"] > 0 and math.isfinite(first["nll"])
    assert second["nll"] < first["nll"]  # one step of imitation made the same trajectories likelier
    torch.testing.assert_close(stack.engine_logprobs(), stack.learner_logprobs(), atol=LOGPROB_ATOL, rtol=0)


@pytest.mark.integration
def test_a_teacher_is_sampled_by_a_real_engine_and_its_wrong_answers_filtered_out(stack, tmp_path):
    """sft.source=teacher: a temporary vLLM rollout worker samples the teacher (here the tiny random
    model), the verifier keeps only correct trajectories; with none correct the stage says so clearly
    before any step."""
    from innerloop.distributed.config import ConfigError

    cfg = load_config(None, [*_overrides(stack.model), "train.steps=1", "eval.before_and_after=false",
                             "sft.steps=1", "sft.source=teacher", f"sft.teacher={stack.model}",
                             "sft.teacher_samples=4", "sft.questions_per_step=4"])
    with pytest.raises(ConfigError, match="sft: the SFT stage found no trajectory the verifier accepts among 16 from sft.source=teacher"):
        Trainer(cfg, tmp_path / "run").train(actors=stack.fleet)
    assert not (tmp_path / "run" / "sft_trajectories.jsonl").exists() and not (tmp_path / "run" / "ledger.jsonl").exists()


@pytest.mark.integration
def test_the_probe_cadence_computes_curves_on_the_real_learner(stack, tmp_path):
    """probe.every_steps=1: rank 0 computes the answer's NLL after every 4th prefix of this step's
    trajectories, under the weights that sampled them; the last point equals a plain forward over
    prompt, whole trajectory and suffix on a transformers copy of those weights."""
    import ray
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from innerloop.learners.probe import suffix_tokens

    cfg = load_config(None, [*_overrides(stack.model), "train.steps=1", "eval.before_and_after=false",
                             "train.export_final_model=false", "probe.every_steps=1", "probe.questions=2",
                             "probe.samples=2", "probe.every=4", "probe.other_question=1"])
    weights = ray.get(stack.learner.full_state_dict.remote(), timeout=120)  # what step 0 samples and probes with
    with recording_generate(stack.fleet) as calls:
        Trainer(cfg, tmp_path / "run").train(actors=stack.fleet)
    lines = [json.loads(x) for x in (tmp_path / "run" / "probe" / "probe.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and all(line["label"] == "step-0" for line in lines)  # 2 x 2, then 1 control each
    controls = [line for line in lines if line["group"] == "other_question"]
    assert len(controls) == 2 and all(line["trajectory_of"] != line["question_id"] for line in controls)
    assert all(line["positions"][0] == 0 and line["positions"][-1] == line["completion_tokens"] for line in lines)
    assert all(math.isfinite(v) and v > 0 for line in lines for v in line["curve"])

    tokenizer = AutoTokenizer.from_pretrained(stack.model)
    model = AutoModelForCausalLM.from_pretrained(stack.model, dtype=torch.float32).eval()
    model.load_state_dict(weights, strict=False)  # the tied LM head follows the embeddings
    trajectory = next(t for t in calls[0].trajectories if t.question_id == lines[0]["question_id"])
    completion = list(trajectory.completion_ids)
    if completion and completion[-1] == tokenizer.eos_token_id:
        completion.pop()
    question = next(q for q in stack_questions(cfg) if q.question_id == trajectory.question_id)
    suffix, answer_len = suffix_tokens(tokenizer, cfg.probe.suffix, question.answer)
    ids = torch.tensor([list(trajectory.prompt_ids) + completion + suffix])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
    targets = ids[0, -answer_len:]
    expected = -logprobs[-answer_len:].gather(1, targets[:, None]).mean().item()
    assert lines[0]["completion_tokens"] == len(completion)
    assert lines[0]["curve"][-1] == pytest.approx(expected, abs=1e-4)


def stack_questions(cfg):
    from innerloop.distributed.run.questions import load_questions

    return load_questions(cfg.tasks)[0]


def _when(condition, action, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    action()


# ---------------------------------------------------------------- failures (these change the shared fleet)


def _kill_pid_when(condition, pid: int) -> threading.Thread:
    """A thread that SIGKILLs `pid` as soon as `condition()` holds: a process dying mid-phase."""
    thread = threading.Thread(target=_when, args=(condition, lambda: os.kill(pid, signal.SIGKILL)), daemon=True)
    thread.start()
    return thread


@pytest.mark.integration
def test_a_nonfinite_loss_skips_the_step_on_the_real_learner(stack):
    from dataclasses import replace

    from innerloop.distributed.run.questions import load_questions
    from innerloop.distributed.run.samples import build_samples, group_advantages, group_by_question, loss_normalizers

    questions = load_questions(stack.cfg.tasks)[0][: stack.cfg.rollout.questions_per_step]
    groups = group_by_question(stack.fleet.rollouts.generate(questions, stack.cfg.rollout.group_size))
    samples = build_samples(groups, group_advantages(groups, stack.cfg.algorithm), stack.cfg.algorithm)
    poisoned = [replace(s, advantage=float("nan")) if i == 0 else s for i, s in enumerate(samples)]
    before = stack.learner_logprobs()
    metrics = stack.fleet.update(poisoned, loss_normalizers(poisoned, stack.cfg.algorithm))
    assert metrics.skipped is True
    assert torch.equal(stack.learner_logprobs(), before)  # DeepSpeed skipped it: no weight moved
    metrics = stack.fleet.update(samples, loss_normalizers(samples, stack.cfg.algorithm))
    assert metrics.skipped is False and math.isfinite(metrics.sums.loss)
    assert not torch.equal(stack.learner_logprobs(), before)  # and the next good step applies


@pytest.mark.integration
def test_a_rollout_worker_killed_mid_generation_is_replaced_and_its_questions_redone(stack):
    import psutil
    import ray

    from innerloop.distributed.config import SamplingConfig
    from innerloop.distributed.run.questions import load_questions

    fleet = stack.fleet
    fleet.sync_weights(7)  # the version a replacement must come back with
    old = fleet.rollouts.workers[0]
    pid = ray.get(old.pid.remote())
    engine_processes = psutil.Process(pid).children(recursive=True)  # vLLM's engine core, the scorer
    assert engine_processes
    questions = load_questions(stack.cfg.tasks)[0][:24]
    long = SamplingConfig(temperature=1.0, max_tokens=400)  # long enough to be killed in the middle
    started = time.monotonic()
    _kill_pid_when(lambda: time.monotonic() - started > 1.5, pid)
    trajectories = fleet.rollouts.generate(questions, 4, sampling=long)

    assert [t.question_id for t in trajectories] == [q.question_id for q in questions for _ in range(4)]
    assert fleet.rollouts.workers[0] is not old
    events = fleet.rollouts.drain_events()
    assert [e["event"] for e in events] == ["rollout_worker_replaced"] and events[0]["policy_version"] == 7
    assert {t.policy_version for t in trajectories} == {7}
    _, alive = psutil.wait_procs(engine_processes, timeout=30)
    assert not alive, f"the killed worker's processes live on: {alive}"
    # The replacement generates with the learner's current weights, not the model folder's.
    torch.testing.assert_close(stack.engine_logprobs(), stack.learner_logprobs(), atol=LOGPROB_ATOL, rtol=0)


def _fail_a_bucket(worker, how: str) -> None:
    """In the worker's process: its second received bucket fails once, by an error or by the process
    dying (os._exit), while the learner is broadcasting."""
    import ray

    def patch(_):
        from innerloop.distributed.transfer import Group

        real, calls = Group.start_broadcast, []

        def failing(self, buffer):
            calls.append(1)
            if len(calls) == 2:
                Group.start_broadcast = real
                if how == "die":
                    os._exit(1)
                raise RuntimeError("injected: a bucket went missing")
            return real(self, buffer)

        Group.start_broadcast = failing

    ray.get(worker.__ray_call__.remote(patch), timeout=60)


def _perturbed_transfer_sync(stack, version: int) -> float:
    _perturb_learner(stack)
    stack.fleet.cfg.rollout.sync_bucket_mb = 0.25  # several buckets even for the tiny model
    return stack.fleet.sync_weights(version)


def _assert_every_engine_holds_the_learner_weights(stack, version: int) -> None:
    """Each engine's log-probs of the probe match the learner's (float32), tagged `version`."""
    import ray

    learner = stack.learner_logprobs()
    for worker in stack.fleet.rollouts.workers:
        engine = torch.tensor(ray.get(worker.sequence_logprobs.remote(stack.probe_ids), timeout=120),
                              dtype=torch.float64)
        torch.testing.assert_close(engine, learner, atol=LOGPROB_ATOL, rtol=0)
        assert ray.get(worker.__ray_call__.remote(lambda w: w.policy_version), timeout=60) == version


@pytest.mark.integration
def test_a_streamed_sync_reaches_two_engines_exactly(stack):
    """rollout.sync transfer (the default): one group, one broadcast per bucket to both engines; each
    ends with the learner's weights (float32) and the version; the object store carries no blob."""
    fleet = stack.fleet
    assert fleet.cfg.rollout.sync == "transfer"
    fleet.rollouts.resize(2)  # the newcomer gets the current weights by the object store
    try:
        _perturbed_transfer_sync(stack, 11)
        _assert_every_engine_holds_the_learner_weights(stack, 11)
        assert fleet.rollouts.weights.version == 11 and fleet.rollouts.weights._blob is None
    finally:
        fleet.rollouts.resize(1)
        fleet.rollouts.drain_events()


@pytest.mark.integration
@pytest.mark.parametrize("how", ["fail", "die"])
def test_a_worker_failing_mid_transfer_gets_the_weights_by_the_object_store(stack, how):
    """A bucket lost mid-transfer: a worker that survived reloads from the object store, a dead one is
    replaced; neither hangs the run (rollout.sync_timeout_s bounds the other ends' waits), and the next
    sync forms a new group."""
    fleet = stack.fleet
    fleet.cfg.rollout.sync_timeout_s = 5.0
    fleet._streamed.forget_group()  # the short timeout takes effect in a new group
    try:
        _perturbed_transfer_sync(stack, 12)  # forms the group
        _fail_a_bucket(stack.worker, how)
        old = stack.worker
        seconds = _perturbed_transfer_sync(stack, 13)
        events = fleet.rollouts.drain_events()
        assert fleet.rollouts.weights._blob is not None  # the fallback's blob
        if how == "die":
            assert stack.worker is not old
            assert [(e["event"], e["policy_version"]) for e in events] == [("rollout_worker_replaced", 13)]
        else:
            assert stack.worker is old and not events and seconds < 60
        torch.testing.assert_close(stack.engine_logprobs(), stack.learner_logprobs(), atol=LOGPROB_ATOL, rtol=0)
        _perturbed_transfer_sync(stack, 14)  # a new group, streamed again
        assert fleet.rollouts.weights._blob is None
        torch.testing.assert_close(stack.engine_logprobs(), stack.learner_logprobs(), atol=LOGPROB_ATOL, rtol=0)
    finally:
        fleet.cfg.rollout.sync_timeout_s = 60.0
        fleet._streamed.forget_group()


@pytest.mark.integration
def test_a_learner_killed_mid_run_restarts_from_the_last_checkpoint(stack, tmp_path):
    import ray

    cfg = load_config(None, [*_overrides(stack.model), "train.steps=4", "eval.before_and_after=false",
                             "train.export_final_model=false"])
    run_dir = tmp_path / "run"
    pid = ray.get(stack.learner.__ray_call__.remote(lambda learner: os.getpid()))
    old = stack.learner
    _kill_pid_when(lambda: (run_dir / "checkpoints" / "step-000002" / "manifest.json").exists(), pid)
    result = Trainer(cfg, run_dir).train(actors=stack.fleet)

    assert result.steps_done == 4
    assert stack.learner is not old
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    restarts = [r for r in records if r.get("event") == "learners_restarted"]
    assert len(restarts) == 1 and restarts[0]["step"] == 2
    assert [r["step"] for r in records if "event" not in r] == [1, 2, 3, 4]
    consumed = [q for line in (run_dir / "ledger.jsonl").read_text().splitlines() for q in json.loads(line)["questions"]]
    assert len(consumed) == len(set(consumed)) == 4 * cfg.rollout.questions_per_step
    # The engines sample with the restarted learners' weights.
    torch.testing.assert_close(stack.engine_logprobs(), stack.learner_logprobs(), atol=LOGPROB_ATOL, rtol=0)


@pytest.mark.integration
def test_mini_batches_clip_and_resume_exactly_with_the_kl_reference_at_the_sft_model(stack, tmp_path):
    """algorithm.mini_batches=2 with a KL term on the real DeepSpeed learner, after an SFT step: the
    reference is the SFT model (kl_reference start), the second mini-batch clips, and a checkpoint
    (which carries the reference) loaded by fresh learners makes bitwise the same next update."""
    import ray

    from innerloop.distributed.cluster.fleet import Fleet
    from innerloop.distributed.run.questions import load_questions
    from innerloop.distributed.run.samples import (build_samples, group_advantages, group_by_question,
                                                   loss_normalizers, sft_normalizer)

    cfg = load_config(None, [*_overrides(stack.model), "algorithm.mini_batches=2", "algorithm.kl_coef=0.1",
                             "algorithm.clip_low=0.01", "algorithm.clip_high=0.01", "learner.lr=1e-2"])
    assert cfg.algorithm.kl_reference == "start"
    questions = load_questions(cfg.tasks)[0][: 2 * cfg.rollout.questions_per_step]
    batches = []
    for part in (questions[: cfg.rollout.questions_per_step], questions[cfg.rollout.questions_per_step :]):
        groups = group_by_question(stack.fleet.rollouts.generate(part, cfg.rollout.group_size))
        batches.append(build_samples(groups, group_advantages(groups, cfg.algorithm), cfg.algorithm))
    sft_samples, first, second = batches[0], batches[0], batches[1]

    def weights(learner):  # runs in the actor
        return {k: v.detach().clone() for k, v in learner.engine.module.state_dict().items()}

    def reference(learner):
        return {k: v.detach().clone() for k, v in learner._reference.state_dict().items()}

    writer = Fleet.start(cfg, str(stack.model), rollout_workers=0)
    reader = None
    try:
        writer.sft_update(sft_samples, sft_normalizer(sft_samples, cfg.algorithm.aggregation))
        sft_model = ray.get(writer.learners[0].__ray_call__.remote(weights))
        grpo_first = writer.update(first, loss_normalizers(first, cfg.algorithm))
        held = ray.get(writer.learners[0].__ray_call__.remote(reference))
        assert held.keys() <= sft_model.keys() and all(torch.equal(held[k], sft_model[k]) for k in held)
        assert grpo_first.sums.clipped_tokens > 0 and grpo_first.sums.kl > 0  # the second mini-batch moved
        writer.save_learners(tmp_path / "deepspeed", "state")
        expected = writer.update(second, loss_normalizers(second, cfg.algorithm))

        reader = Fleet.start(cfg, str(stack.model), rollout_workers=0)
        reader.load_learners(tmp_path / "deepspeed", "state")
        restored = ray.get(reader.learners[0].__ray_call__.remote(reference))
        assert all(torch.equal(restored[k], held[k]) for k in held)
        got = reader.update(second, loss_normalizers(second, cfg.algorithm))
        assert got.sums == expected.sums and got.grad_norm == expected.grad_norm
        after_writer, after_reader = ray.get([f.learners[0].__ray_call__.remote(weights) for f in (writer, reader)])
        assert all(torch.equal(after_reader[k], after_writer[k]) for k in after_writer)
    finally:
        for fleet in (writer, reader):
            if fleet is not None:
                fleet.shutdown()



@pytest.mark.integration
def test_packed_token_budget_micro_batches_on_two_ranks_make_the_padded_update(stack):
    """learner.packing with a token budget, on two real ZeRO-2 ranks (each running as many micro-batches
    as the other, whatever its samples' lengths): the same loss and gradient norm as one rank's
    padded micro-batches of the same batch."""
    from innerloop.distributed.cluster.fleet import Fleet
    from innerloop.distributed.run.questions import load_questions
    from innerloop.distributed.run.samples import build_samples, group_advantages, group_by_question, loss_normalizers

    padded_cfg = load_config(None, _overrides(stack.model))
    packed_cfg = load_config(None, [*_overrides(stack.model), "learner.ranks=2", "learner.packing=true",
                                    "learner.max_tokens_per_micro_batch=96"])
    questions = load_questions(padded_cfg.tasks)[0][: padded_cfg.rollout.questions_per_step]
    groups = group_by_question(stack.fleet.rollouts.generate(questions, padded_cfg.rollout.group_size))
    samples = build_samples(groups, group_advantages(groups, padded_cfg.algorithm), padded_cfg.algorithm)
    normalizers = loss_normalizers(samples, padded_cfg.algorithm)
    padded = Fleet.start(padded_cfg, str(stack.model), rollout_workers=0)
    packed = Fleet.start(packed_cfg, str(stack.model), rollout_workers=0)
    try:
        want, got = padded.update(samples, normalizers), packed.update(samples, normalizers)
        assert got.sums.tokens == want.sums.tokens
        for key in ("loss", "grad_norm", "entropy"):
            assert got.record()[key] == pytest.approx(want.record()[key], rel=1e-5, abs=1e-7), key
        assert want.grad_norm > 0
        torch.testing.assert_close(stack.learner_logprobs(packed.learners[1]), stack.learner_logprobs(padded.learners[0]),
                                   atol=1e-4, rtol=0)
    finally:
        padded.shutdown()
        packed.shutdown()


@pytest.mark.integration
def test_a_two_way_tensor_parallel_engine_generates_and_every_shard_takes_the_streamed_sync(stack):
    """rollout.tensor_parallel=2 on this CPU (each shard on a core of its own): a pool of a 1-way and a
    2-way engine forms one transfer group of 1 + 1 + 2 ranks; both engines end the sync with the
    learner's weights (float32) and the version, and the 2-way engine samples real trajectories."""
    import ray

    fleet = stack.fleet
    fleet.cfg.rollout.tensor_parallel = 2
    try:
        fleet.rollouts.resize(2)  # the newcomer: a 2-way engine, given the current weights by the object store
    finally:
        fleet.cfg.rollout.tensor_parallel = 1
    try:
        wide = fleet.rollouts.workers[1]
        assert ray.get(wide.shards.remote(), timeout=60) == 2
        _perturbed_transfer_sync(stack, 21)
        _assert_every_engine_holds_the_learner_weights(stack, 21)
        from innerloop.distributed.records import Question

        rollout = ray.get(wide.generate.remote([Question("q", "What is 2 + 3?", "5")], 4), timeout=120)
        assert len(rollout.trajectories) == 4
        assert all(t.completion_ids and all(math.isfinite(p) for p in t.logprobs) for t in rollout.trajectories)
    finally:
        fleet.rollouts.resize(1)
        fleet.rollouts.drain_events()


@pytest.mark.integration
def test_lora_trains_the_adapter_syncs_merged_weights_and_resumes_exactly(stack, tmp_path):
    """learner.lora on the real DeepSpeed learner (ZeRO-2) with a KL term against the base: only the
    adapter moves; the engine takes the merged weights by the streamed sync and by the object store and
    then matches the learner's log-probs (float32); a checkpoint holds the adapter without the frozen base,
    and fresh learners loading it make bitwise the same next update; the exported folder is a merged
    model transformers loads, with the adapter in peft's format beside it."""
    import ray
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from innerloop.distributed.cluster.fleet import Fleet
    from innerloop.distributed.run.questions import load_questions
    from innerloop.distributed.run.samples import build_samples, group_advantages, group_by_question, loss_normalizers
    from innerloop.learners.logprobs import token_logprobs

    cfg = load_config(None, [*_overrides(stack.model), "learner.lora.rank=4", "learner.lora.alpha=16",
                             "algorithm.kl_coef=0.1", "algorithm.kl_reference=base", "learner.lr=1e-2"])
    questions = load_questions(cfg.tasks)[0][: 2 * cfg.rollout.questions_per_step]
    batches = []
    for part in (questions[: cfg.rollout.questions_per_step], questions[cfg.rollout.questions_per_step :]):
        groups = group_by_question(stack.fleet.rollouts.generate(part, cfg.rollout.group_size))
        batches.append(build_samples(groups, group_advantages(groups, cfg.algorithm), cfg.algorithm))

    def adapter(learner):  # runs in the actor: the trainable tensors, and whether the frozen ones moved
        from safetensors.torch import load_file

        module = learner.engine.module
        base = load_file(str(learner._model_path) + "/model.safetensors")
        frozen = {n.removeprefix("base_model.model.").replace(".base_layer", ""): p
                  for n, p in module.named_parameters() if not p.requires_grad}
        return ({n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad},
                all(torch.equal(frozen[n], base[n]) for n in base))

    def hf_logprobs(model) -> torch.Tensor:
        ids = torch.tensor([stack.probe_ids])
        with torch.no_grad():
            return token_logprobs(model(input_ids=ids).logits, ids)[0].double()

    writer = Fleet.start(cfg, str(stack.model), rollout_workers=0)
    reader = None
    try:
        before = stack.learner_logprobs(writer.learners[0])
        first = writer.update(batches[0], loss_normalizers(batches[0], cfg.algorithm))
        assert first.sums.kl == pytest.approx(0.0, abs=1e-9) and first.grad_norm > 0  # a fresh adapter is the base
        trained, base_kept = ray.get(writer.learners[0].__ray_call__.remote(adapter))
        assert base_kept and trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
        learner = stack.learner_logprobs(writer.learners[0])
        assert (learner - before).abs().max() > MOVED_AT_LEAST

        # The streamed sync of the merged weights, into the shared engine; then the object store's blob.
        writer._streamed.sync(writer.learners, stack.fleet.rollouts, 41, writer._learner_call, writer._publish)
        stack.fleet._streamed.forget_group()  # the engine left the shared learner's group for this one
        torch.testing.assert_close(stack.engine_logprobs(), learner, atol=LOGPROB_ATOL, rtol=0)
        blob = writer.learners[0].weights_blob.remote()
        ray.get(stack.worker.load_weights.remote(blob, 42), timeout=300)
        torch.testing.assert_close(stack.engine_logprobs(), learner, atol=LOGPROB_ATOL, rtol=0)

        writer.save_learners(tmp_path / "deepspeed", "state")
        writer.export(tmp_path / "model")
        model_file = stack.model / "model.safetensors"
        states = list((tmp_path / "deepspeed" / "state").glob("*model_states.pt"))
        assert states and all(f.stat().st_size < model_file.stat().st_size / 4 for f in states)  # no base inside
        expected = writer.update(batches[1], loss_normalizers(batches[1], cfg.algorithm))
        assert expected.sums.kl > 0

        reader = Fleet.start(cfg, str(stack.model), rollout_workers=0)
        reader.load_learners(tmp_path / "deepspeed", "state")
        got = reader.update(batches[1], loss_normalizers(batches[1], cfg.algorithm))
        assert got.sums == expected.sums and got.grad_norm == expected.grad_norm
        (after_writer, _), (after_reader, kept) = ray.get([f.learners[0].__ray_call__.remote(adapter)
                                                         for f in (writer, reader)])
        assert kept and after_reader.keys() == after_writer.keys()
        assert all(torch.equal(after_reader[k], after_writer[k]) for k in after_writer)

        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32)
        torch.testing.assert_close(hf_logprobs(merged), learner, atol=LOGPROB_ATOL, rtol=0)
        with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(stack.model, dtype=torch.float32),
                                                 str(tmp_path / "model" / "adapter"))
        torch.testing.assert_close(hf_logprobs(with_adapter), learner, atol=LOGPROB_ATOL, rtol=0)
    finally:
        for fleet in (writer, reader):
            if fleet is not None:
                fleet.shutdown()
        stack.fleet.sync_weights(43)  # the shared engine back on the shared learner's weights


@pytest.mark.integration
def test_lora_on_two_zero3_ranks_publishes_the_merged_weights_and_resumes_exactly(stack, tmp_path):
    """learner.lora with learner.zero_stage=3 on two ranks (every parameter partitioned, the frozen base
    too): the published blob and the exported folder are base + B @ A * alpha / r from the exported
    adapter (gathered, not the ranks' empty partitions), and fresh ranks resume bitwise."""
    import ray
    from safetensors.torch import load, load_file

    from innerloop.distributed.cluster.fleet import Fleet
    from innerloop.distributed.run.questions import load_questions
    from innerloop.distributed.run.samples import build_samples, group_advantages, group_by_question, loss_normalizers

    cfg = load_config(None, [*_overrides(stack.model), "learner.lora.rank=4", "learner.lora.alpha=8",
                             "learner.ranks=2", "learner.zero_stage=3", "learner.lr=1e-2"])
    questions = load_questions(cfg.tasks)[0][: cfg.rollout.questions_per_step]
    groups = group_by_question(stack.fleet.rollouts.generate(questions, cfg.rollout.group_size))
    samples = build_samples(groups, group_advantages(groups, cfg.algorithm), cfg.algorithm)
    normalizers = loss_normalizers(samples, cfg.algorithm)
    writer = Fleet.start(cfg, str(stack.model), rollout_workers=0)
    reader = None
    try:
        writer.update(samples, normalizers)
        blobs = ray.get([l.weights_blob.remote() for l in writer.learners], timeout=300)  # all ranks gather
        assert blobs[1] is None
        writer.export(tmp_path / "model")
        writer.save_learners(tmp_path / "deepspeed", "state")
        expected = writer.update(samples, normalizers)

        merged, exported = load(blobs[0]), load_file(tmp_path / "model" / "model.safetensors")
        adapter = load_file(tmp_path / "model" / "adapter" / "adapter_model.safetensors")
        base = load_file(stack.model / "model.safetensors")
        assert merged.keys() == exported.keys() == base.keys() - {"lm_head.weight"}
        moved = 0
        for name, weight in merged.items():
            stem = "base_model.model." + name.removesuffix(".weight")
            a = adapter.get(f"{stem}.lora_A.weight")
            want = base[name] if a is None else base[name] + adapter[f"{stem}.lora_B.weight"] @ a * (8 / 4)
            torch.testing.assert_close(weight, want, atol=1e-6, rtol=0)
            assert torch.equal(exported[name], weight)
            moved += a is not None and not torch.equal(weight, base[name])
        assert moved == 2 * 7  # every projection of both layers

        reader = Fleet.start(cfg, str(stack.model), rollout_workers=0)
        reader.load_learners(tmp_path / "deepspeed", "state")
        got = reader.update(samples, normalizers)
        assert got.sums == expected.sums and got.grad_norm == expected.grad_norm
    finally:
        for fleet in (writer, reader):
            if fleet is not None:
                fleet.shutdown()


# ---------------------------------------------------------------- the CLI (no Ray started)


def test_cli_train_refuses_a_run_dir_with_a_checkpoint_unless_resume(tmp_path, monkeypatch, capsys):
    started = []

    class FakeTrainer:
        def __init__(self, cfg, run_dir, address=None, resume=False):
            started.append((Path(run_dir), resume))

        def prepare(self):
            pass

        def train(self):
            return TrainResult(3, None, None, None, 0.0)

    monkeypatch.setattr(driver, "Trainer", FakeTrainer)
    # The fake trainer starts no Ray; the real _stop_ray would end the Ray of the shared stack.
    monkeypatch.setattr(cli, "_stop_ray", lambda: None)
    run = tmp_path / "run"
    (run / "checkpoints" / ".partial-step-000003").mkdir(parents=True)  # half-written: not a checkpoint
    assert cli.main(["train", "--run-dir", str(run), "--resume"]) == 2
    assert "holds no run (no config.yaml, no checkpoint)" in capsys.readouterr().err
    (run / "config.yaml").write_text("train:\n  steps: 3\n")  # a run that stopped before its first checkpoint
    assert cli.main(["train", "--run-dir", str(run), "--resume"]) == 0  # starts again from step 0
    assert started.pop() == (run, True)
    (run / "config.yaml").unlink()

    (run / "checkpoints" / "step-000002").mkdir()
    (run / "checkpoints" / "step-000002" / "state.json").write_text("{}")
    assert cli.main(["train", "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert "step-000002" in err and "--resume" in err
    assert started == []

    assert cli.main(["train", "--run-dir", str(run), "--resume"]) == 0
    assert started == [(run, True)]
    assert cli.main(["train", "--run-dir", str(tmp_path / "fresh")]) == 0
    assert started[-1] == (tmp_path / "fresh", False)
