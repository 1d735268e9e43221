"""Benchmarks on this machine: innerloop's parts against their peers, alternated in one session.

    .venv/bin/python scripts/bench.py rollout   # our rollout worker vs batched Hugging Face generate
    .venv/bin/python scripts/bench.py rollout_vllm   # our rollout worker vs bare vLLM, same engine settings
    .venv/bin/python scripts/bench.py rollout_tp     # a 1-way engine vs a 2-way tensor-parallel one
    .venv/bin/python scripts/bench.py learner   # our DeepSpeed update vs a bare PyTorch loop, same tokens
    .venv/bin/python scripts/bench.py sync      # weight-sync time against model size
    .venv/bin/python scripts/bench.py step      # our GRPO step phase by phase, each process's peak memory

Every comparison runs its two sides one after the other, `--reps` times, in one process, and
reports medians and their ratio: these machines are noisy, so only ratios measured side by side
mean much. Results go to runs/bench/<name>.json and a table is printed. docs/performance.md holds
the figures and the machine they were measured on.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # tests.tiny_model, for the smallest model of the sync benchmark


def main() -> int:
    args = _parser().parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = BENCHES[args.bench](args)
    result["command"] = " ".join(["scripts/bench.py", *sys.argv[1:]])
    result["machine"] = _machine(args)
    (out / f"{args.bench}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bench", choices=sorted(BENCHES))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8, help="steps of the `step` benchmark")
    parser.add_argument("--kl-coef", type=float, default=0.0, help="`step`: > 0 adds the reference model")
    parser.add_argument("--gpu", action="store_true",
                        help="one GPU shared by the learner and the rollout engine (needs the gpu extra)")
    parser.add_argument("--model", help="model.name for rollout and learner benches (default: the demo's); "
                        "a size of scripts' LLAMA_SIZES, e.g. 0.5B, builds that random Llama")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                        help="`step`: a config override, e.g. model.dtype=float32 on CPUs without bf16")
    parser.add_argument("--out", default="runs/bench")
    return parser


# One GPU, colocated: learner and engine share it (two processes on one GPU cannot form an NCCL
# group, so the weights go by CUDA IPC); the engine's KV cache takes a third of its memory.
GPU_OVERRIDES = ["learner.gpus_per_rank=1", "rollout.colocate=true", "rollout.kv_cache_gib=null",
                 "rollout.memory_fraction=0.3", "rollout.enforce_eager=false"]


def _overrides(args) -> list[str]:
    return GPU_OVERRIDES if args.gpu else []


def _device(args) -> str:
    return "cuda" if args.gpu else "cpu"


def _machine(args) -> dict:
    import platform

    import psutil
    import torch

    machine = {"cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
               "processor": platform.processor() or platform.machine(), "python": platform.python_version()}
    if args.gpu:
        machine["gpu"] = torch.cuda.get_device_name(0)
    return machine


def _median_runs(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def _model_override(args) -> list[str]:
    """model.name for --model: a size of LLAMA_SIZES builds that random Llama; anything else is a name."""
    if not args.model:
        return []
    return [f"model.name={llama_model(args.model) if args.model in LLAMA_SIZES else args.model}"]


def _demo_setup(args, extra: list[str] = ()):
    from innerloop.distributed.config_load import load_config
    from innerloop.distributed.state.model_prep import resolve_model
    from innerloop.distributed.run.questions import load_questions

    cfg = load_config(None, [f"rollout.max_tokens={args.max_tokens}", f"rollout.group_size={args.group_size}",
                             f"rollout.questions_per_step={args.questions}", *_model_override(args), *_overrides(args),
                             *extra])
    return cfg, resolve_model(cfg.model.name), load_questions(cfg.tasks)[0][: args.questions]


def _rollout_worker(cfg, model: str):
    from innerloop.actors.rollout import RolloutWorker, worker_args

    return RolloutWorker(*worker_args(cfg, model, cfg.train.seed))


# ---------------------------------------------------------------- rollout: vLLM worker vs HF generate


def bench_rollout(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    cfg, model_path, questions = _demo_setup(args)
    worker = _rollout_worker(cfg, model_path)
    prompts = [worker.prompt_ids(q) for q in questions]
    hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, cfg.model.dtype)).eval()
    hf.to(_device(args))
    runs = []
    for rep in range(args.reps):
        started = time.perf_counter()
        trajectories = worker.generate(questions, args.group_size, seed=rep).trajectories
        ours_s = time.perf_counter() - started
        ours_tokens = sum(len(t.completion_ids) for t in trajectories)
        theirs_tokens, theirs_s = _hf_generate(hf, prompts, worker._tokenizer, cfg, args, seed=rep)
        runs.append({"ours_tokens_per_s": ours_tokens / ours_s, "hf_tokens_per_s": theirs_tokens / theirs_s,
                     "ours_tokens": ours_tokens, "hf_tokens": theirs_tokens, "ours_s": ours_s, "hf_s": theirs_s})
        print(f"rep {rep}: ours {runs[-1]['ours_tokens_per_s']:.0f} tok/s, HF generate "
              f"{runs[-1]['hf_tokens_per_s']:.0f} tok/s", flush=True)
    worker.close()
    ours, theirs = _median_runs(runs, "ours_tokens_per_s"), _median_runs(runs, "hf_tokens_per_s")
    return {"bench": "rollout", "workload": _workload(args), "ours_tokens_per_s": round(ours, 1),
            "hf_generate_tokens_per_s": round(theirs, 1), "ratio": round(ours / theirs, 2), "runs": runs}


def _hf_generate(model, prompts: list[list[int]], tokenizer, cfg, args, seed: int) -> tuple[int, float]:
    """Batched sampling with HF generate, prompts left-padded; returns (generated tokens, seconds)."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    torch.manual_seed(seed)
    started = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=cfg.rollout.temperature,
                             top_p=cfg.rollout.top_p, max_new_tokens=args.max_tokens,
                             num_return_sequences=args.group_size, pad_token_id=pad)
    seconds = time.perf_counter() - started
    new = out[:, width:]
    tokens = 0
    for row in new.tolist():  # up to and including the first end-of-sequence token, as vLLM counts
        stop = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
        tokens += stop
    return tokens, seconds


