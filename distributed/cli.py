"""The `innerloop` command: train, eval, prepare-model."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from innerloop.distributed.config import ConfigError, load_config
from innerloop.distributed.model_prep import ModelPrepError

log = logging.getLogger("innerloop")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.handler(args)
    except (ConfigError, ModelPrepError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint in the run directory is intact", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="innerloop", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="run GRPO training (no CONFIG: the embedded CPU demo)")
    train.add_argument("config", nargs="?", help="a YAML file from configs/; omit for the embedded defaults")
    _add_overrides(train)
    train.add_argument("--address", help="join a running Ray cluster ('auto' or host:port); default: start one")
    train.add_argument("--run-dir", help="where outputs go (default: runs/<date-time>)")
    train.add_argument("--resume", action="store_true", help="continue from the run directory's latest checkpoint")
    train.set_defaults(handler=_train)

    evaluate = commands.add_parser("eval", help="held-out accuracy of a model folder or checkpoint")
    evaluate.add_argument("model", help="a Hugging Face model folder, a checkpoint folder, or the default alias")
    evaluate.add_argument("--config", help="the training config (for tasks, reward and eval sampling)")
    _add_overrides(evaluate)
    evaluate.set_defaults(handler=_eval)

    prepare = commands.add_parser("prepare-model", help="convert and cache the default demo model")
    prepare.add_argument("--force", action="store_true", help="rebuild the cached folder")
    prepare.set_defaults(handler=_prepare)
    return parser


def _add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value, e.g. --set rollout.temperature=0.8 (repeatable)")


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        datefmt="[%X]", handlers=[RichHandler(show_path=False, rich_tracebacks=True)])


def _train(args) -> int:
    from innerloop.distributed import checkpoints
    from innerloop.distributed.driver import Trainer

    cfg = load_config(args.config, args.overrides)
    run_dir = Path(args.run_dir or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
    existing = checkpoints.latest(run_dir / "checkpoints")
    if existing is not None and not args.resume:
        raise ConfigError(f"{run_dir} already holds a checkpoint ({existing.name}); pass --resume to "
                          "continue that run, or choose a new --run-dir")
    if args.resume and existing is None:
        raise ConfigError(f"--resume was given but {run_dir} holds no complete checkpoint")
    log.info("run directory: %s", run_dir.resolve())
    result = Trainer(cfg, run_dir, address=args.address, resume=args.resume).train()
    _print_summary(result, run_dir)
    return 0


def _print_summary(result, run_dir: Path) -> None:
    lines = [f"done: {result.steps_done} steps in {result.seconds / 60:.1f} min; run directory {run_dir}"]
    if result.accuracy_before is not None and result.accuracy_after is not None:
        delta = 100 * (result.accuracy_after - result.accuracy_before)
        lines.append(f"held-out accuracy: before {100 * result.accuracy_before:.1f}%  "
                     f"after {100 * result.accuracy_after:.1f}%  ({delta:+.1f} points)")
    if result.final_model:
        lines.append(f"final model: {result.final_model}")
    print("\n".join(lines))


def _eval(args) -> int:
    from innerloop.distributed.evaluate import evaluate_model

    cfg = load_config(args.config, args.overrides)
    report = evaluate_model(cfg, args.model)
    print(f"held-out accuracy of {args.model}: {100 * report.accuracy:.1f}% "
          f"({report.correct}/{report.questions}; {100 * report.formatted:.1f}% formatted)")
    return 0


def _prepare(args) -> int:
    from innerloop.distributed.model_prep import prepare_default_model

    print(prepare_default_model(force=args.force))
    return 0


if __name__ == "__main__":
    sys.exit(main())
