"""Dynamic batcher: requests with different compositions share one engine call.

Each request carries its images, its coefficient row and the bank snapshot it resolved against.
A worker takes the oldest request, then keeps taking requests until the batch holds
``max_batch_size`` images or ``max_queue_delay_us`` has passed since it took the first one. Requests
are batched only with requests of the same bank snapshot (after a hot swap, old and new never mix),
and a request that does not fit is carried over, first in line for the next batch. One worker per
backend instance; all share one bounded queue (``submit`` fails fast with :class:`QueueFullError`).

A request whose deadline passed before its batch ran fails with :class:`DeadlineExceededError`; a
failing engine call fails exactly the requests of that batch.

Requests from ``asyncio`` carry an ``asyncio.Future`` of their event loop instead of a
``concurrent.futures.Future``: the worker settles all of one batch's such futures with one
``call_soon_threadsafe`` per loop, instead of one cross-thread wake-up per request.
``shutdown(drain=True)`` finishes every accepted request; ``drain=False`` fails the pending ones with
:class:`RuntimeClosedError`. No future is ever left pending.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from .compose import BankSnapshot
from .errors import (
    DeadlineExceededError,
    EngineError,
    ForgetRTError,
    InvalidInputError,
    QueueFullError,
    RuntimeClosedError,
)

__all__ = ["InferResult", "Job", "DynamicBatcher", "BatchingConfig", "BatchObserver"]


@dataclass(frozen=True)
class BatchingConfig:
    """Dynamic batching, shared by the runtime and the Triton export (``config.pbtxt``):
    ``max_batch_size`` images per engine call, ``max_queue_delay_us`` to wait for more, at most
    ``max_queue`` pending requests (then :class:`QueueFullError`, Triton's ``max_queue_size``), and
    ``instances`` engine instances, one worker each (Triton's ``instance_group`` count).
    ``idle_dispatch``: a request that finds the engine idle and nobody queued behind it (light load:
    nothing is coming to batch it with) runs at once instead of waiting out the delay; under load the
    engine is busy, requests queue while it runs and are batched as usual. False waits every time, as
    Triton does (the Triton export cannot express it).
    ``inline_max_us``: such a lone request from an event loop (``Runtime.infer_async``) runs on the
    loop's own thread, without the hand-off to a worker thread and back, when the engine's recent time
    for that many images is at most this (the loop serves nothing else meanwhile, so only short calls
    qualify; a server also checks that no other request is being read, parsed or run); 0 never does.
    The Triton export ignores it."""

    max_batch_size: int = 64
    max_queue_delay_us: int = 500
    max_queue: int = 1024
    instances: int = 1
    idle_dispatch: bool = True
    inline_max_us: int = 1000

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue", "instances"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise InvalidInputError(f"{name} must be an integer >= 1, got {v!r}")
        d = self.max_queue_delay_us
        if not isinstance(d, int) or isinstance(d, bool) or d < 0:
            raise InvalidInputError(f"max_queue_delay_us must be an integer >= 0, got {d!r}")
        if not isinstance(self.idle_dispatch, bool):
            raise InvalidInputError(f"idle_dispatch must be true or false, got {self.idle_dispatch!r}")
        v = self.inline_max_us
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise InvalidInputError(f"inline_max_us must be an integer >= 0, got {v!r}")


@dataclass(slots=True)
class InferResult:
    """Logits for one request's images, and which bank produced them (slots, not frozen: one is built
    per request on the batcher's hot path)."""

    logits: np.ndarray  # float32 [n, classes]
    bank_version: int
    queue_us: float = 0.0  # time waiting in the batcher (0 for direct calls)
    compute_us: float = 0.0  # engine time of the batch this request ran in
    batch_images: int = 0  # images in that batch (heterogeneous rows included)

    @property
    def predictions(self) -> np.ndarray:
        return self.logits.argmax(axis=1)

    def probabilities(self) -> np.ndarray:
        """Softmax of the logits, float64 [n, classes]."""
        z = self.logits.astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        return p / p.sum(axis=1, keepdims=True)

    def top_k(self, k: int, labels: Sequence[str] | None = None) -> list[list[tuple[str | int, float]]]:
        """Per image, the ``k`` most probable classes (label, or index without ``labels``) with their probability."""
        if k < 1:
            raise InvalidInputError(f"top-k needs k >= 1, got {k}")
        prob = self.probabilities()
        out = []
        for p in prob:
            best = np.argsort(-p, kind="stable")[:k]
            out.append([(labels[i] if labels is not None else int(i), float(p[i])) for i in best])
        return out


#: what run_inline returns when it settled an asyncio job's future with an error instead of returning
SETTLED = object()


class Job:
    """One request in the batcher: its images, coefficient row ([K] or [N, K]), bank snapshot, optional
    deadline (a ``time.monotonic()`` value) and the future that receives its result. ``future`` is a
    ``concurrent.futures.Future`` unless ``loop`` is given, then an ``asyncio.Future`` of that loop."""

    __slots__ = ("images", "row", "snapshot", "deadline", "future", "loop", "n", "t_enqueue")

    def __init__(
        self,
        images: np.ndarray,
        row: np.ndarray,
        snapshot: BankSnapshot,
        deadline: float | None = None,
        future: Future | asyncio.Future | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.images, self.row, self.snapshot, self.deadline, self.loop = images, row, snapshot, deadline, loop
        self.future = future if future is not None else Future()
        self.n = images.shape[0]  # read many times on the worker's hot path
        self.t_enqueue = time.monotonic()

    def start(self) -> bool:
        """Claim the job for running; False if the caller cancelled it."""
        if self.loop is None:
            return self.future.set_running_or_notify_cancel()
        return not self.future.cancelled()


def _settle_async(outcomes: list[tuple[asyncio.Future, Any, BaseException | None]]) -> None:
    for fut, result, err in outcomes:  # on the loop's thread
        if fut.done():
            continue  # cancelled meanwhile
        if err is None:
            fut.set_result(result)
        else:
            fut.set_exception(err)


def settle(jobs: Sequence[Job], results: Sequence[Any] | None, err: BaseException | None = None) -> None:
    """Resolve ``jobs`` (already started) with ``results[i]`` or with ``err``: concurrent futures
    directly, asyncio futures with one ``call_soon_threadsafe`` per event loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for i, j in enumerate(jobs):
        if j.loop is None:
            if err is None:
                j.future.set_result(results[i])
            else:
                j.future.set_exception(err)
        else:
            by_loop.setdefault(j.loop, []).append((j.future, None if err is not None else results[i], err))
    for loop, outcomes in by_loop.items():
        try:
            loop.call_soon_threadsafe(_settle_async, outcomes)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass


#: observer(n_requests, n_images, queue_seconds_per_request, compute_seconds, ok)
BatchObserver = Callable[[int, int, Sequence[float], float, bool], None]
RunFn = Callable[[np.ndarray, np.ndarray, BankSnapshot], np.ndarray]


class DynamicBatcher:
    def __init__(
        self,
        runners: Sequence[RunFn],
        config: BatchingConfig = BatchingConfig(),
        *,
        observer: BatchObserver | None = None,
    ) -> None:
        if not runners:
            raise InvalidInputError("the batcher needs at least one runner")
        self.max_batch_size = config.max_batch_size
        self.delay = config.max_queue_delay_us / 1e6
        self.idle_dispatch = config.idle_dispatch
        self.inline_max_s = config.inline_max_us / 1e6 if config.idle_dispatch else 0.0
        self._per_image_s: float | None = None  # moving average of engine seconds per image (inline rule)
        # (matrix version, images) of engine calls that succeeded: inline runs only a call of a size the
        # engine has already run on this bank (a first call may capture a CUDA graph, which is slow)
        self._warm: set[tuple[int, int]] = set()
        self._runners = list(runners)
        self._busy = 0  # workers (and inline calls) between taking a batch and the end of its engine call
        self.max_queue = config.max_queue
        # one deque under one condition: a worker takes a whole batch per lock acquisition, and a
        # submitter wakes a worker only when one is idle or a full batch is waiting
        self._dq: deque[Job] = deque()
        self._queued_images = 0
        self._idle = 0  # workers waiting for a first job
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._observer = observer
        self._closed = False
        self._abort = False
        self._threads = [
            threading.Thread(target=self._loop, args=(run,), name=f"forgetrt-batcher-{i}", daemon=True)
            for i, run in enumerate(runners)
        ]
        for t in self._threads:
            t.start()

    # ------------------------------------------------------------------ client side
    def submit(self, job: Job) -> Future | asyncio.Future:
        if job.n > self.max_batch_size:
            raise InvalidInputError(
                f"request has {job.n} images, more than the maximum batch size {self.max_batch_size}"
            )
        if job.n == 0:
            raise InvalidInputError("request has no images")
        with self._cv:
            if self._closed:
                raise RuntimeClosedError("the runtime is shut down and accepts no new requests")
            if len(self._dq) >= self.max_queue:
                raise QueueFullError(f"request queue is full ({self.max_queue} pending requests); retry later")
            self._dq.append(job)
            self._queued_images += job.n
            if self._queued_images >= self.max_batch_size:
                self._cv.notify_all()  # a collecting worker can run its batch now
            elif self._idle:
                self._cv.notify()
        return job.future

    def pending(self) -> int:
        return len(self._dq)

    def could_run_inline(self, job: Job) -> bool:
        """Whether ``job`` may run inline right now (checked again, under the lock, by :meth:`run_inline`)."""
        est = self._per_image_s
        return bool(
            self.inline_max_s
            and est is not None
            and est * job.n <= self.inline_max_s
            and job.n <= self.max_batch_size
            and not self._busy
            and not self._dq
            and (job.snapshot.matrix_version, job.n) in self._warm
        )

    def run_inline(self, job: Job) -> Any:
        """Run ``job`` on the calling thread if it is a lone request (no engine call running, nobody
        queued) whose engine time is expected within ``inline_max_us``; None when it is not (submit it).
        The result, or the job's error raised, as a worker would have settled it; for a job with an
        asyncio future that failed, :data:`SETTLED` (its future holds the error: await it)."""
        if not self.could_run_inline(job):
            return None
        with self._cv:
            if self._closed or self._busy or self._dq:
                return None
            self._busy += 1
        try:
            done = self._run_batch(self._runners[0], [job])
        finally:
            with self._cv:
                self._busy -= 1
                if self._closed:  # shutdown waits for inline calls; waking idle workers costs the GIL
                    self._cv.notify_all()
        if done is None:  # failed, expired or cancelled: settled on the job's own future
            if job.loop is not None:
                return SETTLED  # an asyncio future is settled on the loop's next turn: await it
            return job.future.result()  # raises the job's error
        return done[1][0]

    def shutdown(self, *, drain: bool = True, timeout: float | None = 30.0) -> None:
        with self._cv:
            self._closed = True
            self._abort = not drain
            self._cv.notify_all()
        if not drain:
            self._fail_queued(RuntimeClosedError("the runtime shut down before this request ran"))
        for t in self._threads:
            t.join(timeout)
        with self._cv:  # an inline call runs on its caller's thread: let it finish before backends close
            deadline = None if timeout is None else time.monotonic() + timeout
            while self._busy and (deadline is None or time.monotonic() < deadline):
                self._cv.wait(0.05)
        # anything still queued (a worker died, or the join timed out) must not stay pending
        self._fail_queued(RuntimeClosedError("the runtime shut down before this request ran"))

    def _take_all(self) -> list[Job]:
        with self._cv:
            jobs = list(self._dq)
            self._dq.clear()
            self._queued_images = 0
        return jobs

    def _fail_queued(self, err: Exception) -> None:
        self._fail(self._take_all(), err)

    # ------------------------------------------------------------------ worker side
    def _pop(self) -> Job:
        job = self._dq.popleft()
        self._queued_images -= job.n
        return job

    def _collect(self, block: bool = True) -> list[Job] | None:
        """The next batch: the oldest job, then following jobs of the same bank snapshot until the batch
        is full or ``max_queue_delay_us`` has passed. A job that does not fit stays first in line.
        None once the batcher is closed and empty; [] when there is nothing to run (abort, or nothing
        queued with ``block=False``, which also takes only what is queued, without waiting)."""
        cv = self._cv
        with cv:
            while not self._dq:
                if self._closed:
                    return None
                if not block:
                    return []
                self._idle += 1
                cv.wait(0.05)
                self._idle -= 1
            if self._abort:
                return []
            first = self._pop()
            batch, n = [first], first.n
            # light load (no engine call running, nobody queued behind): nothing is coming to wait for
            lone = self.idle_dispatch and self._busy == 0 and not self._dq
            until = time.monotonic() + (0.0 if lone else self.delay)
            while n < self.max_batch_size:
                if self._dq:
                    job = self._dq[0]
                    if job.snapshot is not first.snapshot or n + job.n > self.max_batch_size:
                        break
                    batch.append(self._pop())
                    n += job.n
                    continue
                left = until - time.monotonic()
                if not block or left <= 0 or self._closed:
                    break
                cv.wait(left)
            self._busy += 1  # until its engine call ends (_loop)
            return batch

    def _loop(self, run: RunFn) -> None:
        # Two-stage pipeline: when a batch finishes and more requests are already queued (a full batch,
        # or any with max_queue_delay_us=0), the worker takes the next batch first and only then hands
        # the finished results over. Handing them over
        # wakes their callers (often an event loop, which then holds the GIL for a while); taking the
        # next batch first lets its engine call (which releases the GIL) overlap that work.
        pending: tuple[list[Job], list[InferResult]] | None = None
        while True:
            if pending is not None:
                # early only when it cannot cost batch size: no delay to honour, or a full batch waiting
                early = self._dq and (self.delay == 0 or self._queued_images >= self.max_batch_size)
                batch = self._collect(block=False) if early else []
                settle(*pending)
                pending = None
                if not batch:
                    continue
            else:
                batch = self._collect()
                if batch is None:
                    return
            try:
                if self._abort:
                    self._fail(
                        [*batch, *self._take_all()], RuntimeClosedError("the runtime shut down before this request ran")
                    )
                    continue
                pending = self._run_batch(run, batch)
            finally:
                if batch:  # _collect counted a non-empty batch as busy
                    with self._cv:
                        self._busy -= 1

    @staticmethod
    def _fail(jobs: Sequence[Job], err: Exception) -> None:
        settle([j for j in jobs if j.start()], None, err)

    def _run_batch(self, run: RunFn, batch: list[Job]) -> tuple[list[Job], list[InferResult]] | None:
        """Run one batch; failures are settled here, results are returned for the caller to settle."""
        now = time.monotonic()
        live, late = [], []
        for j in batch:
            if not j.start():
                continue  # cancelled by the caller
            if j.deadline is not None and now > j.deadline:
                late.append(j)
                continue
            live.append(j)
        for j in late:
            settle(
                [j],
                None,
                DeadlineExceededError(
                    f"deadline passed {1e3 * (now - j.deadline):.1f} ms before the request could run"
                ),
            )
        if not live:
            return None
        snapshot = live[0].snapshot
        if len(live) == 1:
            j = live[0]
            images = j.images
            coeffs = j.row if j.row.ndim == 2 else (j.row[None] if j.n == 1 else np.repeat(j.row[None], j.n, axis=0))
        else:
            images = np.concatenate([j.images for j in live])
            if all(j.n == 1 and j.row.ndim == 1 for j in live):
                coeffs = np.stack([j.row for j in live])
            else:
                coeffs = np.concatenate(
                    [j.row if j.row.ndim == 2 else np.broadcast_to(j.row, (j.n, j.row.shape[0])) for j in live]
                )
        t0 = time.monotonic()
        queue_s = [t0 - j.t_enqueue for j in live]
        try:
            out = run(images, coeffs, snapshot)
        except Exception as e:  # noqa: BLE001 - any engine failure fails this batch only
            err = (
                e
                if isinstance(e, ForgetRTError)
                else EngineError(f"the backend failed on a batch of {len(images)} images: {e!r}")
            )
            settle(live, None, err)
            self._per_image_s = None  # a failing engine may be slow: nothing inline until a call succeeds again
            if self._observer:
                self._observer(len(live), len(images), queue_s, time.monotonic() - t0, False)
            return None
        compute = time.monotonic() - t0
        per_image = compute / len(images)
        est = self._per_image_s
        self._per_image_s = per_image if est is None else 0.8 * est + 0.2 * per_image
        if len(self._warm) < 4096:  # (bounded: batch sizes x bank versions)
            self._warm.add((snapshot.matrix_version, len(images)))
        results, s = [], 0
        for j, q in zip(live, queue_s):
            results.append(InferResult(out[s : s + j.n], snapshot.version, q * 1e6, compute * 1e6, len(images)))
            s += j.n
        if self._observer:
            self._observer(len(live), len(images), queue_s, compute, True)
        return live, results