def bench_rollout_vllm(args) -> dict:
    """Our rollout worker against bare vLLM: the same engine settings, prompts and sampling, both
    engines up at once and their generations alternated, --reps times (a noisy machine slows both).
    Our overhead is what the worker adds: the sampler's log-probs, scoring, trajectory records."""
    from vllm import LLM, SamplingParams, TokensPrompt

    from innerloop.actors.rollout import _max_model_len

    cfg, model_path, questions = _demo_setup(args)
    worker = _rollout_worker(cfg, model_path)
    rollout = cfg.rollout
    kv_bytes = int(rollout.kv_cache_gib * 2**30) if rollout.kv_cache_gib else None
    bare = LLM(model=model_path, dtype=cfg.model.dtype, seed=cfg.train.seed, gpu_memory_utilization=rollout.memory_fraction,
               kv_cache_memory_bytes=kv_bytes, max_model_len=_max_model_len(model_path, rollout.max_model_len),
               enforce_eager=rollout.enforce_eager, enable_prefix_caching=True)
    params = SamplingParams(n=args.group_size, temperature=rollout.temperature, top_p=rollout.top_p,
                            max_tokens=args.max_tokens)
    inputs = [TokensPrompt(prompt_token_ids=worker.prompt_ids(q)) for q in questions]
    runs = []
    for rep in range(args.reps):
        started = time.perf_counter()
        generated = worker.generate(questions, args.group_size, seed=rep)
        ours_s = time.perf_counter() - started
        ours_tokens = sum(len(t.completion_ids) for t in generated.trajectories)
        started = time.perf_counter()
        bare_tokens = sum(len(c.token_ids) for out in bare.generate(inputs, params, use_tqdm=False) for c in out.outputs)
        bare_s = time.perf_counter() - started
        runs.append({"ours_tokens_per_s": ours_tokens / ours_s, "ours_engine_tokens_per_s": ours_tokens /
                     generated.engine_seconds, "bare_tokens_per_s": bare_tokens / bare_s})
        print(f"rep {rep}: ours {runs[-1]['ours_tokens_per_s']:.0f} tok/s (engine alone "
              f"{runs[-1]['ours_engine_tokens_per_s']:.0f}), bare vLLM {runs[-1]['bare_tokens_per_s']:.0f}", flush=True)
    worker.close()
    ours, engine, theirs = (_median_runs(runs, k) for k in ("ours_tokens_per_s", "ours_engine_tokens_per_s",
                                                            "bare_tokens_per_s"))
    return {"bench": "rollout_vllm", "workload": _workload(args), "ours_tokens_per_s": round(ours, 1),
            "ours_engine_tokens_per_s": round(engine, 1), "bare_vllm_tokens_per_s": round(theirs, 1),
            "ratio": round(ours / theirs, 3), "engine_ratio": round(engine / theirs, 3), "runs": runs}


