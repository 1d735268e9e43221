"""The chaos soak's pure parts (scripts/chaos.py): the seeded fault schedule, the checks of a finished
run's records, and the wall time each fault cost. No Ray, no processes: unit-tested in tests/test_chaos.py.
"""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass

# Each kind, and what the soak does for it (scripts/chaos_faults.py).
KINDS = (
    "worker_mid_generate",  # SIGKILL a rollout worker while it generates
    "worker_mid_sync",      # SIGKILL a rollout worker while it receives weights
    "learner_killed",       # SIGKILL the learner rank while it updates
    "node_joined",          # a simulated node joins the cluster (a rollout worker starts on it)
    "node_left",            # and leaves it (that worker dies with it)
    "scale_up",             # `innerloop scale RUN --rollout-workers base+1`
    "scale_down",           # `innerloop scale RUN --rollout-workers base`
    "learners_grown",       # `innerloop scale RUN --learner-ranks 2`: checkpoint, restart as 2 ranks, reload
    "learners_shrunk",      # `innerloop scale RUN --learner-ranks 1`
    "driver_killed",        # SIGKILL the driver; the soak resumes it with `innerloop train --resume`
    "reward_hang",          # one completion's reward hangs past reward.timeout_s
    "nan_step",             # one group's rewards overflow float32: the step's loss is not finite
)
# A pool-changing fault and the one that undoes it form one episode, so the pool is back to its base
# size before the next fault (a resumed driver starts at the base size again).
PAIRS = {"node_joined": "node_left", "scale_up": "scale_down", "learners_grown": "learners_shrunk"}
SECOND = set(PAIRS.values())


@dataclass(frozen=True)
class Fault:
    step: int  # injected once the run has logged this step (or later, after the previous fault settled)
    kind: str


def plan(seed: int, steps: int, per_kind: int, first_step: int, spacing: int) -> list[Fault]:
    """A seeded, mixed schedule: every kind `per_kind` times, in a shuffled order, each fault at least
    `spacing` steps after the previous one (so each one's cost is measured alone), none before
    `first_step` (after the first checkpoint: a learner or driver death then has one to go back to),
    the last one with `spacing` steps left to recover in."""
    if per_kind < 1 or spacing < 1 or first_step < 0:
        raise ValueError("per_kind and spacing must be at least 1, first_step at least 0")
    episodes = [[kind] + ([PAIRS[kind]] if kind in PAIRS else []) for kind in KINDS if kind not in SECOND]
    episodes = [list(e) for e in episodes for _ in range(per_kind)]
    rng = random.Random(seed)
    rng.shuffle(episodes)
    faults = sum(len(e) for e in episodes)
    slack = steps - first_step - faults * spacing
    if slack < 0:
        raise ValueError(f"{steps} steps cannot hold {faults} faults {spacing} steps apart after step "
                         f"{first_step}: give at least {first_step + faults * spacing} steps, or fewer faults")
    # The slack goes into random extra gaps before the episodes, so the spacing varies with the seed.
    cuts = sorted(rng.randint(0, slack) for _ in episodes)
    extra = [b - a for a, b in zip([0, *cuts], cuts)]
    schedule, step = [], first_step
    for gap, episode in zip(extra, episodes):
        step += gap
        for kind in episode:
            schedule.append(Fault(step, kind))
            step += spacing
    return schedule


# ---------------------------------------------------------------- the checks of a finished run


