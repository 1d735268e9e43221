"""The DeepSpeed learner: one data-parallel rank of the policy update.

This is DeepSpeed's one home in innerloop. The learner is advantage-blind: it receives training
samples with one number per sample and a global loss normalizer, and returns its metric sums
(`records.UpdateMetrics`) that the driver adds up over ranks. A plain class;
`innerloop.distributed.cluster.placement` makes it a Ray actor.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import shutil
import time
from collections import deque
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import torch

from innerloop.distributed.config import AlgorithmConfig, LearnerConfig
from innerloop.distributed.records import NllSums, PolicySums, TrainingSample, UpdateMetrics
from innerloop.distributed.stacks import StackLocation, install_stack_dump
from innerloop.distributed.transfer import Group, GroupAddress, WireMeta, send_buckets
from innerloop.learners import grpo, lora, snapshot_files, update_steps
from innerloop.learners.safe_load import refuse_unsafe_files, weights_only_loads
from innerloop.learners.weight_ipc import ColocatedWeights
from innerloop.learners.host_memory import return_freed_memory
from innerloop.learners.logprobs import token_logprobs

log = logging.getLogger(__name__)
SNAPSHOT_TAG = "snapshot"


class Learner(ColocatedWeights):
    def __init__(self, model_path: str, dtype: str, learner: LearnerConfig, algorithm: AlgorithmConfig,
                 temperature: float, rank: int, world_size: int, master_addr: str, master_port: int, seed: int):
        self.rank, self.world_size = rank, world_size
        self._location = install_stack_dump()
        self._temperature = temperature or 1.0  # the sampler's temperature: log-probs of logits / T
        self._cfg, self._algo = learner, algorithm
        torch.set_num_threads(learner.threads or max(1, (os.cpu_count() or 1) // world_size))
        torch.manual_seed(seed)
        self._init_process_group(master_addr, master_port)
        self._model_path = model_path
        self._dtype = getattr(torch, dtype)
        self.engine = self._build_engine(model_path)
        # kl_reference start: made at the first GRPO update (after any SFT stage), or from a checkpoint.
        pinned = algorithm.kl_coef > 0 and algorithm.kl_reference == "base"
        self._reference = self._base_reference() if pinned else None
        self._tokenizer = None  # loaded on the first probe
        pad = self.engine.module.config.pad_token_id
        self._pad_id = pad if pad is not None else 0

    def _init_process_group(self, master_addr: str, master_port: int) -> None:
        import deepspeed

        # Ray gives each GPU actor its own CUDA_VISIBLE_DEVICES, so the local device is always 0.
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
                          WORLD_SIZE=str(self.world_size), LOCAL_RANK="0")
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)

    def _load_model(self, model_path: str):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=self._dtype)
        model.config.use_cache = False  # no KV cache in training; it only costs memory
        attention = getattr(model.config, "_attn_implementation", None) or "eager"
        if self._cfg.packing and "flash" not in attention and self.rank == 0:
            # Without a variable-length kernel the packed row's attention is one dense [L, L] block.
            log.warning("learner.packing with %s attention computes attention across the whole packed row "
                        "(no variable-length kernel): on a CPU it measured 0.53x the padded update's speed and "
                        "more memory (docs/performance.md). Packing pays with flash-attention on GPUs; here "
                        "learner.max_tokens_per_micro_batch without packing is the faster way to cut padding.",
                        attention)
        return model

    def _build_engine(self, model_path: str):
        import deepspeed

        model = self._load_model(model_path)
        if self._cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self._cfg.lora is not None:  # only the adapter trains: the optimizer holds its parameters alone
            model = lora.wrap(model, self._cfg.lora)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                          config=self._deepspeed_config(bucket_elements(model, self._cfg)),
                                          lr_scheduler=self._schedule)
        return engine

    def _deepspeed_config(self, bucket: int) -> dict:
        cfg = self._cfg
        return {
            "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
            # Set per update from the batch; DeepSpeed needs a value at start.
            "gradient_accumulation_steps": 1,
            "gradient_clipping": cfg.grad_clip,
            "bf16": {"enabled": self._dtype == torch.bfloat16},
            # Buckets sized from the model (`bucket_elements`), not DeepSpeed's 5e8 elements.
            "zero_optimization": {"stage": cfg.zero_stage, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket,
                                  "stage3_prefetch_bucket_size": bucket},
            "optimizer": {"type": "AdamW", "params": {
                "lr": cfg.lr, "betas": list(cfg.betas), "weight_decay": cfg.weight_decay,
                "torch_adam": True, **({"fused": True} if cfg.fused_optimizer else {})}},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }

    def _schedule(self, optimizer):
        # Linear warm-up that starts above zero (DeepSpeed's WarmupLR spends step 1 at lr 0), then flat.
        warmup = self._cfg.warmup_steps
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (warmup + 1)))

    def location(self) -> StackLocation:
        """(Ray node id, pid): where the driver sends a stack-dump signal if a phase stalls."""
        return self._location

    # ---- the update -------------------------------------------------------------------------

    def update(self, samples: list[TrainingSample], normalizers: grpo.LossNormalizers) -> UpdateMetrics:
        """algorithm.mini_batches x algorithm.epochs optimizer steps on this rank's share of `samples`
        (the whole step's batch); old and reference log-probs fixed before the first when there are
        several (learners/grpo.py, departure 10).

        `normalizers` are counts over the whole batch, so the losses of all ranks and micro-batches
        sum to the full-batch loss. Returns this rank's metric sums (the driver adds ranks together).
        """
        started, algo, timings = time.perf_counter(), self._algo, {}
        if self._reference is None and algo.kl_coef > 0:  # kl_reference start: the weights GRPO starts from
            self._reference = self._snapshot_reference()
        parts = self._plan(samples, algo.mini_batches)
        fixed = [None] * len(parts)
        if algo.optimizer_steps > 1:
            self.engine.train()  # the mode the steps' forwards run in
            fixed = update_steps.fix_logprobs(self.engine, self._reference, parts, self._temperature, self.engine.device,
                                              self._cfg.packing)
        steps = []
        for _ in range(algo.epochs):
            for part, part_fixed in zip(parts, fixed):
                loss = functools.partial(self._policy_loss, normalizers=normalizers, fixed=part_fixed, timings=timings)
                steps.append(self._step(part, loss, gradient_scale=len(parts)))
        return_freed_memory()  # inside update_seconds: what it costs is the update's
        metrics = self._metrics(steps, algo.epochs, PolicySums, started)
        return replace(metrics, reference_seconds=timings.get("reference", 0.0))  # inside update_seconds; 0 without KL

    def _policy_loss(self, index: int, batch, normalizers, fixed, timings: dict[str, float]):
        return update_steps.policy_loss(self.engine, self._reference, batch, normalizers, self._algo, self._temperature,
                                        None if fixed is None else fixed[index], timings, self._cfg.packing)

    def sft_update(self, samples: list[TrainingSample], normalizer: float) -> UpdateMetrics:
        """One optimizer step of supervised fine-tuning: the negative log-likelihood of the samples'
        loss-mask tokens (the trajectory to imitate), under the policy GRPO trains (logits / the
        sampler's temperature), aggregated by `algorithm.aggregation`.

        `normalizer`: `samples.sft_normalizer(whole batch, algorithm.aggregation)`. Returns this rank's
        metric sums like `update` (loss, nll, tokens).
        """
        started = time.perf_counter()
        (part,) = self._plan(samples, 1)
        step = self._step(part, lambda index, batch: update_steps.nll_loss(
            self.engine, batch, normalizer, self._algo.aggregation, self._temperature, self._cfg.packing))
        return_freed_memory()
        return self._metrics([step], 1, NllSums, started)

    def _plan(self, samples: list[TrainingSample], mini_batches: int):
        return update_steps.plan(samples, mini_batches, self.rank, self.world_size, self._cfg, self._pad_id)

    def _step(self, part, micro_batch_loss, gradient_scale: float = 1.0) -> update_steps.StepResult:
        try:
            return update_steps.optimizer_step(self.engine, part, micro_batch_loss, world_size=self.world_size,
                                               nominal_micro_batch=self._cfg.micro_batch_size,
                                               gradient_scale=gradient_scale)
        except FloatingPointError as exc:
            raise FloatingPointError(f"learner rank {self.rank}, ZeRO stage {self._cfg.zero_stage}: {exc}") from None

    @staticmethod
    def _metrics(steps: list[update_steps.StepResult], epochs: int, sums_type, started: float) -> UpdateMetrics:
        sums, grad_norm = update_steps.combine(steps, epochs)
        return UpdateMetrics(sums_type(**sums), grad_norm, steps[0].learning_rate, time.perf_counter() - started,
                             skipped=not all(s.applied for s in steps))

    def _base_reference(self):
        """The base model, frozen: with LoRA the policy itself with its adapter off (no second copy)."""
        if self._cfg.lora is not None:
            return lora.AdapterDisabled(self.engine.module)
        return _frozen(self._load_model(self._model_path).to(self.engine.device))

    def _snapshot_reference(self):
        """The KL reference as the policy is now (the model GRPO starts from), frozen, on every rank.
        With LoRA, an adapter still at its start (no SFT stage before) is the base model: no copy."""
        if self._cfg.lora is not None and lora.adapter_untrained(self.engine.module):
            return lora.AdapterDisabled(self.engine.module)
        model = self._load_model(self._model_path)  # the policy's architecture and weight tying
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, tensor in self._named_weights():
                params[name].copy_(tensor)
        return _frozen(model.to(self.engine.device))

    @torch.no_grad()
    def probe(self, trajectories: list, questions: list, suffix_template: str, every: int,
              other_question: int = 0) -> list | None:
        """Inner-loop curves (learners/probe.py) of these trajectories under this rank's current
        weights; rank 0 answers, the others return None. The next update switches back to training."""
        if self.rank != 0:
            return None
        from transformers import AutoTokenizer

        from innerloop.learners.probe import control_items, items_from_trajectories, probe_trajectories

        if self._tokenizer is None:
            self._tokenizer = AutoTokenizer.from_pretrained(self._model_path)
        items = items_from_trajectories(trajectories, questions, end_ids=[self._tokenizer.eos_token_id])
        items += control_items(items, other_question)
        self.engine.eval()
        return probe_trajectories(self.engine.module, self._tokenizer, items, suffix_template, every)

    @torch.no_grad()
    def sequence_logprobs(self, token_ids: list[int]) -> list[float]:
        """The learner's log-prob of each token of a fixed sequence given its prefix (first is 0)."""
        ids = torch.tensor([token_ids], device=self.engine.device)
        self.engine.eval()
        logits = self.engine(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        return token_logprobs(logits, ids)[0].tolist()

    def _reference_from(self, state: dict[str, torch.Tensor]):
        model = self._load_model(self._model_path)
        model.load_state_dict(state)
        return _frozen(model.to(self.engine.device))

    # ---- weights out ------------------------------------------------------------------------

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Every rank must call this (ZeRO-3 gathers collectively); rank 0 gets the tensors."""
        import deepspeed

        module = self.engine.module
        if self._cfg.lora is not None:  # the merged weights under the base model's names
            if self.rank != 0:
                if self._cfg.zero_stage == 3:
                    deque(self._named_weights(), maxlen=0)  # the gathers rank 0 needs
                return None
            return {name: t.detach().to(self._dtype).contiguous().clone() for name, t in self._named_weights()}
        params = list(module.parameters()) if self._cfg.zero_stage == 3 else []
        with deepspeed.zero.GatheredParameters(params, enabled=bool(params)):
            if self.rank != 0:
                return None
            seen, out = set(), {}
            for name, tensor in module.state_dict().items():
                # Tied weights (embeddings and LM head) share storage; the engine re-ties them.
                if tensor.data_ptr() in seen:
                    continue
                seen.add(tensor.data_ptr())
                out[name] = tensor.detach().to(self._dtype).contiguous().clone()
            return out

    def weights_blob(self) -> bytes | None:
        """The current weights as one safetensors blob (rank 0), for the rollout engines."""
        from safetensors.torch import save

        state = self.full_state_dict()
        return None if state is None else save(state)

    def _named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, full tensor) of every parameter, in one order on every rank, tied weights once. Under
        ZeRO-3 all ranks walk it to the end: each parameter gathered by all, one at a time. With LoRA:
        the merged weights under the base model's names (learners/lora.py)."""
        import deepspeed

        if self._cfg.lora is not None:
            zero3 = self._cfg.zero_stage == 3
            yield from lora.merged_weights(self.engine.module,
                                           lambda params: deepspeed.zero.GatheredParameters(params, enabled=zero3))
            return
        for name, param in self.engine.module.named_parameters():
            with deepspeed.zero.GatheredParameters([param], enabled=self._cfg.zero_stage == 3):
                yield name, param.data

    def weights_meta(self) -> WireMeta:
        """What a streamed sync sends, in order, in the model's dtype (no gathering needed)."""
        if self._cfg.lora is not None:
            return WireMeta.of_parameters(lora.base_shapes(self.engine.module), self._dtype)
        return WireMeta.of_parameters(self.engine.module.named_parameters(), self._dtype)

    def open_weight_stream(self, address: GroupAddress) -> None:
        """Rank 0 hosts the transfer group the rollout engines join (returns once all have)."""
        self.close_weight_stream()
        if self.rank == 0:
            self._stream = (Group(address, 0), self.weights_meta())

    def stream_weights(self) -> float:
        """Every rank calls this together (ZeRO-3 gathers each parameter collectively); rank 0
        broadcasts them bucket by bucket. Returns seconds; raises, with the group dropped, if a
        member failed (the rest of the walk still ran, so no rank is left in a collective)."""
        started, stream = time.perf_counter(), getattr(self, "_stream", None)
        if self.rank != 0:
            deque(self._named_weights(), maxlen=0)  # walked to the end: the gathers rank 0 needs
            return time.perf_counter() - started
        if stream is None:
            raise RuntimeError("no transfer group: open_weight_stream first")
        group, meta = stream
        error = send_buckets(group, self._named_weights(), meta, group.address.bucket_bytes, self.engine.device)
        if error is not None:
            self.close_weight_stream()
            raise RuntimeError(f"the streamed weight sync failed: {error}") from error
        return time.perf_counter() - started

    def close_weight_stream(self) -> None:
        if (stream := getattr(self, "_stream", None)) is not None:
            stream[0].close()
        self._stream = None

    def export(self, folder: str) -> None:
        """Write a Hugging Face folder (weights, config, tokenizer) that transformers and vLLM load.
        With LoRA: the merged model, and the adapter alone in `adapter/` (peft's format)."""
        import deepspeed
        from transformers import AutoTokenizer

        module, zero3 = self.engine.module, self._cfg.zero_stage == 3
        adapter = None if self._cfg.lora is None else lora.adapter_state(  # every rank: ZeRO-3 gathers together
            module, lambda params: deepspeed.zero.GatheredParameters(params, enabled=zero3))
        state = self.full_state_dict()
        if state is None:
            return
        path = Path(folder)
        path.mkdir(parents=True, exist_ok=True)
        if adapter is not None:
            lora.save_adapter(module, path / lora.ADAPTER_FOLDER, self._model_path, adapter)
            module = module.get_base_model()
        module.save_pretrained(path, state_dict=state, safe_serialization=True)
        AutoTokenizer.from_pretrained(self._model_path).save_pretrained(path)

    # ---- checkpoints ------------------------------------------------------------------------

    def _load_resharded(self, folder: Path, tag: str):
        """Rank 0 converts the checkpoint to the universal format beside it; every rank loads that."""
        import torch.distributed as dist

        # Beside the run's checkpoints (shared by all nodes), never inside one: its manifest stays true.
        universal = folder.parent.parent / f".universal-{folder.parent.name}"
        if self.rank == 0:
            _convert_to_universal(folder / tag, universal / tag)
        dist.barrier()
        self.engine._config.load_universal_checkpoint = True
        try:
            loaded = self.engine.load_checkpoint(str(universal), tag=tag, load_module_strict=self._cfg.lora is None)
        finally:
            self.engine._config.load_universal_checkpoint = False
        dist.barrier()
        if self.rank == 0:
            shutil.rmtree(universal, ignore_errors=True)
        return loaded

    def save_checkpoint(self, folder: str, tag: str) -> None:
        # The RNG states ride along, so a resumed rank draws what the uninterrupted one would have.
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        client_state = {"innerloop_rng": rng}
        if isinstance(self._reference, lora.AdapterDisabled):  # the base model: nothing to save
            client_state["innerloop_reference_base"] = True
        elif self._reference is not None and self._algo.kl_reference == "start":
            # The model GRPO started from (after SFT): no file on disk holds it once checkpoints rotate.
            client_state["innerloop_reference"] = {k: v.detach().clone() for k, v in self._reference.state_dict().items()}
        # With LoRA the frozen base weights stay out: the model folder holds them; the adapter and its
        # optimizer state are what the checkpoint carries.
        self.engine.save_checkpoint(folder, tag=tag, client_state=client_state,
                                    exclude_frozen_parameters=self._cfg.lora is not None)

    def snapshot(self) -> tuple[int, dict[str, bytes]]:
        """This rank's whole state (model, optimizer, LR schedule, RNG) as the files of a DeepSpeed
        checkpoint, in bytes (learners/snapshot_files.py). Every rank calls it together. Two returns:
        its size in bytes, which the driver reads, and the files, which it only keeps."""
        with snapshot_files.scratch_folder() as folder:
            self.save_checkpoint(str(folder), SNAPSHOT_TAG)
            files = snapshot_files.read_files(folder)
        return sum(len(data) for data in files.values()), files

    def restore_snapshot(self, *ranks_files: dict[str, bytes]) -> None:
        """Load a snapshot the same number of ranks took: rank 0's files (the model state), then this
        rank's own (its optimizer partition); every rank calls it together."""
        with snapshot_files.scratch_folder() as folder:
            for files in ranks_files:
                snapshot_files.write_files(files, folder)
            self.load_checkpoint(str(folder), SNAPSHOT_TAG)

    def load_checkpoint(self, folder: str, tag: str, saved_world_size: int | None = None) -> None:
        """Restore model, optimizer, LR schedule and RNG. A checkpoint written by a different number
        of ranks is first converted to DeepSpeed's rank-independent universal format.

        Nothing but tensors and plain data is ever unpickled (see `weights_only_loads`)."""
        allowed = _deepspeed_state_types()
        refuse_unsafe_files(Path(folder) / tag, allowed)
        with weights_only_loads(allowed):
            if saved_world_size in (None, self.world_size):
                # With LoRA the checkpoint holds the adapter alone (the base comes from the model folder).
                path, client_state = self.engine.load_checkpoint(folder, tag=tag,
                                                                 load_module_strict=self._cfg.lora is None)
            else:
                path, client_state = self._load_resharded(Path(folder), tag)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint '{tag}' under {folder}")
        client_state = client_state or {}
        if self._algo.kl_coef > 0 and self._algo.kl_reference == "start":
            # Saved before GRPO began (an SFT-stage checkpoint): made at the first GRPO update instead.
            reference = client_state.get("innerloop_reference")
            self._reference = None if reference is None else self._reference_from(reference)
            if client_state.get("innerloop_reference_base"):
                self._reference = self._base_reference()
        rng = client_state.get("innerloop_rng")
        if rng:
            torch.set_rng_state(rng["torch"])
            random.setstate(rng["python"])


def _deepspeed_state_types() -> list:
    """The only non-data types in DeepSpeed's own state files (ZeRO optimizer state: a loss scaler even
    under bf16, the stage enum, fragment addresses); measured on stages 0-3 and universal files."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def bucket_elements(model, cfg: LearnerConfig) -> int:
    """DeepSpeed's reduce and all-gather bucket, in elements: learner.bucket_elements, or the model's
    largest parameter (a bucket then holds at least one whole gradient) rounded up to whole MiB-counts of
    elements (DeepSpeed needs an even count), never more than DeepSpeed's own 5e8."""
    if cfg.bucket_elements is not None:
        return cfg.bucket_elements
    largest = max(p.numel() for p in model.parameters())
    return min(-(-largest // 2**20) * 2**20, 500_000_000)


def _frozen(model):
    """A model for no-grad forwards only (the KL reference)."""
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def _convert_to_universal(source: Path, target: Path) -> None:
    """DeepSpeed's own converter: ZeRO partitions -> one file per parameter, for any world size."""
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    shutil.rmtree(target.parent, ignore_errors=True)
    ds_to_universal.main(argparse.Namespace(
        input_folder=str(source), output_folder=str(target), num_extract_workers=1, num_merge_workers=1,
        keep_temp_folder=False, strict=True, inject_missing_state=True))