def bench_rollout_tp(args) -> dict:
    """Our rollout worker with a 1-way engine against a 2-way tensor-parallel one (each shard on its
    own share of the cores or its own GPU), the same prompts and sampling, one engine at a time."""
    cfg, model_path, questions = _demo_setup(args)
    rows = {}
    for shards in (1, 2):
        cfg.rollout.tensor_parallel = shards
        worker = _rollout_worker(cfg, model_path)
        rows[shards] = [_timed_tokens(lambda rep: [len(t.completion_ids) for t in worker.generate(
            questions, args.group_size, seed=rep).trajectories], rep) for rep in range(args.reps)]
        worker.close()
    one, two = statistics.median(rows[1]), statistics.median(rows[2])
    return {"bench": "rollout_tp", "workload": _workload(args), "tp1_tokens_per_s": round(one, 1),
            "tp2_tokens_per_s": round(two, 1), "ratio": round(two / one, 3), "tp1_runs": rows[1], "tp2_runs": rows[2]}


def _timed_tokens(generate, rep: int) -> float:
    """Tokens per second of one generation (`generate(rep)` returns each completion's length)."""
    started = time.perf_counter()
    tokens = sum(generate(rep))
    return tokens / (time.perf_counter() - started)


def _workload(args) -> str:
    return f"{args.questions} questions x {args.group_size} samples, <= {args.max_tokens} new tokens"


# ---------------------------------------------------------------- learner: DeepSpeed update vs bare loop


def bench_learner(args) -> dict:
    from innerloop.distributed.cluster.placement import free_port
    from innerloop.distributed.run.samples import build_samples, group_advantages, group_by_question, loss_normalizers
    from innerloop.learners.learner import Learner

    cfg, model_path, questions = _demo_setup(args)
    worker = _rollout_worker(cfg, model_path)
    rollout = worker.generate(questions, args.group_size, seed=0)
    groups = group_by_question(list(rollout.trajectories))
    samples = build_samples(groups, group_advantages(groups, cfg.algorithm), cfg.algorithm)
    worker.close()
    normalizers = loss_normalizers(samples, cfg.algorithm)
    tokens = sum(len(s.input_ids) for s in samples)
    ours = Learner(model_path, cfg.model.dtype, cfg.learner, cfg.algorithm, cfg.rollout.temperature, 0, 1,
                   "127.0.0.1", free_port(), cfg.train.seed)
    bare = BareLoop(model_path, cfg, _device(args))
    runs = []
    for rep in range(args.reps):
        ours_s = ours.update(samples, normalizers).update_seconds
        bare_s = bare.update(samples)
        runs.append({"ours_tokens_per_s": tokens / ours_s, "bare_tokens_per_s": tokens / bare_s,
                     "ours_s": ours_s, "bare_s": bare_s})
        print(f"rep {rep}: ours {tokens / ours_s:.0f} tok/s, bare PyTorch {tokens / bare_s:.0f} tok/s", flush=True)
    ours_tps, bare_tps = _median_runs(runs, "ours_tokens_per_s"), _median_runs(runs, "bare_tokens_per_s")
    return {"bench": "learner", "workload": f"{len(samples)} samples, {tokens} tokens (prompt + completion), "
            f"micro-batch {cfg.learner.micro_batch_size}", "ours_tokens_per_s": round(ours_tps, 1),
            "bare_tokens_per_s": round(bare_tps, 1), "ratio": round(ours_tps / bare_tps, 3), "runs": runs}


