"""`innerloop scale RUN_DIR`: ask a running job for another number of rollout workers and/or learner ranks.

The request is a file in the run directory (`RunDir.request_scale`); the driver applies it before
its next step (rollout workers: `RolloutPool.resize`; learner ranks: distributed/run/elastic.py).
Checked here, before anything is written: a process trains in that directory now, and each count
runs with the run's own config (learner ranks must split its batch evenly). Whether the cluster
can place them only the driver sees: a count it cannot place is refused there, logged as
`learner_ranks_refused` in metrics.jsonl, and the run goes on unchanged.
"""

from __future__ import annotations

from pathlib import Path

from innerloop.distributed.config import ConfigError


def request_scale(run_dir: str | Path, rollout_workers: int | None, learner_ranks: int | None) -> str:
    """Write the request; returns what to tell the user. Raises ConfigError on bad input."""
    from innerloop.distributed.config_load import load_config
    from innerloop.distributed.state.lock import RunLock
    from innerloop.distributed.state.tracking import RunDir

    if rollout_workers is None and learner_ranks is None:
        raise ConfigError("give --rollout-workers N, --learner-ranks N, or both")
    for flag, count in (("--rollout-workers", rollout_workers), ("--learner-ranks", learner_ranks)):
        if count is not None and count < 1:
            raise ConfigError(f"{flag} must be at least 1 (got {count})")
    folder = Path(run_dir)
    if not (folder / "config.yaml").is_file():
        raise ConfigError(f"{run_dir} is not a run directory (it has no config.yaml)")
    if RunLock(folder).holder() is None:
        raise ConfigError(f"no job is training in {run_dir} now (it holds no live lock), so nothing would apply "
                          "the request; start it again with `innerloop train --resume` and --set learner.ranks=N "
                          "or rollout.workers=N")
    cfg = load_config(folder / "config.yaml")
    if learner_ranks is not None:
        check_learner_ranks(cfg, learner_ranks)
    RunDir(folder).request_scale(rollout_workers, learner_ranks)
    asked = [f"{n} {what}" for n, what in ((rollout_workers, "rollout workers"), (learner_ranks, "learner ranks"))
             if n is not None]
    events = [e for n, e in ((rollout_workers, "rollout_workers_scaled"), (learner_ranks, "learner_ranks_scaled"))
              if n is not None]
    return (f"asked {run_dir} for {' and '.join(asked)}; the run applies it before its next step "
            f"(see {' and '.join(events)} in its metrics.jsonl)")


def check_learner_ranks(cfg, ranks: int) -> None:
    """Raise ConfigError unless the run's config holds with learner.ranks = `ranks`."""
    from pydantic import ValidationError

    from innerloop.distributed.config import Config

    if cfg.rollout.colocate:
        raise ConfigError("this run's rollout engines are colocated with its learner ranks (rollout.colocate), one "
                          "per GPU, so the learner ranks cannot change alone")
    raw = cfg.model_dump(mode="json")
    raw["learner"]["ranks"] = ranks
    try:
        Config.model_validate(raw)
    except ValidationError as exc:
        reasons = "; ".join(str(error["msg"]).removeprefix("Value error, ") for error in exc.errors())
        raise ConfigError(f"--learner-ranks {ranks} does not fit this run's config: {reasons}") from None
