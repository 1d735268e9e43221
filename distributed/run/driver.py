"""The driver: sets up the actors and runs the GRPO step loop.

One step, as the algorithm reads: take questions; roll out G trajectories each (scored by the
rollout workers); group advantages; update the policy; push the new weights to every rollout
engine; log; checkpoint on cadence.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from innerloop.distributed.cluster import fleet, teacher
from innerloop.distributed.config import Config, ConfigError
from innerloop.distributed.errors import RunStopped
from innerloop.distributed.lens import accuracy, history, sampled_eval
from innerloop.distributed.records import UpdateMetrics
from innerloop.distributed.run import elastic, sft_stage
from innerloop.distributed.run.prefetch import Prefetch, staleness_bound
from innerloop.distributed.run.progress import StepDisplay
from innerloop.distributed.run.checks import CheckedInputs, check_run
from innerloop.distributed.run.health import StepWatch
from innerloop.distributed.run.questions import QuestionStream
from innerloop.distributed.run.samples import (build_samples, group_advantages, group_by_question, loss_normalizers,
                                               sft_normalizer)
from innerloop.distributed.run.sft_stage import SftSchedule
from innerloop.distributed.run.step_record import PhaseTimer, RolloutSummary, StepRecord
from innerloop.distributed.run.stopping import StopOnTerm
from innerloop.distributed.state import checkpoints
from innerloop.distributed.state.model_prep import resolve_model
from innerloop.distributed.state.tracking import RunDir

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class TrainResult:
    steps_done: int
    accuracy_before: float | None
    accuracy_after: float | None
    final_model: Path | None
    seconds: float
    stopped: bool = False  # by SIGTERM, after saving its last step
    lenient_before: float | None = None  # lenient held-out accuracy (lens/accuracy.py)
    lenient_after: float | None = None


def _result(step: int, before: "accuracy.EvalOutcome | None", after: "accuracy.EvalOutcome | None",
            final: Path | None, started: float, stopped: bool = False) -> TrainResult:
    def strict(o): return None if o is None else o.strict_accuracy
    def lenient(o): return None if o is None else o.lenient_accuracy
    return TrainResult(step, strict(before), strict(after), final, time.perf_counter() - started, stopped,
                       lenient(before), lenient(after))


class NonFiniteSteps(RunStopped):
    """Too many steps had a NaN/inf loss or gradient; their data is saved under bad_steps/."""


class Trainer:
    def __init__(self, cfg: Config, run_dir: str | Path, address: str | None = None, resume: bool = False):
        self.cfg = cfg
        self._run_dir = Path(run_dir)
        self.run: RunDir | None = None  # made once every start-up check has passed
        self._address = address
        self._resume = resume
        self._nonfinite_steps = 0
        self._last_metric: float | None = None  # train.best_metric's latest value, for best checkpoints
        self._inputs: CheckedInputs | None = None
        self._stop = StopOnTerm(cfg.train.stop_grace_s)
        self._watch = StepWatch(cfg)
        self._snapshot: elastic.Snapshot | None = None  # the learners' state after the last step (learner_snapshot)
        self._logged_step = 0  # the last step logged: what a dead rank costs is counted from it

    def prepare(self) -> None:
        """Every start-up check, then the run directory's lock; nothing is written to it before both
        pass. `train` calls it; the CLI calls it first, so these checks' messages reach the terminal."""
        if self._inputs is None:
            inputs = check_run(self.cfg)
            self.run = RunDir(self._run_dir)
            self.run.lock.acquire()
            self._inputs = inputs

    def train(self, actors: "fleet.Fleet | None" = None) -> TrainResult:
        """Run the steps. `actors`: an already-started fleet to train with (the integration tests share
        one across runs); the caller keeps it and shuts it down. Default: start one, shut it down after."""
        started = time.perf_counter()
        self.prepare()
        cfg, run, inputs = self.cfg, self.run, self._inputs
        log.info("%d training and %d held-out questions", len(inputs.train), len(inputs.held_out))
        try:
            self._sft = self._sft_schedule(inputs.train, inputs.model_path)  # before the fleet: a teacher needs memory
            run.write_config(cfg)
            run.start_trackers(cfg)  # tracking.backends, given the resolved config
            owned = actors is None
            if owned:
                actors = fleet.Fleet.start(cfg, inputs.model_path, self._address)
            try:
                actors.watchdog.dump_dir = run.stacks
                with self._stop:  # after Ray's start: ray.init sets a SIGTERM handler of its own
                    return self._train(actors, inputs, started)
            finally:
                if owned:
                    actors.shutdown()
        finally:
            run.close()

    def _train(self, actors: "fleet.Fleet", inputs: CheckedInputs, started: float) -> TrainResult:
        cfg, run = self.cfg, self.run
        start_step, stream = self._restore(actors, inputs.train, self._resume)
        before = after = final = None
        if cfg.eval.before_and_after and start_step == 0:
            before = self._evaluate(actors, inputs.held_out, start_step, "before")
        step = self._loop_with_recovery(actors, inputs.train, start_step, stream, started, inputs.held_out)
        if self._stop.requested:  # SIGTERM: the last step is saved; evaluating and exporting would not fit
            run.log({"event": "stopped", "reason": "SIGTERM", "seconds": time.perf_counter() - started}, step)
            return _result(step, before, None, None, started, stopped=True)
        if cfg.eval.before_and_after:
            after = self._evaluate(actors, inputs.held_out, step, "after")
        final = self._export(actors, step)
        result = _result(step, before, after, final, started)
        run.log({"event": "done", "seconds": result.seconds,
                 "accuracy_before": result.accuracy_before, "accuracy_after": result.accuracy_after}, step)
        run.track_outputs(final)  # the final model (and report) to the trackers, the run marked finished
        return result

    def _restore(self, actors: "fleet.Fleet", train_questions, from_checkpoint: bool) -> tuple[int, QuestionStream]:
        """Where the run goes on from: the newest checkpoint that verifies, or the start.

        The run's records are rewound to that step, so every step is logged, and every question
        consumed (ledger.jsonl), exactly once however often the run stopped.
        """
        latest = checkpoints.latest_good(self.run.checkpoints) if from_checkpoint else None
        if latest is None:
            self.run.rewind(0 if from_checkpoint else None)
            # The engines start from the learners' weights, tagged version 0: restarted learners hold
            # the initial weights again, and a fleet handed in may have trained before.
            actors.sync_weights(0)
            self._nonfinite_steps = 0
            return 0, QuestionStream(train_questions, self.cfg.train.seed)
        return self._continue_from(actors, train_questions, checkpoints.load(latest, actors), str(latest))

    def _continue_from(self, actors: "fleet.Fleet", train_questions, state: checkpoints.DriverState,
                       source: str) -> tuple[int, QuestionStream]:
        """Go on from `state` (the learners already hold its step): weights out, the driver's RNG,
        watchdog history and counters back, the run's records rewound to its step."""
        actors.sync_weights(state.policy_version)
        if state.rng.get("python"):
            random.setstate(_as_random_state(state.rng["python"]))
        actors.watchdog.load_state(state.extra.get("watchdog", {}))
        self._nonfinite_steps = int(state.extra.get("nonfinite_steps", 0))
        dropped = self.run.rewind(state.step)
        if state.config_fingerprint != self.cfg.fingerprint():
            log.warning("the config differs from the one %s was written with", source)
        log.info("resumed from %s at step %d (%d records of later steps superseded)", source, state.step, dropped)
        return state.step, QuestionStream(train_questions, self.cfg.train.seed, state.question_position)

    def _loop_with_recovery(self, actors: "fleet.Fleet", train_questions, step: int, stream: QuestionStream,
                            started: float, eval_questions) -> int:
        """The step loop; a dead learner rank restarts every rank from the in-memory snapshot or the
        last checkpoint, a bounded number of times (recovery.max_learner_restarts)."""
        limit, restarts = self.cfg.recovery.max_learner_restarts, 0
        while True:
            try:
                return self._loop(actors, stream, step, started, eval_questions)
            except fleet.LearnerLost as exc:
                if restarts >= limit:
                    raise RunStopped(
                        f"{exc}. The learners were already restarted {restarts} times in this run "
                        f"(recovery.max_learner_restarts={limit}); stopping. The last checkpoint is intact: "
                        "look at the learner logs above, then continue with --resume.") from None
                restarts += 1
                log.warning("%s; restarting the learners (%d of %d)", exc, restarts, limit)
                step, stream, event = self._recover_learners(actors, train_questions)
                self.run.log({"event": "learners_restarted", "reason": str(exc), "restarts": restarts, **event}, step)

    def _recover_learners(self, actors: "fleet.Fleet", train_questions) -> tuple[int, QuestionStream, dict]:
        """Fresh ranks from the snapshot of the last step, else from the last checkpoint."""
        started, lost_at = time.perf_counter(), self._logged_step
        actors.restart_learners()
        unusable = elastic.restore_snapshot(actors, self._snapshot)
        if unusable is None:
            step, stream = self._continue_from(actors, train_questions, self._snapshot.state,
                                               f"the in-memory snapshot of step {self._snapshot.state.step}")
        else:
            if self.cfg.recovery.learner_snapshot:
                log.warning("%s: restoring the last checkpoint instead", unusable)
            step, stream = self._restore(actors, train_questions, from_checkpoint=True)
        return step, stream, {"restored_from": "snapshot" if unusable is None else "checkpoint",
                              "steps_lost": lost_at - step, "seconds": round(time.perf_counter() - started, 2)}

    def _loop(self, actors: "fleet.Fleet", stream: QuestionStream, start_step: int, started: float,
              eval_questions) -> int:
        cfg = self.cfg
        step, last = start_step, cfg.total_steps
        ahead = Prefetch(actors.rollouts, stream, cfg, self._step_seed, first_step=max(start_step, cfg.sft.steps))
        with StepDisplay(total=last, done=start_step) as display:
            while step < last and not self._out_of_time(started) and not self._stop.requested:
                if step < cfg.sft.steps:  # the SFT stage first; GRPO takes over by itself after it
                    question_ids, trajectories, result = self._sft_step(actors, step)
                else:
                    self._adjust_pool(actors, step, ahead)
                    questions, call = ahead.next()                             # take questions
                    trajectories, result = self._step(actors, questions, call, step)
                    question_ids = [q.question_id for q in questions]
                step += 1
                record = result.record()                                       # log
                if cfg.recovery.learner_snapshot:  # the learners' state now, in host memory
                    self._snapshot = None  # first: two copies at once would double what it costs
                    state = self._driver_state(actors, step, ahead.trained_position())
                    self._snapshot = elastic.take_snapshot(actors, state)
                    record["time_snapshot"] = round(self._snapshot.seconds, 3)
                self.run.log(record, step)
                self._logged_step = step
                self.run.record_questions(step, question_ids)
                self.run.record_trajectories(step, step - 1, trajectories)
                self._log_events(actors, step)
                self._note_metric(record)
                self._watch.after_step(record)
                display.update(step, record)
                if cfg.eval.every and step % cfg.eval.every == 0 and step < last:
                    self._evaluate(actors, eval_questions, step, f"step_{step}")
                if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
                    self._checkpoint(actors, step, ahead.trained_position())   # checkpoint
        ahead.finish_submitted()  # nothing left running on the workers, and the last weights arrived
        actors.rollouts.check_loads()
        if step > start_step and not (cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0):
            self._checkpoint(actors, step, ahead.trained_position())  # the last step is always saved
        return step

    def _step(self, actors: "fleet.Fleet", questions, call, step: int) -> tuple[list, StepRecord]:
        """One step on a submitted generation: wait for it, group advantages, update, weights out."""
        cfg, timer = self.cfg, PhaseTimer()
        with timer("generate"):                                                  # roll out and score
            trajectories = actors.rollouts.collect(call)
        if cfg.probe.every_steps and step % cfg.probe.every_steps == 0:
            with timer("probe"):  # under the weights that sampled them (the learner's, before its update)
                self._probe(actors, questions, trajectories, step)
        groups = group_by_question(trajectories)
        advantages = group_advantages(groups, cfg.algorithm)                     # advantages, within groups
        samples = build_samples(groups, advantages, cfg.algorithm, seed=self._step_seed(step), learner_version=step)
        with timer("update"):                                                    # update the policy
            update = actors.update(samples, loss_normalizers(samples, cfg.algorithm))
        if update.skipped:
            self._skipped_step(step + 1, trajectories, samples, update)
        with timer("sync"):                                                      # weights out, versioned
            actors.sync_weights(step + 1, wait=staleness_bound(cfg) == 0)
        rollout = RolloutSummary(groups, timer.seconds["generate"], actors.rollouts.score_seconds, step)
        return trajectories, StepRecord(update, timer.record(), policy_version=step + 1, rollout=rollout)

    def _probe(self, actors: "fleet.Fleet", questions, trajectories, step: int) -> None:
        """The inner-loop curves of a few of this step's trajectories, into run_dir/probe/."""
        from innerloop.distributed.lens.probe import probe_metrics, write_probe

        cfg = self.cfg.probe
        records = actors.probe(pick_for_probe(trajectories, questions, cfg.questions, cfg.samples),
                               questions[: cfg.questions], cfg.suffix, cfg.every, cfg.other_question)
        write_probe(records, self.run.path / "probe", label=f"step-{step}")
        # each group's means; correct - incorrect and correct - control, paired within questions
        self.run.log({"event": "probe", "trajectories": len(records), **probe_metrics(records)}, step)

    def _sft_schedule(self, train_questions, model_path: str) -> "SftSchedule | None":
        """The SFT stage's batches, or None when the run has no SFT stage left to take."""
        cfg = self.cfg
        if not cfg.sft.steps:
            return None
        from transformers import AutoTokenizer

        def sample_teacher(questions, samples_per_question):
            return teacher.sample_with_teacher(cfg, resolve_model(cfg.sft.teacher), questions, samples_per_question,
                                               self._address)

        try:
            items = sft_stage.prepare_set(cfg, train_questions, self.run.path, sample_teacher)
            return sft_stage.SftSchedule(items, cfg, AutoTokenizer.from_pretrained(model_path))
        except (ValueError, FileNotFoundError) as exc:  # a bad file, nothing correct: the user's fix
            raise ConfigError(f"sft: {exc}") from None

    def _sft_step(self, actors: "fleet.Fleet", step: int) -> tuple[list[str], list, StepRecord]:
        """One SFT step: the negative log-likelihood of verified trajectories, then weights out."""
        timer = PhaseTimer()
        question_ids, samples = self._sft.batch(step)
        with timer("update"):
            update = actors.sft_update(samples, sft_normalizer(samples, self.cfg.algorithm.aggregation))
        if update.skipped:
            self._skipped_step(step + 1, [], samples, update)
        with timer("sync"):  # every step: evals, checkpoints and the hand-off to GRPO see current weights
            actors.sync_weights(step + 1)
        return question_ids, [], StepRecord(update, timer.record(), policy_version=step + 1, sft_samples=len(samples))

    def _step_seed(self, step: int) -> int:
        """The sampling seed of a step: fixed by the run's seed and the step, whatever ran before."""
        return random.Random(f"{self.cfg.train.seed}-{step}").getrandbits(31)

    def _skipped_step(self, step: int, trajectories, samples, update: UpdateMetrics) -> None:
        """A NaN/inf loss or gradient: the learners skipped the step. Save its data; stop after too many."""
        self._nonfinite_steps += 1
        saved = save_bad_step(self.run.bad_steps, step, trajectories, samples, update)
        limit = self.cfg.recovery.max_nonfinite_steps
        log.warning("step %d skipped: the loss or gradient was not finite (%d of at most %d); its data is in %s",
                    step, self._nonfinite_steps, limit, saved)
        if self._nonfinite_steps >= limit:
            raise NonFiniteSteps(
                f"{self._nonfinite_steps} steps had a NaN or inf loss or gradient (recovery.max_nonfinite_steps="
                f"{limit}); stopping. Their trajectories and samples are in {self.run.bad_steps}. Common causes: "
                "rewards too large or not finite, learner.lr too high; the last checkpoint is intact.")

    def _adjust_pool(self, actors: "fleet.Fleet", step: int, ahead: "Prefetch") -> None:
        """Before a step: apply rollout.worker_schedule, then `innerloop scale RUN_DIR --rollout-workers N`,
        and grow onto nodes that joined the cluster (rollout.max_workers). Generations already
        submitted finish first."""
        request, first = self.run.take_scale_request(), step == ahead.first_step
        count = request.rollout_workers or scheduled_pool(self.cfg.rollout.worker_schedule, step, first=first)
        if count is not None and count != len(actors.rollouts.workers):
            ahead.finish_submitted()
            actors.rollouts.resize(count)
        ranks = request.learner_ranks or scheduled_pool(self.cfg.learner.rank_schedule, step, first=first)
        if ranks is not None and ranks != actors.learner_ranks:  # checkpoint, restart as `ranks`, reload
            ahead.finish_submitted()
            self.run.log(elastic.resize(self.cfg, actors, self.run.checkpoints, step, ranks,
                                        lambda: self._checkpoint(actors, step, ahead.trained_position())), step)
        if self.cfg.rollout.max_workers:
            actors.rollouts.grow_onto_new_nodes(self.cfg.rollout.max_workers)
        self._log_events(actors, step)

    def _log_events(self, actors: "fleet.Fleet", step: int) -> None:
        for event in actors.rollouts.drain_events():
            self.run.log(event, step)

    def _note_metric(self, record: dict) -> None:
        value = record.get(self.cfg.train.best_metric)
        if isinstance(value, (int, float)) and math.isfinite(value):
            self._last_metric = float(value)

    def _out_of_time(self, started: float) -> bool:
        limit = self.cfg.train.max_minutes
        return bool(limit) and time.perf_counter() - started > limit * 60

    def _evaluate(self, actors: "fleet.Fleet", questions, step: int, label: str) -> accuracy.EvalOutcome:
        trajectories = actors.rollouts.generate(questions, 1, sampling=self.cfg.eval)
        # strict: the verifier's; lenient: or the last number is right, boxed or not (lens/accuracy.py)
        outcome = accuracy.score_eval(trajectories, {q.question_id: q.answer for q in questions})
        record = {"event": f"eval_{label}", "eval_accuracy": outcome.strict_accuracy,
                  "eval_lenient_accuracy": outcome.lenient_accuracy, "eval_formatted": outcome.formatted_share,
                  "eval_questions": len(questions)}
        sampled = self._sampled_eval(actors, questions, label)
        if sampled is not None:  # Pass@k beside strict and lenient (eval.sampled)
            record.update(sampled.record())
        self.run.log(record, step)
        accuracy.append_eval_questions(self.run.path, step, record["event"], outcome)  # for paired tests
        if sampled is not None:
            sampled_eval.append_sampled_questions(self.run.path, step, record["event"], sampled)
        self._note_metric(record)
        log.info("held-out accuracy %s training: %.1f%% strict, %.1f%% lenient (%d questions, %.1f%% formatted)",
                 label, 100 * outcome.strict_accuracy, 100 * outcome.lenient_accuracy, len(questions),
                 100 * outcome.formatted_share)
        if sampled is not None:
            log.info("held-out %s", sampled_eval.format_sampled(sampled, self.cfg.eval.sampled.temperature))
        return outcome

    def _sampled_eval(self, actors: "fleet.Fleet", questions, label: str) -> "sampled_eval.SampledOutcome | None":
        """n samples per question at T > 0 on the first eval.sampled.questions, where in_training asks."""
        cfg = self.cfg.eval.sampled
        wanted = {"after": ("after",), "before_and_after": ("before", "after")}.get(cfg.in_training, ())
        if not cfg.samples or label not in wanted:
            return None
        chosen = questions[: cfg.questions] if cfg.questions else questions
        # A fixed seed: every cell and seed of a sweep samples its evals the same way (paired draws).
        trajectories = actors.rollouts.generate(chosen, cfg.samples, sampling=cfg.sampling(self.cfg.eval), seed=0,
                                                phase="eval_sampled")  # its own deadline: n times an eval's work
        return sampled_eval.score_sampled(trajectories, {q.question_id: q.answer for q in chosen}, cfg.pass_k)

    def _driver_state(self, actors: "fleet.Fleet", step: int, question_position: int) -> checkpoints.DriverState:
        return checkpoints.DriverState(
            step=step, policy_version=step, question_position=question_position,
            config_fingerprint=self.cfg.fingerprint(), rng={"python": random.getstate()},
            metric=self._last_metric,
            extra={"watchdog": actors.watchdog.state(), "nonfinite_steps": self._nonfinite_steps,
                   "learner_ranks": actors.learner_ranks})

    def _checkpoint(self, actors: "fleet.Fleet", step: int, question_position: int) -> None:
        state = self._driver_state(actors, step, question_position)
        train, started = self.cfg.train, time.perf_counter()
        path = checkpoints.save(self.run.checkpoints, state, actors, keep=train.keep_checkpoints,
                                keep_best=train.keep_best, best_mode=train.best_mode,
                                extra_files=history.checkpoint_files(self.run.read_trajectories()))
        seconds = time.perf_counter() - started
        self.run.log({"event": "checkpoint", "path": path.name, "seconds": round(seconds, 2)}, step)
        log.info("checkpoint written in %.1f s: %s", seconds, path)

    def _export(self, actors: "fleet.Fleet", step: int) -> Path | None:
        if not self.cfg.train.export_final_model:
            return None
        saved = checkpoints.saved_model(self.run.checkpoints, step)
        if saved is not None:  # the last step's checkpoint already holds this model: copy, don't re-gather
            shutil.copytree(saved, self.run.final_model, dirs_exist_ok=True)
        else:
            actors.export(self.run.final_model)
        log.info("final model (step %d) exported to %s", step, self.run.final_model)
        return self.run.final_model