class BareLoop:
    """The local ceiling: the same model, micro-batches and optimizer, with nothing around them."""

    def __init__(self, model_path: str, cfg, device: str):
        import torch
        from transformers import AutoModelForCausalLM

        self.device = device
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, cfg.model.dtype)).to(device)
        self.model.config.use_cache = False
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.learner.lr, foreach=True)
        self.micro_batch_size = cfg.learner.micro_batch_size
        pad = self.model.config.pad_token_id
        self.pad_id = pad if pad is not None else 0

    def update(self, samples) -> float:
        import torch

        from innerloop.learners.batching import collate, micro_batches, shard_for_rank

        started = time.perf_counter()
        count = sum(sum(s.loss_mask) for s in samples)
        for chunk in micro_batches(shard_for_rank(samples, 0, 1), self.micro_batch_size):
            batch = collate(chunk, self.pad_id).to(self.device)
            logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(
                -1, batch.input_ids[:, 1:, None]).squeeze(-1)
            loss = -(logprobs * batch.advantages[:, None] * batch.loss_mask[:, 1:]).sum() / count
            loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device != "cpu":
            torch.cuda.synchronize()
        return time.perf_counter() - started


# ---------------------------------------------------------------- weight sync against model size


def bench_sync(args) -> dict:
    import ray

    from innerloop.distributed.config_load import load_config
    from innerloop.distributed.cluster.fleet import Fleet
    from innerloop.distributed.state.model_prep import resolve_model

    models = {"tiny": _tiny_model(), "135M": resolve_model("smollm2-135m-instruct"), "0.5B": llama_model("0.5B")}
    rows = []
    for name, path in models.items():
        dtype = "float32" if name == "tiny" else "bfloat16"
        cfg = load_config(None, [f"model.name={path}", f"model.dtype={dtype}", "rollout.kv_cache_gib=0.5",
                                 "rollout.max_model_len=512", *_overrides(args)])
        fleet = Fleet.start(cfg, str(path))
        try:
            # The first syncs warm up (object store, shared memory, the engine's reload path): drop two.
            times = [fleet.sync_weights(version) for version in range(1, args.reps + 3)][2:]
        finally:
            fleet.shutdown()
        params, size = _model_size(path)
        rows.append({"model": name, "parameters": params, "bytes": size, "dtype": dtype,
                     "sync_s_median": round(statistics.median(times), 3), "sync_s": times})
        print(f"{name}: {params / 1e6:.1f}M parameters, sync {statistics.median(times):.2f} s", flush=True)
    ray.shutdown()
    return {"bench": "sync", "rows": rows}


def _tiny_model() -> Path:
    from tests.tiny_model import build_tiny_model

    folder = _bench_cache() / "tiny"
    return folder if (folder / "config.json").is_file() else build_tiny_model(folder)


# Llama shapes with random weights and the demo model's tokenizer: sync time depends on size only.
LLAMA_SIZES = {  # hidden, intermediate, layers, attention heads, key-value heads
    "0.5B": (1536, 4096, 16, 24, 8),
    "1B": (2048, 5632, 22, 16, 8),
    "1.5B": (2048, 5632, 28, 16, 8),
}


def llama_model(size: str) -> Path:
    """A Llama of about `size` parameters (LLAMA_SIZES), built once into the bench cache."""
    folder = _bench_cache() / f"llama-{size.lower()}"
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from innerloop.distributed.state.model_prep import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct"))
    hidden, intermediate, layers, heads, kv_heads = LLAMA_SIZES[size]
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _bench_cache() -> Path:
    return Path(os.environ.get("INNERLOOP_CACHE", Path.home() / ".cache" / "innerloop")) / "bench"


