"""Test doubles for the integration tests (never used by the product)."""

from __future__ import annotations

from innerloop.distributed.records import NllSums, PolicySums, UpdateMetrics


def length_reward(completion: str, question) -> float:
    """A reward a random tiny model can earn: more digits, more reward. It gives groups variance,
    so a step on a random model still moves the weights."""
    return float(sum(ch.isdigit() for ch in completion)) / 4.0


class FakeFleet:
    """Stands in for `Fleet`, and for its rollout pool (`rollouts` is the fake itself), so the driver's
    recovery logic runs in milliseconds, without Ray.

    `lose_learner_at` / `nonfinite_at`: the update calls (1-based, counted over the fleet's life)
    at which a learner rank "dies" or the loss comes back NaN. Its "weights" are the number of
    updates applied, which checkpoints save and restore like real learner state.
    """

    def __init__(self, cfg, lose_learner_at=(), nonfinite_at=()):
        from innerloop.distributed.cluster.watchdog import Watchdog

        self.watchdog = Watchdog(cfg.watchdog, dump_dir=None)
        self.lose_learner_at, self.nonfinite_at = set(lose_learner_at), set(nonfinite_at)
        self.update_calls, self.applied, self.restarts = 0, 0, 0
        self.synced: list[int] = []
        self.engine_version = 0  # the weights version the (fake) engines hold
        self.sft_batches: list[int] = []  # samples per SFT update
        self.probed: list[int] = []  # trajectories per probe call
        self.staleness: list[list[int]] = []  # per update: the staleness values its samples carried
        self.seeds: list[int | None] = []
        self.score_seconds = 0.0
        self.workers = ["worker-0"]
        self.learner_ranks = cfg.learner.ranks
        self.rollouts = self
        self.on_update = None  # called after each update: a test's hook into the middle of a run

    def generate(self, questions, samples_per_question, sampling=None, seed=None, phase=None):
        return self.collect(self.submit(questions, samples_per_question, sampling, seed, phase))

    def submit(self, questions, samples_per_question, sampling=None, seed=None, phase=None):
        """Generates at once, with the weights version synced last (a real worker's queue order)."""
        from innerloop.distributed.records import Trajectory

        self.seeds.append(seed)
        return [Trajectory(q.question_id, (1, 2), (3, 4), (-0.5, -0.5), "stop", "text", reward=float(i % 2),
                           correct=bool(i % 2), formatted=True, policy_version=self.engine_version)
                for q in questions for i in range(samples_per_question)]

    def collect(self, call):
        return call

    def update(self, samples, normalizers):
        from innerloop.distributed.cluster.fleet import LearnerLost

        self.update_calls += 1
        self.staleness.append(sorted({sample.staleness for sample in samples}))
        if self.update_calls in self.lose_learner_at:
            raise LearnerLost("a learner rank died during the policy update: (test double)")
        if self.on_update:
            self.on_update(self.update_calls)
        skipped = self.update_calls in self.nonfinite_at
        self.applied += 0 if skipped else 1
        loss = float("nan") if skipped else 0.5
        sums = PolicySums(loss, loss, 0.0, 0.0, 0.0, 4.0, 4.0, 4.0, 0.0)
        return UpdateMetrics(sums, grad_norm=1.0, learning_rate=1e-5, update_seconds=0.0, skipped=skipped,
                             reference_seconds=0.0)

    def sft_update(self, samples, normalizer):
        self.update_calls += 1
        self.sft_batches.append(len(samples))
        self.applied += 1
        return UpdateMetrics(NllSums(1.0, 1.0, float(normalizer)), grad_norm=1.0, learning_rate=1e-5,
                             update_seconds=0.0, skipped=False)

    def probe(self, trajectories, questions, suffix_template, every, other_question=0):
        """Falling curves for correct trajectories, flat ones otherwise (what the paper reports)."""
        from innerloop.learners.probe import CORRECT, INCORRECT, ProbeRecord
        from innerloop.learners.probe_summary import attribute, summarize_curve

        self.probed.append(len(trajectories))
        records = []
        for t in trajectories:
            positions = tuple(range(0, len(t.completion_ids) + 1, every)) or (0,)
            curve = tuple(3.0 - (i if t.correct else 0) for i in range(len(positions)))
            records.append(ProbeRecord(t.question_id, t.correct, len(t.completion_ids), positions, curve,
                                       summarize_curve(positions, curve, len(t.completion_ids)),
                                       attribute(positions, curve, ()), CORRECT if t.correct else INCORRECT))
        return records

    def sync_weights(self, version, wait=True):
        self.synced.append(version)
        self.engine_version = version

    def save_learners(self, folder, tag):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{tag}.txt").write_text(str(self.applied))

    def load_learners(self, folder, tag, saved_ranks=None):
        self.applied = int((folder / f"{tag}.txt").read_text())

    def export(self, folder):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text("{}")

    def restart_learners(self):
        self.restarts += 1
        self.applied = 0

    def resize(self, count):
        self.workers = [f"worker-{i}" for i in range(count)]

    def check_loads(self, phase="sync"):
        pass

    def grow_onto_new_nodes(self, max_workers):
        pass

    def drain_events(self):
        return []

    def shutdown(self):
        pass
