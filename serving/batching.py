"""Server-side batching of concurrent requests, on the server's asyncio event loop."""

import asyncio
import bisect
import collections
import concurrent.futures
import dataclasses
import logging
import threading

import grpc
import numpy as np

from serving.errors import ServingError
from serving.errors import internal
from serving.errors import unavailable

logger = logging.getLogger("serving.batching")


class _Task:
    __slots__ = ("arrays", "future", "rows")

    def __init__(self, arrays, rows, future):
        self.arrays, self.rows, self.future = arrays, rows, future


def run_signature(signature, arrays):
    """`signature.run`, with any failure returned as a ServingError (never raises)."""
    try:
        return signature.run(arrays)
    except ServingError as e:
        return e
    except Exception as e:  # noqa: BLE001
        return internal(e, f"signature {getattr(signature, 'key', '?')}")


def _raise_errors(signature, arrays):
    result = run_signature(signature, arrays)
    if isinstance(result, ServingError):
        raise result
    return result


class Batcher:
    """Concatenates concurrent requests for one signature into batches, on an asyncio loop.

    A batch closes when it holds `max_batch_size` rows, or `timeout` seconds after its first
    request arrived (as TF Serving's `batch_timeout_micros`); it is run once, and each request
    gets its own rows of the outputs. While every batch thread is busy, the open batch keeps
    growing up to `max_batch_size` instead of closing: it could not run earlier anyway.

    If a batch fails with an error about its inputs (one malformed tf.Example, say), it is split
    in halves and each half run again, recursively: one bad request among `n` costs about
    `2 * log2(n)` extra runs instead of `n`, and fails alone.

    Requests are queued with `submit` from the loop's thread (the gRPC handlers) or with
    `submit_threadsafe` from any other thread (the REST handlers, warmup).

    Args:
        signature: the `Signature` to run.
        max_batch_size: the largest number of rows in one batch.
        timeout: seconds to wait for more requests after the first of a batch.
        num_threads: batches run in parallel, each on its own thread; 0 runs every batch on the
            event loop's own thread (the least overhead per request, for small, fast models;
            the server reads no new request while a batch runs).
        max_enqueued_rows: rows waiting beyond which requests get UNAVAILABLE (None: no limit),
            as TF Serving answers when its batching queue is full.
        allowed_batch_sizes: optional increasing sizes, the last equal to `max_batch_size`;
            each batch is padded (repeating its last row) up to the next of them, so that a
            compiled (XLA) model sees few distinct shapes.
        close_when_idle: close the open batch at once whenever no batch is running, instead
            of waiting `timeout` for more requests; requests arriving while a batch runs still
            gather into the next one. Less latency at low load, the same batches under load
            (needs `num_threads >= 1`).
        loop: the running asyncio event loop that owns the batcher.

    Example:

    ```python
    batcher = Batcher(signature, max_batch_size=32, timeout=0.002, loop=loop)
    outputs = await batcher.submit({"images": images}, rows=len(images))   # on the loop
    outputs = batcher.submit_threadsafe({"images": images}, len(images)).result()  # elsewhere
    ```
    """

    def __init__(self, signature, max_batch_size, timeout, num_threads=1, max_enqueued_rows=None,
                 allowed_batch_sizes=None, close_when_idle=False, loop=None):
        if loop is None:
            raise ValueError("Batcher needs the asyncio event loop it runs on (`loop=`).")
        allowed = _check_batch_sizes(max_batch_size, num_threads, allowed_batch_sizes)
        self.signature = signature
        self.max_batch_size = int(max_batch_size)
        self.timeout = float(timeout)
        self.num_threads = int(num_threads)
        self.max_enqueued_rows = max_enqueued_rows
        self.allowed_batch_sizes = allowed
        self.close_when_idle = bool(close_when_idle) and self.num_threads > 0
        self.loop = loop
        self.num_batches = 0
        self.num_rows = 0
        self._executor = None
        if self.num_threads:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                self.num_threads, thread_name_prefix=f"batch-{signature.key}"
            )
        self._open, self._open_rows = [], 0
        self._ready = collections.deque()  # closed batches waiting for a thread
        self._waiting_rows = 0  # rows in the open and the closed batches
        self._running = 0
        self._timer = None
        self._expired = False
        self._stopped = False
        self._drained = None

    # --- queueing (event-loop thread) ---

    def submit(self, arrays, rows):
        """Queue a request; returns an asyncio future of its outputs (a dict of arrays).

        Must be called on the batcher's loop. The future raises the request's `ServingError`.
        """
        if self._stopped:  # after `stop`: run alone, off the loop (the batch threads are gone)
            return self.loop.run_in_executor(None, _raise_errors, self.signature, arrays)
        if self.max_enqueued_rows and self._waiting_rows + rows > self.max_enqueued_rows:
            raise unavailable(
                f"The batching queue of signature '{self.signature.key}' is full "
                f"({self._waiting_rows} rows waiting); retry later."
            )
        future = self.loop.create_future()
        if self._open_rows + rows > self.max_batch_size:
            self._close()
        self._open.append(_Task(arrays, rows, future))
        self._open_rows += rows
        self._waiting_rows += rows
        if self._open_rows >= self.max_batch_size:
            self._close()
        elif len(self._open) == 1:
            self._expired = False
            self._timer = self.loop.call_later(self.timeout, self._on_timeout)
        self._dispatch()
        return future

    def submit_threadsafe(self, arrays, rows):
        """`submit` from any thread but the loop's; returns a `concurrent.futures.Future`."""

        async def submit_and_wait():
            return await self.submit(arrays, rows)

        return asyncio.run_coroutine_threadsafe(submit_and_wait(), self.loop)

    def _on_timeout(self):
        self._timer = None
        self._expired = True
        self._dispatch()

    def _close(self):
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._open:
            self._ready.append(self._open)
        self._open, self._open_rows, self._expired = [], 0, False

    def _has_thread(self):
        return self.num_threads == 0 or self._running < self.num_threads

    def _dispatch(self):
        while self._has_thread():
            if not self._ready and self._open and (
                self._expired or self._stopped or (self.close_when_idle and not self._running)
            ):
                self._close()
            if not self._ready:
                break
            self._start(self._ready.popleft())
        if self._drained is not None and not (self._ready or self._open or self._running):
            self._drained.set()

    # --- execution ---

    def _start(self, batch):
        rows = sum(task.rows for task in batch)
        self._waiting_rows -= rows
        self.num_batches += 1
        self.num_rows += rows
        if self._executor is None:
            self._finish(batch, self._execute(batch))
            return
        self._running += 1
        done = self._executor.submit(self._execute, batch)
        done.add_done_callback(
            lambda f: self.loop.call_soon_threadsafe(self._finished, batch, f)
        )

    def _finished(self, batch, done):
        self._running -= 1
        try:
            results = done.result()
        except Exception as e:  # noqa: BLE001 (never leave a request waiting)
            results = [internal(e, f"batch of {self.signature.key}")] * len(batch)
        self._finish(batch, results)
        self._dispatch()

    @staticmethod
    def _finish(batch, results):
        for task, result in zip(batch, results):
            if task.future.done():  # the client went away or its deadline passed
                continue
            if isinstance(result, ServingError):
                task.future.set_exception(result)
            else:
                task.future.set_result(result)

    def _run_rows(self, arrays, rows):
        """Runs `rows` rows, padded to the next allowed batch size; returns outputs or error."""
        target = rows
        if self.allowed_batch_sizes and rows <= self.allowed_batch_sizes[-1]:
            target = self.allowed_batch_sizes[
                bisect.bisect_left(self.allowed_batch_sizes, rows)
            ]
        if target > rows:
            arrays = {
                key: np.concatenate([value, np.repeat(value[-1:], target - rows, axis=0)])
                for key, value in arrays.items()
            }
        outputs = run_signature(self.signature, arrays)
        if target > rows and not isinstance(outputs, ServingError):
            outputs = {key: value[:rows] for key, value in outputs.items()}
        return outputs

    def _execute(self, batch):
        """Runs one batch (on a batch thread or the loop); returns one result per task."""
        if len(batch) == 1:
            return [self._run_rows(batch[0].arrays, batch[0].rows)]
        try:
            arrays = {
                key: np.concatenate([task.arrays[key] for task in batch], axis=0)
                for key in batch[0].arrays
            }
        except Exception as e:  # noqa: BLE001
            return [internal(e, f"batch of {self.signature.key}")] * len(batch)
        outputs = self._run_rows(arrays, sum(task.rows for task in batch))
        if isinstance(outputs, ServingError):
            if outputs.code == grpc.StatusCode.INTERNAL:
                return [outputs] * len(batch)
            # A bad request among good ones: halve until it fails alone.
            half = len(batch) // 2
            return self._execute(batch[:half]) + self._execute(batch[half:])
        results, start = [], 0
        for task in batch:
            stop = start + task.rows
            results.append({key: value[start:stop] for key, value in outputs.items()})
            start = stop
        return results

    # --- shutdown ---

    async def _drain(self):
        self._stopped = True
        self._drained = asyncio.Event()
        self._dispatch()
        await self._drained.wait()

    async def _fail_queued(self):
        """Answer UNAVAILABLE to every request not yet running."""
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        tasks = [task for batch in self._ready for task in batch] + self._open
        self._ready.clear()
        self._open, self._open_rows, self._waiting_rows = [], 0, 0
        error = unavailable(
            f"The model version serving signature '{self.signature.key}' was unloaded before "
            "this request ran; retry."
        )
        self._finish(tasks, [error] * len(tasks))
        return len(tasks)

    def stop(self, timeout=30.0):
        """Answer every queued request, then stop (from any thread but the loop's).

        Requests still queued after `timeout` seconds (a stuck model) get UNAVAILABLE; the
        ones running finish when their batch does. Requests submitted afterwards run alone.
        """
        if not self.loop.is_closed() and self.loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(self._drain(), self.loop).result(timeout)
            except Exception as e:  # noqa: BLE001 (a stuck model must not block)
                try:
                    failed = asyncio.run_coroutine_threadsafe(
                        self._fail_queued(), self.loop
                    ).result(10)
                except Exception:  # noqa: BLE001
                    failed = "?"
                logger.warning(
                    "Signature %s: batcher did not drain in %.1f s (%r); %s queued requests "
                    "answered UNAVAILABLE.", self.signature.key, timeout, e, failed,
                )
        else:
            self._stopped = True
        if self._executor is not None:
            self._executor.shutdown(wait=False)


