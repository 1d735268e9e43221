"""`innerloop eval`: held-out accuracy of a model folder or checkpoint, with one in-process rollout worker."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from innerloop.distributed import checkpoints
from innerloop.distributed.config import Config
from innerloop.distributed.model_prep import resolve_model
from innerloop.distributed.questions import load_questions


@dataclass(frozen=True)
class EvalReport:
    questions: int
    correct: int
    formatted: float

    @property
    def accuracy(self) -> float:
        return self.correct / max(1, self.questions)


def evaluate_model(cfg: Config, model: str) -> EvalReport:
    from innerloop.actors.rollout import RolloutWorker

    path = Path(model)
    model_path = resolve_model(str(checkpoints.model_folder(path)) if path.exists() else model)
    _, held_out = load_questions(cfg.tasks)
    # No Ray needed for one engine: the role class runs in-process.
    worker = RolloutWorker(model_path, cfg.model.dtype, cfg.rollout, cfg.reward, cfg.tasks.system_prompt,
                           cfg.tasks.prompt_template, cfg.train.seed)
    try:
        trajectories = worker.generate(held_out, 1, sampling=cfg.eval).trajectories
    finally:
        worker.close()
    n = max(1, len(trajectories))
    return EvalReport(len(trajectories), sum(t.correct for t in trajectories),
                      sum(t.formatted for t in trajectories) / n)
