"""Config sections for what users bring from other trainers: experiment trackers, and LoRA adapters."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from innerloop.distributed.config_base import Section

TRACKERS = ("tensorboard", "mlflow", "wandb")


class TrackingConfig(Section):
    # Where step metrics, the config, events and the final artifacts go besides metrics.jsonl (always
    # written). mlflow and wandb are optional extras: `pip install 'innerloop[mlflow]'` / `[wandb]`.
    backends: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(default_factory=lambda: ["tensorboard"])
    project: str = "innerloop"  # MLflow's experiment, W&B's project
    run_name: str | None = None  # null: the run directory's name
    mlflow_uri: str | None = None  # null: a local store in run_dir/mlruns (or MLFLOW_TRACKING_URI)
    wandb_mode: Literal["online", "offline"] = "offline"  # offline: run files in run_dir/wandb, `wandb sync` later
    # The final model folder as an artifact of the tracker run at the end. MLflow copies it into its
    # store (run_dir/mlruns by default: a second copy of the model); W&B uploads it from final_model/ at sync.
    log_final_model: bool = True

    @field_validator("backends")
    @classmethod
    def _distinct(cls, backends: list[str]) -> list[str]:
        if len(set(backends)) != len(backends):
            raise ValueError(f"tracking.backends {backends} names a backend twice; list each of {list(TRACKERS)} once")
        return backends


class LoraConfig(Section):
    # LoRA through peft (learners/lora.py): only the adapter trains; the rollout engines get the merged
    # weights W + B @ A * alpha / rank. rank: the adapter's inner width r; alpha: its scale's numerator.
    rank: int = Field(16, ge=1)
    alpha: float = Field(32.0, gt=0.0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)  # on the adapter's input, in training forwards only
    # Linear layers by name as peft matches them ("q_proj", "self_attn.q_proj"); checked against the model
    # at start. null: every Linear layer but the output head (a Llama's attention and MLP projections).
    target_modules: list[str] | None = Field(None, min_length=1)