class EventLoopThread:
    """An asyncio event loop running forever on a daemon thread."""

    def __init__(self, name="grpc-loop"):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def call(self, coroutine, timeout=None):
        """Runs a coroutine on the loop from another thread and returns its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self, timeout=10.0):
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self.loop.close()


def _check_batch_sizes(max_batch_size, num_threads, allowed_batch_sizes):
    """Validates the batch sizes and thread count; returns `allowed_batch_sizes` as a list."""
    if int(max_batch_size) < 1:
        raise ValueError(f"max_batch_size must be >= 1; received {max_batch_size}.")
    if int(num_threads) < 0:
        raise ValueError(f"num_batch_threads must be >= 0; received {num_threads}.")
    allowed = [int(s) for s in allowed_batch_sizes or ()]
    if allowed and (allowed != sorted(set(allowed)) or allowed[0] < 1
                    or allowed[-1] != int(max_batch_size)):
        raise ValueError(
            f"allowed_batch_sizes must increase and end with max_batch_size "
            f"({max_batch_size}); received {allowed}."
        )
    return allowed


@dataclasses.dataclass(frozen=True)
class BatchingOptions:
    """How the server batches concurrent requests: TF Serving's `BatchingParameters`.

    The one home of the batching defaults: `ModelServer(batching=...)` and the
    `python -m serving.server` flags take theirs from here.

    Args:
        max_batch_size: the most rows in one batch.
        batch_timeout_ms: milliseconds a batch waits for more requests after its first.
        num_batch_threads: batches run in parallel per signature, each on its own thread; 0
            runs every batch on the event loop's thread (see `Batcher`).
        max_enqueued_batches: batches' worth of rows waiting beyond which requests get
            UNAVAILABLE.
        allowed_batch_sizes: optional increasing sizes, the last equal to `max_batch_size`,
            that batches are padded to.
        close_when_idle: run the open batch as soon as no batch is running instead of waiting
            `batch_timeout_ms` (needs `num_batch_threads >= 1`).

    Example:

    >>> options = BatchingOptions(max_batch_size=16, batch_timeout_ms=5.0)
    >>> server = ModelServer("models", batching=options)
    >>> BatchingOptions.from_file("serving/configs/batching_parameters.pbtxt")
    """

    max_batch_size: int = 32
    batch_timeout_ms: float = 2.0
    num_batch_threads: int = 1
    max_enqueued_batches: int = 100
    allowed_batch_sizes: tuple = ()
    close_when_idle: bool = False

    def __post_init__(self):
        allowed = _check_batch_sizes(self.max_batch_size, self.num_batch_threads,
                                     self.allowed_batch_sizes)
        if not float(self.batch_timeout_ms) >= 0:
            raise ValueError(f"batch_timeout_ms must be >= 0; received {self.batch_timeout_ms}.")
        if int(self.max_enqueued_batches) < 1:
            raise ValueError(
                f"max_enqueued_batches must be >= 1; received {self.max_enqueued_batches}."
            )
        for name, value in (("max_batch_size", int(self.max_batch_size)),
                            ("batch_timeout_ms", float(self.batch_timeout_ms)),
                            ("num_batch_threads", int(self.num_batch_threads)),
                            ("max_enqueued_batches", int(self.max_enqueued_batches)),
                            ("allowed_batch_sizes", tuple(allowed)),
                            ("close_when_idle", bool(self.close_when_idle))):
            object.__setattr__(self, name, value)  # a frozen dataclass normalises this way

    @classmethod
    def from_file(cls, path, **overrides):
        """Reads a TF Serving `--batching_parameters_file`; `overrides` win over its fields.

        Args:
            path: a text `BatchingParameters` file.
            **overrides: `BatchingOptions` fields set on top (e.g. from command-line flags).
        """
        from serving.config import read_batching_parameters_file

        values = read_batching_parameters_file(path)
        if "batch_timeout_micros" in values:
            values["batch_timeout_ms"] = values.pop("batch_timeout_micros") / 1000.0
        return cls(**{**values, **overrides})

    def batcher(self, signature, loop):
        """A `Batcher` of `signature` with these options, on the event loop `loop`."""
        return Batcher(
            signature, self.max_batch_size, self.batch_timeout_ms / 1000.0,
            num_threads=self.num_batch_threads,
            max_enqueued_rows=self.max_batch_size * self.max_enqueued_batches,
            allowed_batch_sizes=self.allowed_batch_sizes, close_when_idle=self.close_when_idle,
            loop=loop,
        )