def steps_problems(metrics: list[dict], steps: int) -> list[str]:
    """Every step 1..steps logged exactly once, each at policy version = its step, strictly increasing."""
    records = [r for r in metrics if "event" not in r]
    logged = [r["step"] for r in records]
    problems = []
    twice = sorted({s for s in logged if logged.count(s) > 1})
    if twice:
        problems.append(f"steps logged more than once: {twice[:10]}")
    missing = sorted(set(range(1, steps + 1)) - set(logged))
    if missing:
        problems.append(f"steps never logged: {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    versions = [r.get("policy_version") for r in sorted(records, key=lambda r: r["step"])]
    if any(v is None for v in versions):
        problems.append("a step record has no policy_version")
    elif any(b <= a for a, b in zip(versions, versions[1:])):
        problems.append("the policy version does not strictly increase from step to step")
    elif any(r["policy_version"] != r["step"] for r in records):
        problems.append("a step's policy version is not its step")
    return problems


def ledger_problems(ledger: list[dict], steps: int, expected: list[list[str]]) -> list[str]:
    """Every step's questions recorded once, and exactly the questions an uninterrupted run takes at that
    step (`expected`, the question stream replayed): none skipped, none repeated, none out of turn, so
    every question is consumed once per epoch however often the run went back."""
    problems = []
    logged = [r["step"] for r in ledger]
    if sorted(logged) != list(range(1, steps + 1)):
        problems.append(f"the ledger's steps are not 1..{steps} once each ({len(logged)} records)")
    wrong = [r["step"] for r in ledger if 1 <= r["step"] <= len(expected) and r["questions"] != expected[r["step"] - 1]]
    if wrong:
        problems.append(f"steps that did not consume the questions of their turn in the stream: {wrong[:10]}")
    return problems


def trajectory_problems(trajectories: list[dict], ledger: list[dict], group_size: int) -> list[str]:
    """No trajectory trained twice, none missing: each step trained one group of G trajectories of each
    question it consumed, sampled by the weights of the step before (synchronous)."""
    consumed = {(r["step"], q) for r in ledger for q in r["questions"]}
    problems, count = [], {}
    for t in trajectories:
        key = (t["step"], t["question_id"])
        count[key] = count.get(key, 0) + 1
        if key not in consumed:
            problems.append(f"a trajectory of {t['question_id']} trained in step {t['step']}, which did not "
                            "consume that question")
        elif t["policy_version"] != t["step"] - 1:
            problems.append(f"a trajectory of step {t['step']} was sampled at policy version {t['policy_version']}")
    wrong = {key: n for key, n in count.items() if n != group_size}
    if wrong:
        problems.append(f"(step, question)s trained on other than {group_size} trajectories: "
                        f"{dict(list(wrong.items())[:5])}")
    never = sorted(consumed - set(count))
    if never:
        problems.append(f"consumed questions with no trajectory trained: {never[:10]}")
    return problems[:20]


def memory_growth(samples: list[dict], warmup_steps: int) -> dict[str, dict]:
    """Per process ('role pid'): its peak RSS, and its growth once it is `warmup_steps` steps older than
    its first sample: the median RSS of the last third of its later samples less that of the first
    third. Medians, because RSS swings back and forth around a checkpoint or a weights blob (the learner
    by ~130 MiB for a sample or two); a leak moves the median. A process with fewer than 6 samples
    after its warm-up is not judged (no 'growth_mib')."""
    seen: dict[str, dict] = {}
    for sample in samples:
        for name, rss in sample["rss_mib"].items():
            entry = seen.setdefault(name, {"first_step": sample["step"], "peak_mib": rss, "warm": []})
            entry["peak_mib"] = max(entry["peak_mib"], rss)
            entry["end_mib"], entry["end_step"] = rss, sample["step"]
            if sample["step"] >= entry["first_step"] + warmup_steps:
                entry["warm"].append(rss)
    for entry in seen.values():
        warm = entry.pop("warm")
        if len(warm) >= 6:
            third = len(warm) // 3
            early, late = statistics.median(warm[:third]), statistics.median(warm[-third:])
            entry.update(warm_mib=early, late_mib=late, growth_mib=round(late - early, 1))
    return seen


def memory_problems(growth: dict[str, dict], bound_mib: float) -> list[str]:
    over = {name: e["growth_mib"] for name, e in growth.items() if e.get("growth_mib", 0.0) > bound_mib}
    return [f"{name} grew {mib:+.1f} MiB after its warm-up (bound {bound_mib:g})" for name, mib in over.items()]


# ---------------------------------------------------------------- what each fault cost


def step_times(records: list[dict]) -> dict[int, list[float]]:
    """Step -> the times a record of it was logged, in order (a redone step has several)."""
    times: dict[int, list[float]] = {}
    for r in records:
        if "event" not in r:
            times.setdefault(r["step"], []).append(r["time"])
    return {step: sorted(ts) for step, ts in times.items()}


def normal_step_seconds(final: list[dict], fired: list[dict], window: int) -> float:
    """The median interval between consecutive steps that no fault's window touched."""
    times = {r["step"]: r["time"] for r in final if "event" not in r}
    touched = {f["last_step"] + i for f in fired for i in range(1, window + 1)}
    intervals = [times[s] - times[s - 1] for s in times if s - 1 in times and s not in touched]
    return statistics.median(intervals) if intervals else 0.0


def lost_seconds(fired: dict, everything: list[dict], final: list[dict], window: int, normal: float) -> float | None:
    """Wall time a fault cost: from the last step logged before it to the step `window` steps later (as the
    finished run has it), less `window` normal steps and the checkpoints written in between. None when the
    run never got that far."""
    before = [t for t in step_times(everything).get(fired["last_step"], []) if t <= fired["time"]]
    after = {r["step"]: r["time"] for r in final if "event" not in r}
    target = fired["last_step"] + window
    if target not in after:
        return None
    start = before[-1] if before else fired["time"]
    saving = sum(r.get("seconds", 0.0) for r in final if r.get("event") == "checkpoint"
                 and fired["last_step"] < r["step"] < target and r["time"] > start)
    return round(after[target] - start - window * normal - saving, 2)


def last_step_before(everything: list[dict], when: float) -> int:
    """The newest step any record (kept or superseded) had logged by `when`; 0 before the first."""
    return max((r["step"] for r in everything if "event" not in r and r["time"] <= when), default=0)


def lost_by_kind(fired: list[dict], everything: list[dict], final: list[dict], window: int) -> dict[str, dict]:
    """Kind -> how many fired, and the seconds lost each time, with their mean and the total.
    `fired`: {kind, time}; `everything`: every step record ever logged, the superseded ones too."""
    fired = [{**f, "last_step": last_step_before(everything, f["time"])} for f in fired]
    normal = normal_step_seconds(final, fired, window)
    table: dict[str, dict] = {}
    for fault in fired:
        entry = table.setdefault(fault["kind"], {"count": 0, "lost_s": []})
        entry["count"] += 1
        lost = lost_seconds(fault, everything, final, window, normal)
        if lost is not None:
            entry["lost_s"].append(lost)
    for entry in table.values():
        entry["mean_s"] = round(statistics.mean(entry["lost_s"]), 2) if entry["lost_s"] else None
        entry["total_s"] = round(sum(entry["lost_s"]), 2)
    return {"normal_step_s": round(normal, 3), "window_steps": window, "kinds": table}
