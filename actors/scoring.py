"""The hang guard: reward code runs in a separate process that can be killed, so a reward function that
raises or hangs costs its completion the failure reward, never the job (`GuardedScorer`)."""

from __future__ import annotations

import math
import multiprocessing
import pickle
import weakref
from typing import Any

from innerloop.actors.rewards import RewardFn
from innerloop.distributed.records import Question, RewardResult

# ---------------------------------------------------------------- the hang guard

_MAX_ERROR_CHARS = 500


def _score_one(reward_fn: RewardFn, completion: str, question: Question, ids: tuple[int, ...]) -> tuple[str, Any]:
    try:
        result = reward_fn(completion, question, ids) if ids else reward_fn(completion, question)
        _check_result(result)
    except Exception as exc:  # user code: any exception becomes that item's failure reward
        return "raised", f"{type(exc).__name__}: {exc}"[:_MAX_ERROR_CHARS]
    return "ok", result


def _check_result(result: object) -> None:
    # A NaN or a non-number here would poison every advantage of its group downstream.
    if not isinstance(result, RewardResult):
        raise TypeError(f"reward function returned {type(result).__name__}, expected RewardResult")
    if isinstance(result.reward, bool) or not isinstance(result.reward, (int, float)):
        raise TypeError(f"reward function returned a reward of type {type(result.reward).__name__}")
    if not math.isfinite(result.reward):
        raise ValueError(f"reward function returned a non-finite reward ({result.reward})")


def _worker_main(conn: Any, reward_fn: RewardFn) -> None:
    """The scoring process: score each received batch, one reply per item, in order."""
    conn.send(("ready", None))
    while True:
        try:
            batch = conn.recv()
        except EOFError:
            return  # the parent is gone; do not linger as an orphan
        if batch is None:
            return
        for completion, question, *ids in batch:  # ids: the completion's tokens, where given
            conn.send(_score_one(reward_fn, completion, question, tuple(ids[0]) if ids else ()))


def _stop_process(process: Any, conn: Any, graceful: bool) -> None:
    if graceful and process.is_alive():
        try:
            conn.send(None)
            process.join(2.0)
        except (OSError, ValueError):  # pipe already broken: the process is dying anyway
            pass
    if process.is_alive():
        process.kill()
    process.join(5.0)
    conn.close()


class _Worker:
    """One scoring process and the parent's end of its pipe."""

    def __init__(self, ctx: Any, reward_fn: RewardFn) -> None:
        parent_conn, child_conn = ctx.Pipe()
        # daemon: the interpreter kills it at exit rather than waiting on a hung reward.
        self.process = ctx.Process(target=_worker_main, args=(child_conn, reward_fn),
                                   name="innerloop-reward-scorer", daemon=True)
        self.process.start()
        child_conn.close()  # now only the child holds it, so the child's death reads as EOF here
        self.conn = parent_conn
        self.ready = False
        self._finalizer = weakref.finalize(self, _stop_process, self.process, self.conn, True)

    def wait_ready(self, timeout_s: float) -> None:
        if self.ready:
            return
        if not self.conn.poll(timeout_s):
            self.stop(graceful=False)
            raise RuntimeError(f"the reward scoring process did not start within {timeout_s:g}s")
        try:
            self.conn.recv()
        except EOFError:
            self.process.join(5.0)
            code = self.process.exitcode
            self.stop(graceful=False)
            raise RuntimeError(
                f"the reward scoring process exited while starting (exit code {code}); the reward "
                "function could not be loaded there - is its module importable in a fresh process? "
                "See its traceback above."
            ) from None
        self.ready = True

    def stop(self, graceful: bool) -> None:
        if self._finalizer.detach() is not None:  # None: already stopped
            _stop_process(self.process, self.conn, graceful)


