"""`innerloop sweep SWEEP.yaml`: a grid of configs x a list of seeds, each an ordinary training run.

The sweep file (every key is checked; an unknown one is an error):

    base:                      # what every cell starts from
      config: configs/demo.yaml  # optional: a config file, as `innerloop train CONFIG` takes it
      set: {train.steps: 8}      # optional: dotted overrides, as --set takes them
    grid:                      # the product of these lists is the cells
      algorithm.mini_batches: [1, 4]
    cells:                     # optional named cells (each x the grid), for pairs a grid cannot make
      sft: {sft.steps: 4, train.steps: 4}
    seeds: [0, 1, 2]           # train.seed of each run
    metrics: [reward_mean]     # step metrics for the table: mean over each run's last `last_steps` steps
    last_steps: 5
    keep_checkpoints: false    # default: a finished run's checkpoints are deleted (the table needs none)

Every cell x seed is validated through `load_config` before any run starts. Runs go to
OUT/CELL/seed-N (the cell's config in OUT/CELL/config.yaml, its terminal output in OUT/CELL/seed-N.log).
A run is finished when its metrics.jsonl holds the "done" record (written after the final eval and
export); a re-run skips finished runs, resumes the others from their checkpoint (`innerloop train
--resume`), and retries failed ones the same way. The table (lens/sweep_table.py) is rewritten after
every run, so a failed or interrupted sweep still leaves one.

A finished run's checkpoints are deleted unless the file says `keep_checkpoints: true`: each holds the
optimizer state (about 16 bytes a parameter, 2.5 GB for the demo's 135M model), so a 12-run sweep kept
them to 60 GB and filled a machine's disk. An unfinished run keeps its own, to resume from.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

import yaml

from innerloop.distributed.config import Config, ConfigError
from innerloop.distributed.config_load import load_config
from innerloop.distributed.lens import sweep_table
from innerloop.distributed.state.tracking import read_jsonl

log = logging.getLogger(__name__)

SWEEP_KEYS = ("base", "grid", "cells", "seeds", "metrics", "last_steps", "keep_checkpoints")
BASE_KEYS = ("config", "set")


class SweepError(ConfigError):
    """A sweep file that cannot run; the message names the key or the cell."""


@dataclass(frozen=True)
class Cell:
    name: str  # its folder under OUT: "mini_batches=4", or a named cell's name with its grid values
    overrides: tuple[tuple[str, Any], ...]  # dotted key -> value, applied after the base


@dataclass(frozen=True)
class Sweep:
    source: Path
    base_config: Path | None
    base_overrides: tuple[tuple[str, Any], ...]
    cells: tuple[Cell, ...]
    seeds: tuple[int, ...]
    metrics: tuple[str, ...]
    last_steps: int
    keep_checkpoints: bool = False  # False: a finished run's checkpoints are deleted


# ---------------------------------------------------------------- reading and validating


def read_sweep(path: str | Path) -> Sweep:
    """Parse and check the sweep file's shape (not yet the configs: see `validate`)."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise SweepError(f"sweep file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise SweepError(f"sweep file {path} must hold a mapping ({', '.join(SWEEP_KEYS)})")
    _no_unknown(data, SWEEP_KEYS, f"sweep file {path}")
    base = _mapping(data.get("base") or {}, "base")
    _no_unknown(base, BASE_KEYS, f"sweep file {path}: base")
    base_config = Path(base["config"]) if base.get("config") else None
    if base_config is not None and not base_config.is_file():
        raise SweepError(f"base.config {base_config} does not exist (paths are relative to the current folder)")
    seeds = data.get("seeds")
    if not isinstance(seeds, list) or not seeds:
        raise SweepError(f"sweep file {path}: seeds must be a non-empty list of integers, e.g. seeds: [0, 1, 2] "
                         f"(got {seeds!r}); every cell needs at least one seed")
    if any(isinstance(s, bool) or not isinstance(s, int) for s in seeds) or len(set(seeds)) != len(seeds):
        raise SweepError(f"sweep file {path}: seeds must be distinct integers, got {seeds!r}")
    metrics = data.get("metrics") or []
    if not isinstance(metrics, list) or not all(isinstance(m, str) and m for m in metrics):
        raise SweepError(f"sweep file {path}: metrics must be a list of metric names, got {metrics!r}")
    last_steps = data.get("last_steps", 5)
    if isinstance(last_steps, bool) or not isinstance(last_steps, int) or last_steps < 1:
        raise SweepError(f"sweep file {path}: last_steps must be an integer >= 1, got {last_steps!r}")
    keep = data.get("keep_checkpoints", False)
    if not isinstance(keep, bool):
        raise SweepError(f"sweep file {path}: keep_checkpoints must be true or false, got {keep!r}")
    cells = plan_cells(_mapping(data.get("grid") or {}, "grid"), _mapping(data.get("cells") or {}, "cells"))
    return Sweep(path, base_config, tuple(_dotted(base.get("set") or {}, "base.set").items()), cells,
                 tuple(seeds), tuple(metrics), last_steps, keep)


