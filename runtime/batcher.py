"""Dynamic batcher: requests with different compositions share one engine call.

Each request carries its images, its coefficient row and the bank snapshot it resolved against.
A worker takes the oldest request, then keeps taking requests until the batch holds
``max_batch_size`` images or ``max_queue_delay_us`` has passed since it took the first one. Requests
are batched only with requests of the same bank snapshot (after a hot swap, old and new never mix),
and a request that does not fit is carried over, first in line for the next batch. One worker per
backend instance; all share one bounded queue (``submit`` fails fast with :class:`QueueFullError`).

A request whose deadline passed before its batch ran fails with :class:`DeadlineExceededError`; a
failing engine call fails exactly the requests of that batch. ``shutdown(drain=True)`` finishes every
accepted request; ``drain=False`` fails the pending ones with :class:`RuntimeClosedError`. No future
is ever left pending.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from .compose import BankState
from .errors import DeadlineExceededError, EngineError, ForgetRTError, InvalidInputError, QueueFullError, RuntimeClosedError

__all__ = ["InferResult", "Job", "DynamicBatcher", "BatchObserver"]


@dataclass(frozen=True)
class InferResult:
    """Logits for one request's images, and which bank produced them."""

    logits: np.ndarray  # float32 [n, classes]
    bank_version: int
    queue_us: float = 0.0  # time waiting in the batcher (0 for direct calls)
    compute_us: float = 0.0  # engine time of the batch this request ran in
    batch_images: int = 0  # images in that batch (heterogeneous rows included)

    @property
    def predictions(self) -> np.ndarray:
        return self.logits.argmax(axis=1)


@dataclass
class Job:
    images: np.ndarray
    row: np.ndarray
    bank: BankState
    deadline: float | None = None  # time.monotonic() value
    future: Future = field(default_factory=Future)
    t_enqueue: float = field(default_factory=time.monotonic)

    @property
    def n(self) -> int:
        return int(self.images.shape[0])


#: observer(n_requests, n_images, queue_seconds_per_request, compute_seconds, ok)
BatchObserver = Callable[[int, int, Sequence[float], float, bool], None]
RunFn = Callable[[np.ndarray, np.ndarray, BankState], np.ndarray]


class DynamicBatcher:
    def __init__(
        self,
        runners: Sequence[RunFn],
        *,
        max_batch_size: int = 64,
        max_queue_delay_us: int = 500,
        max_queue: int = 1024,
        observer: BatchObserver | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_queue_delay_us < 0 or not runners:
            raise InvalidInputError(
                f"need max_batch_size >= 1, max_queue >= 1, max_queue_delay_us >= 0 and a runner; "
                f"got {max_batch_size}, {max_queue}, {max_queue_delay_us}"
            )
        self.max_batch_size = max_batch_size
        self.delay = max_queue_delay_us / 1e6
        self.max_queue = max_queue
        self._q: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self._observer = observer
        self._lock = threading.Lock()
        self._closed = False
        self._abort = False
        self._threads = [
            threading.Thread(target=self._loop, args=(run,), name=f"forgetrt-batcher-{i}", daemon=True) for i, run in enumerate(runners)
        ]
        for t in self._threads:
            t.start()

    # ------------------------------------------------------------------ client side
    def submit(self, job: Job) -> Future:
        if job.n > self.max_batch_size:
            raise InvalidInputError(f"request has {job.n} images, more than the maximum batch size {self.max_batch_size}")
        if job.n == 0:
            raise InvalidInputError("request has no images")
        with self._lock:
            if self._closed:
                raise RuntimeClosedError("the runtime is shut down and accepts no new requests")
            try:
                self._q.put_nowait(job)
            except queue.Full:
                raise QueueFullError(f"request queue is full ({self.max_queue} pending requests); retry later") from None
        return job.future

    def pending(self) -> int:
        return self._q.qsize()

    def shutdown(self, *, drain: bool = True, timeout: float | None = 30.0) -> None:
        with self._lock:
            self._closed = True
            self._abort = not drain
        if not drain:
            self._fail_queued(RuntimeClosedError("the runtime shut down before this request ran"))
        for t in self._threads:
            t.join(timeout)
        # anything still queued (a worker died, or the join timed out) must not stay pending
        self._fail_queued(RuntimeClosedError("the runtime shut down before this request ran"))

    def _fail_queued(self, err: Exception) -> None:
        while True:
            try:
                job = self._q.get_nowait()
            except queue.Empty:
                return
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(err)

    # ------------------------------------------------------------------ worker side
    def _next(self, timeout: float) -> Job | None:
        try:
            return self._q.get(timeout=timeout) if timeout > 0 else self._q.get_nowait()
        except queue.Empty:
            return None

    def _loop(self, run: RunFn) -> None:
        carry: deque[Job] = deque()
        while True:
            first = carry.popleft() if carry else self._next(0.05)
            if first is None:
                if self._closed:
                    return
                continue
            if self._abort:
                self._fail([first, *carry], RuntimeClosedError("the runtime shut down before this request ran"))
                carry.clear()
                continue
            batch, n = [first], first.n
            wait_until = time.monotonic() + self.delay
            while carry and n < self.max_batch_size:
                job = carry[0]
                if job.bank is not first.bank or n + job.n > self.max_batch_size:
                    break
                batch.append(carry.popleft())
                n += job.n
            while n < self.max_batch_size and not carry:
                job = self._next(wait_until - time.monotonic())
                if job is None:
                    break
                if job.bank is not first.bank or n + job.n > self.max_batch_size:
                    carry.append(job)  # first in line for the next batch
                    break
                batch.append(job)
                n += job.n
            self._run_batch(run, batch)

    @staticmethod
    def _fail(jobs: Sequence[Job], err: Exception) -> None:
        for j in jobs:
            if j.future.set_running_or_notify_cancel():
                j.future.set_exception(err)

    def _run_batch(self, run: RunFn, batch: list[Job]) -> None:
        now = time.monotonic()
        live = []
        for j in batch:
            if not j.future.set_running_or_notify_cancel():
                continue  # cancelled by the caller
            if j.deadline is not None and now > j.deadline:
                j.future.set_exception(DeadlineExceededError(f"deadline passed {1e3 * (now - j.deadline):.1f} ms before the request could run"))
                continue
            live.append(j)
        if not live:
            return
        bank = live[0].bank
        images = live[0].images if len(live) == 1 else np.concatenate([j.images for j in live])
        coeffs = np.vstack([j.row if j.row.ndim == 2 else (j.row[None] if j.n == 1 else np.repeat(j.row[None], j.n, axis=0)) for j in live])
        t0 = time.monotonic()
        queue_s = [t0 - j.t_enqueue for j in live]
        try:
            out = run(images, coeffs, bank)
        except Exception as e:  # noqa: BLE001 - any engine failure fails this batch only
            err = e if isinstance(e, ForgetRTError) else EngineError(f"the backend failed on a batch of {len(images)} images: {e!r}")
            for j in live:
                j.future.set_exception(err)
            if self._observer:
                self._observer(len(live), len(images), queue_s, time.monotonic() - t0, False)
            return
        compute = time.monotonic() - t0
        s = 0
        for j, q in zip(live, queue_s):
            j.future.set_result(InferResult(out[s : s + j.n], bank.version, q * 1e6, compute * 1e6, len(images)))
            s += j.n
        if self._observer:
            self._observer(len(live), len(images), queue_s, compute, True)