def scheduled_pool(schedule: dict[int, int], step: int, first: bool) -> int | None:
    """The pool size rollout.worker_schedule sets before `step`: its entry for that step, or, on a
    run's first step (a resume lands between entries), the latest entry at or before it."""
    if not first:
        return schedule.get(step)
    due = [at for at in schedule if at <= step]
    return schedule[max(due)] if due else None


def pick_for_probe(trajectories, questions, question_count: int, per_question: int) -> list:
    """The first `per_question` trajectories of each of the first `question_count` questions."""
    wanted = {q.question_id: per_question for q in questions[:question_count]}
    picked = []
    for t in trajectories:
        if wanted.get(t.question_id, 0) > 0:
            wanted[t.question_id] -= 1
            picked.append(t)
    return picked


def save_bad_step(folder: Path, step: int, trajectories, samples, update: UpdateMetrics) -> Path:
    """One skipped step's trajectories, advantages and update metrics, as JSON lines, for inspection."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:06d}.jsonl"
    lines = [json.dumps({"update": update.record()}, default=str)]
    lines += [json.dumps({"trajectory": asdict(t), "advantage": s.advantage}, default=str)
              for t, s in zip(trajectories, samples)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _as_random_state(saved) -> tuple:
    """random.getstate() comes back from JSON as nested lists; setstate wants tuples."""
    version, internal, gauss = saved
    return version, tuple(internal), gauss