def _no_unknown(data: dict, allowed: Sequence[str], where: str) -> None:
    unknown = sorted(str(k) for k in data if k not in allowed)
    if unknown:
        raise SweepError(f"{where}: unknown key {', '.join(repr(k) for k in unknown)}; "
                         f"valid keys: {', '.join(allowed)}")


def _mapping(value: Any, key: str) -> dict:
    if not isinstance(value, dict):
        raise SweepError(f"sweep file: {key} must be a mapping, got {type(value).__name__}")
    return value


def _dotted(overrides: dict, where: str) -> dict[str, Any]:
    for key in overrides:
        if not isinstance(key, str) or not key.strip() or key.startswith(".") or key.endswith("."):
            raise SweepError(f"{where}: {key!r} is not a dotted config key such as train.steps")
    return dict(overrides)


def plan_cells(grid: dict, named: dict) -> tuple[Cell, ...]:
    """The cells: every named cell (or the base alone) x the product of the grid's lists, in file order."""
    grid = _dotted(grid, "grid")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise SweepError(f"grid.{key} must be a non-empty list of values, got {values!r}")
    short = _short_names(list(grid))
    combos = [tuple(zip(grid, values)) for values in itertools.product(*grid.values())]
    bases = [(str(name), tuple(_dotted(_mapping(o or {}, f"cells.{name}"), f"cells.{name}").items()))
             for name, o in named.items()] or [("", ())]
    cells = []
    for (base_name, base_overrides), combo in itertools.product(bases, combos):
        parts = ([base_name] if base_name else []) + [f"{short[k]}={_value_text(v)}" for k, v in combo]
        cells.append(Cell(_safe_name(",".join(parts) or "base"), base_overrides + combo))
    names = [c.name for c in cells]
    if len(set(names)) != len(names):
        raise SweepError(f"two cells have the same name ({', '.join(sorted({n for n in names if names.count(n) > 1}))}); "
                         "give the grid's values distinct text")
    return tuple(cells)


def _short_names(keys: list[str]) -> dict[str, str]:
    """A grid key's last part names it in cell names, unless two keys share it (then the full key)."""
    last = [k.rpartition(".")[2] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def _value_text(value: Any) -> str:
    return json.dumps(value, separators=(",", ":")) if isinstance(value, (list, dict)) else str(value)


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=,+-]+", "_", name)


def cell_raw_config(sweep: Sweep, cell: Cell) -> dict[str, Any]:
    """The cell's config as a raw mapping: the base file, then base.set, then the cell's overrides."""
    raw: dict[str, Any] = {}
    if sweep.base_config is not None:
        raw = yaml.safe_load(sweep.base_config.read_text(encoding="utf-8")) or {}
        if not isinstance(raw, dict):
            raise SweepError(f"base.config {sweep.base_config} must hold a mapping of sections")
    for key, value in (*sweep.base_overrides, *cell.overrides):
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SweepError(f"cell {cell.name}: cannot set {key}: {part} is a value, not a section")
        node[parts[-1]] = value
    return raw