def _model_size(path: Path) -> tuple[int, int]:
    from safetensors import safe_open

    params = size = 0
    for file in Path(path).glob("*.safetensors"):
        with safe_open(file, "pt") as handle:
            for key in handle.keys():
                tensor = handle.get_slice(key)
                count = 1
                for dim in tensor.get_shape():
                    count *= dim
                params += count
        size += file.stat().st_size
    return params, size


# ---------------------------------------------------------------- our step: phases and memory


def bench_step(args) -> dict:
    """`innerloop train` on the demo defaults for --steps steps, with every process's RSS sampled."""
    import subprocess

    import shutil

    run_dir = Path(args.out) / "step-run"
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run each time, never a resume
    command = [sys.executable, "-m", "innerloop.distributed.cli", "train", "--run-dir", str(run_dir),
               "--set", f"train.steps={args.steps}", "--set", "eval.before_and_after=false",
               "--set", "train.checkpoint_every=0", "--set", "train.export_final_model=false",
               "--set", "train.max_minutes=0", "--set", f"algorithm.kl_coef={args.kl_coef}",
               *sum((["--set", o] for o in [*_model_override(args), *_overrides(args), *args.overrides]), [])]
    job = subprocess.Popen(command, cwd=REPO_ROOT)
    peaks = _peak_rss_by_role(job)
    if job.returncode:
        raise SystemExit(f"the training run failed ({job.returncode})")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "event" not in r][1:]  # the first step includes warm-up
    parts = {  # the step, cut into parts that do not overlap
        "generation": lambda r: r["time_generate"] - r["time_score"],
        "scoring": lambda r: r["time_score"],
        "reference_logprobs": lambda r: r["reference_seconds"],
        "update": lambda r: r["time_update"] - r["reference_seconds"],
        "weight_sync": lambda r: r["time_sync"],
        "overhead": lambda r: r["time_other"],
    }
    step_s = statistics.median(r["time_step"] for r in steps)
    medians = {name: statistics.median(part(r) for r in steps) for name, part in parts.items()}
    return {"bench": "step", "model": args.model or "the demo's", "overrides": args.overrides,
            "steps_measured": len(steps), "kl_coef": args.kl_coef,
            "step_s_median": round(step_s, 2), "parts_s_median": {k: round(v, 3) for k, v in medians.items()},
            "parts_fraction": {k: round(v / step_s, 4) for k, v in medians.items()},
            "update_tokens_per_s_median": round(statistics.median(r["tokens"] / r["time_update"] for r in steps), 1),
            "peak_rss_mib": peaks}


def _peak_rss_by_role(job, every_s: float = 1.0) -> dict[str, float]:
    """Peak RSS (MiB) of each process under `job` until it ends, named by role (Ray's process titles)."""
    import psutil

    root, peaks = psutil.Process(job.pid), {}
    while job.poll() is None:
        for process in [root, *root.children(recursive=True)]:
            try:
                role = _role(process)
                peaks[role] = max(peaks.get(role, 0.0), process.memory_info().rss / 2**20)
            except psutil.Error:
                continue
        time.sleep(every_s)
    return {role: round(mib, 1) for role, mib in sorted(peaks.items(), key=lambda item: -item[1])}


def _role(process) -> str:
    if process.pid == os.getpid():
        return "benchmark"
    title = " ".join(process.cmdline())
    for role in ("RolloutWorker", "Learner", "gcs_server", "raylet", "dashboard", "log_monitor"):
        if role in title:
            return role
    if "innerloop.distributed.cli" in title or "cli train" in title:
        return "driver"
    if "multiprocessing" in title or "spawn" in title:
        return "scoring process"
    return process.name()


BENCHES = {"rollout": bench_rollout, "rollout_vllm": bench_rollout_vllm, "rollout_tp": bench_rollout_tp, "learner": bench_learner, "sync": bench_sync,
           "step": bench_step}


if __name__ == "__main__":
    sys.exit(main())
