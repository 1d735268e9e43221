"""The `innerloop` command: train, sweep, eval, checkpoints, questions, report, probe, prepare-model."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from rich.file_proxy import FileProxy

from innerloop.distributed.config import ConfigError

from innerloop.distributed.config_load import load_config
from innerloop.distributed.errors import RunStopped
from innerloop.distributed.state.model_prep import ModelPrepError

log = logging.getLogger("innerloop")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.handler(args)
    except (ConfigError, ModelPrepError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RunStopped as exc:  # the run stopped itself, said why, and left its checkpoint intact
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM's grace period spent
        print(f"{exc or 'interrupted'}", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="innerloop", description=__doc__)
    verbose = "debug logging; Ray's, vLLM's and DeepSpeed's output on the terminal, not in a log file"
    parser.add_argument("-v", "--verbose", action="store_true", help=verbose)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="run GRPO training (no CONFIG: the embedded CPU demo)")
    train.add_argument("config", nargs="?", help="a YAML file from configs/; omit for the embedded defaults")
    _add_overrides(train)
    train.add_argument("--address", help="join a running Ray cluster ('auto' or host:port); default: start one")
    train.add_argument("--run-dir", help="where outputs go (default: runs/<date-time>)")
    train.add_argument("--resume", nargs="?", const=True, default=False, metavar="RUN_DIR",
                       help="continue a run from its latest good checkpoint (its run directory here, or "
                            "--run-dir); without CONFIG the run's own config.yaml is used")
    train.set_defaults(handler=_train)

    _add_sweep(commands)

    evaluate = commands.add_parser("eval", help="held-out accuracy of a model folder or checkpoint")
    evaluate.add_argument("model", help="a Hugging Face model folder, a checkpoint folder, or the default alias")
    evaluate.add_argument("--config", help="the training config (for tasks, reward and eval sampling)")
    evaluate.add_argument("--json", metavar="FILE", help="also write the report (Pass@k and all) as JSON")
    _add_overrides(evaluate)
    evaluate.set_defaults(handler=_eval)

    listing = commands.add_parser("checkpoints", help="list a run's checkpoints: step, metric, best, verified")
    listing.add_argument("run_dir", help="the run directory")
    listing.add_argument("--verify", action="store_true", help="check every file against the manifest's checksums")
    listing.set_defaults(handler=_checkpoints)

    scale = commands.add_parser("scale", help="resize a running run's rollout pool and/or learner ranks "
                                "(applied before its next step)")
    scale.add_argument("run_dir", help="the run directory of the running job")
    scale.add_argument("--rollout-workers", type=int, metavar="N", help="rollout workers wanted")
    scale.add_argument("--learner-ranks", type=int, metavar="N",
                       help="learner ranks wanted (the run checkpoints, restarts its ranks and reloads)")
    scale.set_defaults(handler=_scale)

    questions = commands.add_parser("questions", help="per-question history of a run: solved, forgotten, "
                                     "never solved, pass rate per step")
    questions.add_argument("run_dir", help="the run directory (or one of its checkpoints/step-N folders)")
    questions.add_argument("--solved", action="store_true", help="list questions solved at their last visit")
    questions.add_argument("--forgotten", action="store_true",
                           help="list questions solved at an earlier visit, not at the last")
    questions.add_argument("--never-solved", action="store_true", help="list questions never answered correctly")
    questions.add_argument("--heatmap", metavar="FILE.png", help="write a questions x steps pass-rate heatmap")
    questions.add_argument("--max-rows", type=int, default=100, metavar="N",
                           help="heatmap rows at most; more questions: the N most visited (default 100)")
    questions.add_argument("--json", metavar="FILE", help="write the whole history as JSON")
    questions.set_defaults(handler=_questions)

    report = commands.add_parser("report", help="one self-contained HTML page about a run: curves, phase "
                                 "times, probe, per-question heatmap, events, config")
    report.add_argument("run_dir", help="the run directory")
    report.add_argument("--out", metavar="FILE", help="where to write it (default: RUN_DIR/report.html)")
    report.set_defaults(handler=_report)

    _add_probe(commands)

    prepare = commands.add_parser("prepare-model", help="convert and cache the default demo model")
    prepare.add_argument("--force", action="store_true", help="rebuild the cached folder")
    prepare.set_defaults(handler=_prepare)
    for command in commands.choices.values():  # `innerloop train -v` as well as `innerloop -v train`
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=verbose)
    return parser


def _add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value, e.g. --set rollout.temperature=0.8 (repeatable)")


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        datefmt="[%X]", handlers=[RichHandler(show_path=False, rich_tracebacks=True)])


class _ToLog(FileProxy):
    """sys.stdout or sys.stderr under `_quiet`: writes land in the log, while rich consoles (innerloop's
    log lines, the progress bar) write to `rich_proxied_file`, the terminal. A FileProxy, so rich's live
    display keeps it in place instead of wrapping it."""

    def __init__(self, log_file, terminal):
        super().__init__(None, log_file)  # no console: write() is ours; fileno(), isatty() & co: the log's
        self._log, self.terminal = log_file, terminal

    rich_proxied_file = property(lambda self: self.terminal)

    def write(self, text: str) -> int:
        return self._log.write(text)

    def flush(self) -> None:
        self._log.flush()


@contextlib.contextmanager
def _quiet(verbose: bool, log_path: Path | None = None):
    """While a command runs, all output but innerloop's own (Ray's and the lines it forwards from actors,
    vLLM, DeepSpeed, transformers, warnings, C++ and child processes) goes to `log_path`, a temp file
    by default. --verbose: everything on the terminal."""
    if verbose:
        yield
        return
    log_path = log_path or Path(tempfile.mkdtemp(prefix="innerloop-")) / "output.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log.info("third-party output goes to %s (--verbose shows it here)", log_path)
    log_file = open(log_path, "a", buffering=1, encoding="utf-8", errors="replace")
    os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # Ray's forwarded lines without colour codes
    saved, root, to_log = (sys.stdout, sys.stderr), logging.getLogger(), logging.StreamHandler(log_file)
    terminals = [open(os.dup(fd), "w", buffering=1, encoding=s.encoding or "utf-8") for fd, s in zip((1, 2), saved)]
    for fd, stream in zip((1, 2), saved):
        stream.flush()
        os.dup2(log_file.fileno(), fd)  # C++ writes and child processes too
    sys.stdout, sys.stderr = (_ToLog(log_file, terminal) for terminal in terminals)
    to_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    shown, ours = list(root.handlers), lambda record: record.name.partition(".")[0] == "innerloop"
    for handler in shown:
        handler.addFilter(ours)
    root.addHandler(to_log)
    try:
        yield
    finally:  # the log stays open: a handler made meanwhile (vLLM's, in eval) may still write to it
        root.removeHandler(to_log)
        for handler in shown:
            handler.removeFilter(ours)
        sys.stdout, sys.stderr = saved
        for fd, terminal in zip((1, 2), terminals):
            os.dup2(terminal.fileno(), fd)
            terminal.close()


def _train(args) -> int:
    from innerloop.distributed.state import checkpoints
    from innerloop.distributed.run.driver import Trainer

    run_dir = _run_dir(args)
    existing = checkpoints.latest(run_dir / "checkpoints")
    resume = bool(args.resume)
    if existing is not None and not resume:
        resume = _offer_resume(run_dir, existing)
    started_before = (run_dir / "config.yaml").is_file()
    if resume and existing is None and not started_before:
        raise ConfigError(f"--resume was given but {run_dir} holds no run (no config.yaml, no checkpoint)")
    if resume and existing is None:
        log.info("%s holds no checkpoint yet: the run starts again from step 0, with its own config", run_dir)
    config = args.config
    if resume and config is None and started_before:
        config = run_dir / "config.yaml"  # the run's own resolved config: no need to repeat overrides
    cfg = load_config(config, args.overrides)
    log.info("run directory: %s", run_dir.resolve())
    trainer = Trainer(cfg, run_dir, address=args.address, resume=resume)
    trainer.prepare()  # every check and the run directory's lock, before anything is written there
    try:
        with _quiet(args.verbose, run_dir / "output.log"):
            result = trainer.train()
    except KeyboardInterrupt as exc:
        raise KeyboardInterrupt(_interrupted(run_dir, exc)) from None
    finally:
        _stop_ray()
    if result.stopped:  # 128 + SIGTERM: a scheduler sees the run did not finish
        print(f"stopped by SIGTERM after step {result.steps_done}, which is saved: "
              f"`innerloop train --resume {run_dir}` continues", file=sys.stderr)
        return 143
    _print_summary(result, run_dir)
    return 0


def _interrupted(run_dir: Path, exc: KeyboardInterrupt) -> str:
    """What an interrupted run left: true whether or not it had checkpointed."""
    from innerloop.distributed.state import checkpoints

    why = f"interrupted ({exc})" if str(exc) else "interrupted"
    latest = checkpoints.latest(run_dir / "checkpoints")
    if latest is None:
        return f"{why} before the first checkpoint; `innerloop train --resume {run_dir}` starts the run again"
    return f"{why}; checkpoint {latest.name} in {run_dir} is intact: `innerloop train --resume {run_dir}` continues"


def _stop_ray() -> None:
    """The command started its own Ray (or joined one): leave nothing of it running."""
    if "ray" in sys.modules:
        from innerloop.distributed.cluster.placement import stop_ray

        stop_ray()


def _run_dir(args) -> Path:
    if isinstance(args.resume, str):
        if args.run_dir and Path(args.run_dir) != Path(args.resume):
            raise ConfigError(f"--resume {args.resume} and --run-dir {args.run_dir} name different runs; give one")
        return Path(args.resume)
    return Path(args.run_dir or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")


def _offer_resume(run_dir: Path, existing: Path) -> bool:
    """A run directory that already holds a checkpoint: ask at a terminal, refuse otherwise."""
    question = f"{run_dir} already holds a checkpoint ({existing.name})."
    if sys.stdin.isatty():
        answer = input(f"{question} Resume that run? [Y/n] ").strip().lower()
        if answer in ("", "y", "yes"):
            return True
    raise ConfigError(f"{question} Pass --resume to continue that run, or choose a new --run-dir")


def _print_summary(result, run_dir: Path) -> None:
    lines = [f"done: {result.steps_done} steps in {result.seconds / 60:.1f} min; run directory {run_dir}"]
    if result.accuracy_before is not None and result.accuracy_after is not None:
        delta = 100 * (result.accuracy_after - result.accuracy_before)
        lines.append(f"held-out accuracy: before {100 * result.accuracy_before:.1f}%  "
                     f"after {100 * result.accuracy_after:.1f}%  ({delta:+.1f} points)")
        if result.lenient_before is not None and result.lenient_after is not None:  # the last number, boxed or not
            lines.append(f"lenient accuracy:  before {100 * result.lenient_before:.1f}%  "
                         f"after {100 * result.lenient_after:.1f}%  "
                         f"({100 * (result.lenient_after - result.lenient_before):+.1f} points)")
    if result.final_model:
        lines.append(f"final model: {result.final_model}")
    print("\n".join(lines))


def _add_sweep(commands) -> None:
    sweep = commands.add_parser("sweep", help="a grid of configs x seeds, each an ordinary training run; a "
                                "table of mean +- 95%% CI per cell and paired tests between cells (resumable)")
    sweep.add_argument("sweep_file", metavar="SWEEP.yaml", help="base config, grid, seeds, metrics (see "
                       "configs/sweeps/mini-batches.yaml)")
    sweep.add_argument("--out", metavar="DIR", help="where the runs and sweep.json/.md/.png go (default: "
                       "sweeps/<file name>); run the same command again to resume")
    sweep.add_argument("--address", help="a Ray cluster ('auto', host:port or the dashboard's http://host:8265): "
                       "each run a Ray job; default: one run after another on this machine")
    sweep.add_argument("--parallel", type=int, metavar="N", help="with --address: runs at once (default: as "
                       "many as the cluster's CPUs and GPUs hold)")
    sweep.set_defaults(handler=_sweep)


def _sweep(args) -> int:
    from innerloop.distributed.run import sweep

    plan = sweep.read_sweep(args.sweep_file)
    sweep.validate(plan)  # before anything is written or submitted
    if args.parallel is not None and (args.parallel < 1 or not args.address):
        raise ConfigError("--parallel needs --address and must be at least 1")
    out = Path(args.out or Path("sweeps") / Path(args.sweep_file).stem)
    if args.address:
        from innerloop.distributed.cluster.jobs import RayJobRunner, run_needs

        out = out.resolve()  # the jobs' working folder is not this one
        needs = max((run_needs(sweep.cell_config(plan, c)) for c in plan.cells), key=lambda n: (n["GPU"], n["CPU"]))
        runner = RayJobRunner(args.address, args.parallel, needs)
    else:
        runner = sweep.LocalRunner()
    summary = sweep.run_sweep(plan, out, runner)
    failed = [f"{c['name']}/seed-{r['seed']}" for c in summary["cells"] for r in c["runs"] if r["state"] != "done"]
    print(f"sweep table: {out / 'sweep.md'} (and sweep.json, sweep.png)")
    if failed:
        print(f"{len(failed)} runs did not finish: {', '.join(failed)}; their errors are in the table; "
              "run the same command again to retry them", file=sys.stderr)
        return 1
    return 0


def _eval(args) -> int:
    import json

    from innerloop.distributed.lens.evaluate import evaluate_model, format_report

    cfg = load_config(args.config, args.overrides)
    json_file = Path(args.json) if args.json else None
    if json_file is not None and not json_file.parent.is_dir():  # say so before the engine starts
        raise ConfigError(f"--json {json_file}: the folder {json_file.parent} does not exist")
    with _quiet(args.verbose):
        report = evaluate_model(cfg, args.model)
    print(format_report(report, args.model))
    if json_file is not None:
        json_file.write_text(json.dumps({"model": args.model, **report.to_dict()}, indent=2) + "\n")
    return 0


def _checkpoints(args) -> int:
    from innerloop.distributed.state import checkpoints

    root = Path(args.run_dir) / "checkpoints"
    found = checkpoints.list_checkpoints(root)
    if not found:
        print(f"no complete checkpoint in {root}")
        return 1
    best = checkpoints.best(root)
    damaged = 0
    for info in found:
        metric = "-" if info.metric is None else f"{info.metric:.4g}"
        notes = ["best"] if info.path == best else []
        if args.verify:
            problems = checkpoints.verify(info.path)
            damaged += bool(problems)
            notes.append("DAMAGED: " + "; ".join(problems) if problems else "verified")
        print(f"{info.path.name}  metric {metric:>8}  {' '.join(notes)}")
    return 1 if damaged else 0


def _scale(args) -> int:
    from innerloop.distributed.run.scale_command import request_scale

    print(request_scale(args.run_dir, args.rollout_workers, args.learner_ranks))
    return 0


def _questions(args) -> int:
    from innerloop.distributed.lens import history

    if args.max_rows < 1:
        raise ConfigError("--max-rows must be at least 1")
    try:
        histories = history.history_of_run(args.run_dir)
    except history.HistoryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(history.summary_text(args.run_dir, history.summarize(histories)))
    for status in ("solved", "forgotten", "never_solved"):
        if getattr(args, status):
            listed = [h for h in histories.values() if h.status == status]
            print(f"\n{status.replace('_', ' ')} ({len(listed)}):")
            print("\n".join(history.question_line(h) for h in listed) or "  none")
    if args.json:
        history.save(histories, args.json)
        print(f"history written to {args.json}")
    if args.heatmap:
        history.write_heatmap(histories, args.heatmap, max_rows=args.max_rows)
        print(f"heatmap written to {args.heatmap}")
    return 0


def _report(args) -> int:
    from innerloop.distributed.lens.report import ReportError, write_report

    try:
        out = write_report(args.run_dir, args.out)
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"report written to {out}")
    return 0


def _add_probe(commands) -> None:
    from innerloop.learners.probe_summary import DEFAULT_WORDS  # no torch: cheap at parser time

    probe = commands.add_parser("probe", help="inner-loop loss curves: the answer's NLL after each trajectory "
                                "prefix, on sampled held-out trajectories (see docs/probe.md)")
    probe.add_argument("model", help="a Hugging Face model folder, a checkpoint folder, or the default alias")
    probe.add_argument("--out", required=True, metavar="DIR", help="where probe.jsonl, probe_summary.jsonl and "
                       "the PNG go (appended to if they exist)")
    probe.add_argument("--config", help="the training config (for tasks, reward and rollout sampling)")
    # Unset options take the config's probe section (probe.questions, probe.samples, ...).
    probe.add_argument("--questions", type=int, metavar="N", help="held-out questions probed (probe.questions)")
    probe.add_argument("--samples", type=int, metavar="G", help="trajectories per question (probe.samples)")
    probe.add_argument("--suffix", metavar="TEXT",
                       help="appended after each prefix; {answer} marks the scored reference answer "
                            "(probe.suffix, the paper's; pass newlines as real ones, e.g. bash $'...')")
    probe.add_argument("--every", type=int, metavar="K", help="probe after every K-th token (probe.every)")
    probe.add_argument("--other-question", type=int, metavar="M", dest="other_question",
                       help="the control: M trajectories of another question per question, read after this "
                            "question's prompt (probe.other_question)")
    probe.add_argument("--words", default=",".join(DEFAULT_WORDS), metavar="W1,W2",
                       help="words (one or several tokens each) the attribution singles out (default: %(default)s)")
    probe.add_argument("--label", help="names this probe in the files (default: the model folder's name)")
    probe.add_argument("--dtype", choices=["float32", "auto"], default="float32",
                       help="the transformers model's dtype; auto: the model config's (default float32)")
    _add_overrides(probe)
    probe.set_defaults(handler=_probe)


def _probe(args) -> int:
    import re

    from innerloop.distributed.lens.probe_command import ProbeOptions, format_cost, run_probe
    from innerloop.distributed.lens.probe import format_groups
    from innerloop.distributed.lens.probe_stats import comparisons, format_comparisons

    cfg = load_config(args.config, args.overrides)
    label = args.label or re.sub(r"[^A-Za-z0-9._-]+", "-", Path(args.model).name) or "model"
    words = tuple(w.strip() for w in args.words.split(","))
    given = {"questions": args.questions, "samples": args.samples, "suffix": args.suffix, "every": args.every,
             "other_question": args.other_question}
    chosen = {k: getattr(cfg.probe, k) if v is None else v for k, v in given.items()}
    options = ProbeOptions(Path(args.out), label, chosen["questions"], chosen["samples"], chosen["suffix"],
                           chosen["every"], words, args.dtype, chosen["other_question"])
    with _quiet(args.verbose):
        run = run_probe(cfg, args.model, options)
    print(format_groups(run.groups))
    print(format_comparisons(comparisons(run.records)))
    print(format_cost(run.cost, run.seconds, len(run.records)))
    print(f"curves written to {Path(args.out) / 'probe.jsonl'}; plot {run.plot}")
    return 0


def _prepare(args) -> int:
    from innerloop.distributed.state.model_prep import prepare_default_model

    print(prepare_default_model(force=args.force))
    return 0


if __name__ == "__main__":
    sys.exit(main())