def cell_config(sweep: Sweep, cell: Cell, seed: int | None = None) -> Config:
    """The cell's config (with train.seed = `seed`), read as `innerloop train` reads a file: `load_config`."""
    with tempfile.TemporaryDirectory(prefix="innerloop-sweep-") as folder:
        file = Path(folder) / "cell.yaml"
        file.write_text(yaml.safe_dump(cell_raw_config(sweep, cell), sort_keys=False), encoding="utf-8")
        try:
            return load_config(file, [] if seed is None else [f"train.seed={seed}"])
        except ConfigError as exc:
            raise ConfigError(str(exc).replace(str(file), f"cell {cell.name}")) from None


def validate(sweep: Sweep) -> None:
    """Every cell x seed through innerloop's own config validation; all problems at once, each naming its cell."""
    problems = []
    for cell in sweep.cells:
        try:
            for seed in sweep.seeds:
                cell_config(sweep, cell, seed)
        except ConfigError as exc:
            problems.append(f"cell {cell.name}: {exc}")
    if problems:
        raise SweepError(f"{sweep.source}: no run was started, {len(problems)} of {len(sweep.cells)} cells are "
                         "invalid:\n" + "\n".join(problems))


# ---------------------------------------------------------------- planning and resuming


@dataclass(frozen=True)
class PlannedRun:
    cell: str
    seed: int
    run_dir: Path
    config_file: Path  # the cell's config, without the seed
    log_file: Path  # `innerloop train`'s terminal output
    status: str  # done (skipped) | resume (its run directory holds a started run) | new

    @property
    def key(self) -> str:
        return f"{self.cell}/seed-{self.seed}"

    def train_args(self) -> list[str]:
        """`innerloop train` arguments for this run (a started run continues from its own config.yaml)."""
        if self.status == "resume":
            return ["train", "--resume", str(self.run_dir)]
        return ["train", str(self.config_file), "--set", f"train.seed={self.seed}", "--run-dir", str(self.run_dir)]


def run_status(run_dir: Path) -> str:
    """done: metrics.jsonl holds the "done" record; resume: a run started there; new: nothing yet."""
    if any(r.get("event") == "done" for r in read_jsonl(run_dir / "metrics.jsonl")):
        return "done"
    return "resume" if (run_dir / "config.yaml").is_file() else "new"


def plan_runs(sweep: Sweep, out: Path) -> list[PlannedRun]:
    """Write each cell's config under OUT and say what each run needs. A run directory made with another
    config than its cell now gives (the sweep file changed) is an error: its numbers would not be this cell's."""
    runs, stale = [], []
    for cell in sweep.cells:
        folder = out / cell.name
        folder.mkdir(parents=True, exist_ok=True)
        config_file = folder / "config.yaml"
        config_file.write_text(f"# cell {cell.name} of {sweep.source}; the seed is set per run\n"
                               + yaml.safe_dump(cell_raw_config(sweep, cell), sort_keys=False), encoding="utf-8")
        for seed in sweep.seeds:
            run_dir = folder / f"seed-{seed}"
            status = run_status(run_dir)
            if status != "new" and (run_dir / "config.yaml").is_file():
                wanted = load_config(config_file, [f"train.seed={seed}"]).fingerprint()
                if load_config(run_dir / "config.yaml").fingerprint() != wanted:
                    stale.append(str(run_dir))
            runs.append(PlannedRun(cell.name, seed, run_dir, config_file, folder / f"seed-{seed}.log", status))
    if stale:
        raise SweepError("these run directories were made with a different config than their cell now has "
                         f"(the sweep file or the base config changed): {', '.join(stale)}; choose another --out, "
                         "or delete them to run them again")
    return runs


# ---------------------------------------------------------------- running


@dataclass(frozen=True)
class RunOutcome:
    ok: bool
    error: str = ""  # a failed run's last lines of output
    seconds: float = 0.0


class Runner(Protocol):
    """Runs `innerloop train` for each planned run; yields each outcome as that run ends (any order)."""

    def run(self, runs: Sequence[PlannedRun]) -> Iterator[tuple[PlannedRun, RunOutcome]]: ...


