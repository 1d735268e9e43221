"""The run directory and what is written into it: resolved config, metrics (JSONL and TensorBoard).

run_dir/
  config.yaml          the resolved config (defaults, file and overrides merged)
  metrics.jsonl        one JSON object per step, plus the eval records
  tensorboard/         event files for `tensorboard --logdir run_dir`
  checkpoints/step-N/  model (Hugging Face folder), DeepSpeed state, driver state
  final_model/         the exported Hugging Face folder
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import yaml

from innerloop.distributed.config import Config


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path).resolve()
        self.path.mkdir(parents=True, exist_ok=True)
        self.checkpoints = self.path / "checkpoints"
        self.final_model = self.path / "final_model"
        self.metrics_file = self.path / "metrics.jsonl"
        self._writer = None

    def write_config(self, cfg: Config) -> None:
        text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
        (self.path / "config.yaml").write_text(f"# resolved config, fingerprint {cfg.fingerprint()}\n{text}")

    def log(self, record: dict[str, Any], step: int) -> None:
        """Append one record to metrics.jsonl and mirror its numbers to TensorBoard."""
        record = {"step": step, "time": round(time.time(), 3), **record}
        with self.metrics_file.open("a") as handle:
            handle.write(json.dumps(record, default=_plain) + "\n")
        writer = self._tensorboard()
        for key, value in record.items():
            if key not in ("step", "time") and isinstance(value, (int, float)) and math.isfinite(value):
                writer.add_scalar(key, value, step)
        writer.flush()

    def _tensorboard(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.path / "tensorboard"))
        return self._writer

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_file.exists():
            return []
        return [json.loads(line) for line in self.metrics_file.read_text().splitlines() if line.strip()]

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)