class GuardedScorer:
    """Scores completions in a persistent child process so reward code can neither hang nor crash us.

    A reward that raises gets `failure_reward` with error "raised: ..."; one that runs past
    `timeout_s` has its process killed and restarted, gets `failure_reward` with error
    "timed out after Xs", and the rest of the batch goes on; both are counted (`stats`). Not
    thread-safe: one caller at a time. The process is a daemon, so reward code may run `subprocess`
    but not start multiprocessing children.
    """

    _CHUNK = 256  # items per message: bounds message size; the worker idles one round trip per chunk

    def __init__(self, reward_fn: RewardFn, timeout_s: float, failure_reward: float,
                 start_timeout_s: float = 120.0) -> None:
        if not timeout_s > 0:
            raise ValueError(f"reward timeout_s must be > 0 seconds, got {timeout_s}")
        try:
            pickle.dumps(reward_fn)
        except Exception as exc:  # pickling errors come as several types
            raise TypeError("the reward function must be picklable (a top-level function or a "
                            f"functools.partial of one) to run in the scoring process: {exc}") from exc
        self.timeout_s = float(timeout_s)
        self.failure_reward = float(failure_reward)
        self.start_timeout_s = start_timeout_s
        self._reward_fn = reward_fn
        self._ctx = multiprocessing.get_context("spawn")  # fork is unsafe beside Ray/torch threads
        self._stats = {"scored": 0, "raised": 0, "timed_out": 0, "died": 0, "restarts": 0}
        self._closed = False
        self._worker: _Worker | None = _Worker(self._ctx, reward_fn)  # starts now, waited for later

    @property
    def stats(self) -> dict[str, int]:
        return dict(self._stats)

    def score(self, items: list[tuple]) -> list[RewardResult]:
        """One RewardResult per (completion, question) or (completion, question, completion_ids), in order."""
        results: list[RewardResult] = []
        try:
            while len(results) < len(items):
                worker = self._ready_worker()
                chunk = items[len(results) : len(results) + self._CHUNK]
                worker.conn.send(list(chunk))
                results.extend(self._collect(worker, len(chunk)))
        except BaseException:
            # Interrupted mid-batch (Ctrl-C, a worker that would not start): its unread replies
            # must not be taken for the next batch's, so that worker goes; the next call starts one.
            if self._worker is not None:
                self._worker.stop(graceful=False)
                self._worker = None
            raise
        self._stats["scored"] += len(items)
        return results

    def _ready_worker(self) -> _Worker:
        if self._closed:
            raise RuntimeError("this GuardedScorer is closed")
        if self._worker is None:
            self._worker = _Worker(self._ctx, self._reward_fn)
        self._worker.wait_ready(self.start_timeout_s)
        return self._worker

    def _collect(self, worker: _Worker, count: int) -> list[RewardResult]:
        """Results for one sent chunk; stops early (and restarts the worker) if an item fails hard.

        Items run one after another, so each result's wait starts when the previous one arrived:
        a timeout belongs to exactly one item.
        """
        out: list[RewardResult] = []
        while len(out) < count:
            if not worker.conn.poll(self.timeout_s):
                return [*out, self._restart(worker, "timed_out", f"timed out after {self.timeout_s:g}s")]
            try:
                status, payload = worker.conn.recv()
            except EOFError:  # the reward code killed its process (os._exit, segfault, ...)
                worker.process.join(5.0)
                error = f"scoring process died (exit code {worker.process.exitcode})"
                return [*out, self._restart(worker, "died", error)]
            if status == "ok":
                out.append(payload)
            else:
                self._stats["raised"] += 1
                out.append(self._failure(f"raised: {payload}"))
        return out

    def _failure(self, error: str) -> RewardResult:
        return RewardResult(self.failure_reward, False, False, error=error)

    def _restart(self, worker: _Worker, failure: str, error: str) -> RewardResult:
        """The failure reward of an item that hung or killed its process; the process is replaced."""
        self._stats[failure] += 1
        worker.stop(graceful=False)
        self._stats["restarts"] += 1
        self._worker = _Worker(self._ctx, self._reward_fn)
        return self._failure(error)

    def close(self) -> None:
        self._closed = True
        if self._worker is not None:
            self._worker.stop(graceful=True)
            self._worker = None

    def __enter__(self) -> GuardedScorer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