def run_sweep(sweep: Sweep, out: Path, runner: Runner) -> dict:
    """Validate, plan, run what is not finished, and write the table after each run. Returns the summary."""
    validate(sweep)
    out.mkdir(parents=True, exist_ok=True)
    runs = plan_runs(sweep, out)
    outcomes: dict[str, RunOutcome | None] = {r.key: None for r in runs}
    pending = [r for r in runs if r.status != "done"]
    log.info("sweep %s: %d cells x %d seeds; %d runs finished earlier, %d to run (%d resumed)", sweep.source,
             len(sweep.cells), len(sweep.seeds), len(runs) - len(pending), len(pending),
             sum(r.status == "resume" for r in pending))
    _write(sweep, out, runs, outcomes, figure=False)
    _prune_finished(sweep, runs)
    try:
        for run, outcome in runner.run(pending):
            outcomes[run.key] = outcome
            if outcome.ok:
                log.info("run %s finished in %.1f min", run.key, outcome.seconds / 60)
                _prune_finished(sweep, [run])
            else:
                log.warning("run %s failed: %s", run.key, (outcome.error.strip().splitlines() or [""])[-1])
            _write(sweep, out, runs, outcomes, figure=False)  # the table so far, after every run
    finally:
        summary = _write(sweep, out, runs, outcomes)
    return summary


def _prune_finished(sweep: Sweep, runs: Sequence[PlannedRun]) -> None:
    if not sweep.keep_checkpoints:
        for run in runs:
            if run_status(run.run_dir) == "done":
                prune_checkpoints(run)


def prune_checkpoints(run: PlannedRun) -> None:
    """Delete a finished run's checkpoints (its metrics, evals and trajectories stay), saying how much."""
    folder = run.run_dir / "checkpoints"
    if not folder.is_dir():
        return
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    shutil.rmtree(folder, ignore_errors=True)
    log.info("run %s: its checkpoints deleted (%.1f GB; keep_checkpoints: true in the sweep file keeps them)",
             run.key, size / 1e9)


def _write(sweep: Sweep, out: Path, runs: list[PlannedRun], outcomes: dict[str, RunOutcome | None],
           figure: bool = True) -> dict:
    rows = []
    for run in runs:
        outcome = outcomes[run.key]
        if run.status == "done" or (outcome is not None and outcome.ok):
            state = "done" if run_status(run.run_dir) == "done" else "failed"
            error = "" if state == "done" else ("the run exited cleanly, but its run directory holds no 'done' "
                                                "record (with --address: does the head node share OUT's filesystem?)")
        elif outcome is not None:
            state, error = "failed", outcome.error
        else:
            state, error = "pending", ""
        rows.append(sweep_table.RunRow(run.cell, run.seed, run.run_dir, state, error,
                                       outcome.seconds if outcome is not None else None))
    cells = {c.name: [f"{k}={_value_text(v)}" for k, v in c.overrides] for c in sweep.cells}
    return sweep_table.write_tables(out, str(sweep.source), cells, rows, sweep.metrics, sweep.last_steps, figure)


def tail(path: Path, lines: int = 15) -> str:
    """The last lines of a run's output: its error, as the table records it."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


class LocalRunner:
    """One machine: each run in its own `innerloop train` process (which starts and stops its own Ray),
    one after another, its terminal output in the run's log file."""

    def __init__(self, command: Sequence[str] | None = None):
        self._command = list(command) if command else [sys.executable, "-m", "innerloop.distributed.cli"]

    def run(self, runs: Sequence[PlannedRun]) -> Iterator[tuple[PlannedRun, RunOutcome]]:
        for run in runs:
            args = [*self._command, *run.train_args()]
            log.info("run %s: innerloop %s", run.key, " ".join(run.train_args()))
            started = time.monotonic()
            with open(run.log_file, "a", encoding="utf-8") as out:
                out.write(f"\n$ innerloop {' '.join(run.train_args())}\n")
                out.flush()
                code = subprocess.call(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            seconds = time.monotonic() - started
            error = "" if code == 0 else f"exit code {code}:\n{tail(run.log_file)}"
            yield run, RunOutcome(code == 0, error, seconds)
