"""AsyncEngine: the engine core in its own process, with asyncio streams of outputs per request.

This process (the API's) keeps what touches clients: validation, tokenization, the output
processor (detokenization, stop strings, timings) and one asyncio queue per request. The engine
process (kvserve.engine_proc) keeps the model. Between them, two pipes carry batches:

  writer thread   the commands of many callers in one message
  reader thread   one message per engine step, processed here for every request at once, then
                  handed to each event loop in one call (one wake-up per step, not per token)

The engine process dying (a crash, the OOM killer, a fatal CUDA error) ends the reader's pipe:
every caller gets EngineDeadError and the death listeners run, so the server exits non-zero.
"""
from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import functools
import logging
import pickle
import queue
import subprocess
import threading
import time
import uuid
from typing import AsyncIterator, Callable

from kvserve import engine_proc
from kvserve.config import EngineConfig
from kvserve.engine import CoreOutput, OutputProcessor, validate_request
from kvserve.errors import EngineDeadError, EngineOverloadedError, InvalidRequestError
from kvserve.outputs import EngineStats, RequestOutput, StepStats
from kvserve.scheduler.sampling_params import SamplingParams

log = logging.getLogger("kvserve")
_CLOSE = object()
_QUIET = object()
KV_SNAPSHOT_MIN_AGE = 0.25     # seconds a KV map is handed out again, at least
KV_SNAPSHOT_COST_FACTOR = 20   # ... and 20x its build time: watching it costs the engine <= 5% of its time


class _Stream:
    """One request's outputs on their way to its caller. Outputs that arrive before the caller
    reads merge into one: a caller k steps behind reads one output carrying k tokens, so a busy
    server writes to each client once per read instead of once per token.

    With `quiet_after`, a reader waiting that long since the last output (or keep-alive) is woken
    with _QUIET (and handed what has gathered, if anything). One timer per stream, re-armed only when
    it fires: an output costs no timer. With `interval` k > 1, the reader gets the first output at
    once, then outputs of k tokens (the final one, an error or a quiet spell hands over fewer).

    With a `sink` (RequestStream.deliver_to), an output that is not the final one and finds the
    reader waiting with nothing unread goes to sink(output) instead, unless the sink refuses it."""
    __slots__ = ("loop", "items", "waiter", "ended", "quiet_after", "last", "timer", "interval", "delivered",
                 "sink")

    def __init__(self, loop: asyncio.AbstractEventLoop, quiet_after: float | None = None, interval: int = 1):
        self.loop = loop
        self.items: list = []
        self.waiter: asyncio.Future | None = None
        self.ended = False
        self.quiet_after = quiet_after or None
        self.last = loop.time()                 # when the reader last had news (an output or a keep-alive)
        self.timer: asyncio.TimerHandle | None = None
        self.interval = interval
        self.delivered = False                  # the reader has had an output (the first goes at once)
        self.sink: Callable[[RequestOutput], bool] | None = None

    def _ready(self) -> bool:
        if not self.items:
            return False
        if self.interval == 1 or self.ended or not self.delivered:
            return True
        first = self.items[0]
        return not isinstance(first, RequestOutput) or len(first.new_tokens) >= self.interval

    def put(self, item) -> None:
        """On the caller's loop: an output (merged into one still unread) or an exception. Nothing
        is taken after the first finished output or exception (a step's output can arrive after
        an abort already ended the stream)."""
        if self.ended:
            return
        if (self.sink is not None and self.waiter is not None and not self.items and self.interval == 1
                and type(item) is RequestOutput and not item.finished and self._sunk(item)):
            self.delivered = True
            if self.quiet_after is not None:
                self.last = self.loop.time()
            return
        self.ended = isinstance(item, BaseException) or item.finished
        last = self.items[-1] if self.items else None
        if isinstance(item, RequestOutput) and isinstance(last, RequestOutput):
            last.merge(item)
        else:
            self.items.append(item)
        if self.quiet_after is not None:
            self.last = self.loop.time()
        if self.waiter is not None and not self.waiter.done() and self._ready():
            self.waiter.set_result(None)

    def _sunk(self, item: RequestOutput) -> bool:
        """Offer the sink an output: True if it took it. A sink that raises is dropped (the other
        streams of the step still get their outputs) and the reader takes this one."""
        try:
            return self.sink(item)
        except (Exception, asyncio.CancelledError):  # noqa: BLE001 - a broken sink must not cost other requests their outputs
            log.exception("an output sink failed; its request's reader takes over")
            self.sink = None
            return False

    async def get(self):
        """The next item; _QUIET once `quiet_after` seconds pass with nothing new (nothing is cancelled)."""
        if not self._ready():
            self.waiter = self.loop.create_future()
            if self.quiet_after is not None and self.timer is None:
                self.timer = self.loop.call_at(self.last + self.quiet_after, self._tick)
            try:
                await self.waiter
            finally:
                self.waiter = None
            if not self.items:
                self.last = self.loop.time()
                return _QUIET
        self.delivered = True
        return self.items.pop(0)

    def _tick(self) -> None:
        self.timer = None
        if self.waiter is None or self.waiter.done() or self.quiet_after is None:   # nobody waits: the
            return                                      # next get() arms it again
        due = self.last + self.quiet_after
        if self.loop.time() >= due:
            self.waiter.set_result(None)
        else:                                           # news came since it was armed: wait the rest
            self.timer = self.loop.call_at(due, self._tick)

    def close(self) -> None:
        """The reader is done with it: no more keep-alive wake-ups (an abort's final output still
        comes, and wakes a reader that waits)."""
        self.quiet_after = None
        self.sink = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class RequestStream:
    """A request's outputs, read with `await next()`: a RequestOutput carrying what arrived since the
    previous read, None when `quiet_after` seconds passed without one (a keep-alive tick), or the
    request's exception (the engine refused or lost it). `finished` is set by the final output (or
    the exception); next() past it raises RuntimeError. `close()` always, on the caller's loop: it
    aborts the request if it has not finished (a reader waiting in next() then gets the final
    "abort" output) and frees its blocks; a stream dropped unclosed runs its request to the end."""
    __slots__ = ("engine", "request_id", "finished", "closed", "_stream")

    def __init__(self, engine: AsyncEngine, request_id: str, stream: _Stream):
        self.engine = engine
        self.request_id = request_id
        self.finished = False
        self.closed = False
        self._stream = stream

    async def next(self) -> RequestOutput | None:
        if self.finished:
            raise RuntimeError(f"request {self.request_id!r} has ended: its final output was read")
        item = await self._stream.get()
        if item is _QUIET:
            return None
        if isinstance(item, BaseException):
            self.finished = True      # the engine failed it (died, shut down): not the caller's abort
            self.close()
            raise item
        if item.finished:
            self.finished = True
            self.close()              # before the caller sees the end, which it may not read past
        return item

    def deliver_to(self, sink: Callable[[RequestOutput], bool] | None) -> None:
        """Hand outputs to `sink` as they arrive instead of waking the reader (None: stop). While the
        reader waits in next() with nothing unread, each output but the final one is passed to
        sink(output), on this loop, from the engine's one hand-out per step: a server writing every
        stream's chunk there wakes one task per step, not one per stream. sink must not block; it
        returns False to refuse an output, which next() then returns as usual. The final output,
        errors and keep-alive ticks always come through next(), and so does every output while
        `stream_interval` > 1 gathers them."""
        self._stream.sink = sink

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            if not self.finished:     # a reader still waiting gets the abort's final output
                self.engine.abort(self.request_id)
        except Exception as exc:      # noqa: BLE001 - (a finish listener that raises) the reader must not hang
            log.exception("aborting request %s failed", self.request_id)
            self._stream.put(RuntimeError(f"the request could not be aborted cleanly: {exc!r}"))
        finally:
            self._stream.close()
            self.engine._forget(self.request_id)


class AsyncEngine:
    """Thread-safe add / stream / abort. Neither process ever waits on a client: each request's
    outputs go into its own _Stream on the caller's event loop (unread ones merge)."""

    def __init__(self, cfg: EngineConfig, max_waiting_requests: int = 1024):
        """Starts the engine process and returns once it has loaded the model (raising its error)."""
        from kvserve import loader   # the tokenizer loads here while the engine process loads the model
        self.cfg = cfg
        self.max_waiting_requests = max_waiting_requests
        self._proc, self._commands, self._results = engine_proc.start(
            cfg, logging.getLogger("kvserve").getEffectiveLevel())
        self._exit_hook = functools.partial(engine_proc.wait_for_exit, self._proc, 0.0)
        atexit.register(self._exit_hook)   # never left running by a forgotten engine
        try:
            self.tokenizer = loader.load_tokenizer(cfg)
            message = self._results.recv_bytes()
        except EOFError:
            self._close_pipes()
            self._proc.wait(5.0)
            raise RuntimeError(f"the engine process exited with code {self._proc.returncode} while loading "
                               f"{cfg.model} (its log above says why)") from None
        except BaseException:
            self._close_pipes()
            engine_proc.wait_for_exit(self._proc, 0.0)
            raise
        kind, *body = pickle.loads(message)
        if kind == "error":
            self._close_pipes()
            engine_proc.wait_for_exit(self._proc, 5.0)
            raise body[0]
        info, self._stats = body
        self.max_model_len: int = info["max_model_len"]
        self.vocab_size: int = info["vocab_size"]
        self.kv_info: dict = info["kv_info"]
        self.model_config = info["model_config"]
        self.pid: int = info["pid"]            # the engine process

        self._processor = OutputProcessor(self.tokenizer)
        self._lock = threading.RLock()          # guards the processor and the streams (listeners may call back)
        self._streams: dict[str, _Stream] = {}
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._adds_sent = 0                     # written by callers only
        self._adds_taken = 0                    # as the engine process last reported it
        self._stopping = False
        self._started = threading.Event()
        self.dead_error: BaseException | None = None
        self._kv_snapshot: tuple[float, bytes, float] | None = None  # (time it arrived, JSON, build seconds)
        self._kv_waiter: concurrent.futures.Future | None = None    # the snapshot asked for, shared
        self._step_listeners: list[Callable[[StepStats], None]] = []
        self._death_listeners: list[Callable[[BaseException], None]] = []
        self._writer = threading.Thread(target=self._write, name="kvserve-engine-writer", daemon=True)
        self._reader = threading.Thread(target=self._read, name="kvserve-engine-reader", daemon=True)
        self._writer.start()
        self._reader.start()

    def _close_pipes(self) -> None:
        for conn in (self._commands, self._results):
            with contextlib.suppress(OSError):
                conn.close()
        atexit.unregister(self._exit_hook)

    # the engine's description
    @property
    def model_id(self) -> str:
        return self.cfg.model

    @property
    def is_running(self) -> bool:
        # no poll() of the process here (a waitpid per call): its death ends the reader's pipe,
        # which sets dead_error
        return self._started.is_set() and self.dead_error is None and not self._stopping

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def token_bytes(self, token_id: int) -> bytes:
        """A token's exact bytes (b"" for an id with no vocabulary entry)."""
        return self._processor.token_bytes(token_id)

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        validate_request(prompt_ids, params, self.max_model_len, self.vocab_size)

    def stats(self) -> EngineStats:
        """The snapshot the engine process sent with its last step: never waits for a step."""
        return self._stats

    async def kv_snapshot_json(self, max_age: float | None = None, timeout: float = 30.0) -> bytes:
        """Both KV tiers block by block and every unfinished request's blocks, as JSON (GET /kv;
        docs/kv-map.md describes it). The engine process builds and encodes it between two steps;
        callers asking at the same time share one, and one younger than max_age seconds is handed
        out again. By default max_age is 0.25 s, or 20 times what the last map took to build if more:
        on a large pool a map costs the engine a pause between two steps, and watching it must not
        take more than 5% of the engine's time.
        Raises EngineDeadError if the engine is gone, TimeoutError if no snapshot came in time, and
        RuntimeError if the engine could not build one."""
        with self._lock:
            if self.dead_error is not None or self._stopping:
                raise EngineDeadError("the engine is not running")
            if self._kv_snapshot is not None:
                arrived, body, cost = self._kv_snapshot
                if max_age is None:
                    max_age = max(KV_SNAPSHOT_MIN_AGE, KV_SNAPSHOT_COST_FACTOR * cost)
                if time.monotonic() - arrived <= max_age:
                    return body
            if self._kv_waiter is None:
                self._kv_waiter = concurrent.futures.Future()
                self._outbox.put(("kv_snapshot",))
            waiter = self._kv_waiter
        # shield: a caller that gives up must not cancel the snapshot the others wait for
        return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(waiter)), timeout)

    def _on_kv_snapshot(self, snapshot: bytes | BaseException, cost: float) -> None:
        with self._lock:
            if not isinstance(snapshot, BaseException):
                self._kv_snapshot = (time.monotonic(), snapshot, cost)
            waiter, self._kv_waiter = self._kv_waiter, None
        if waiter is None:
            return
        if isinstance(snapshot, BaseException):
            waiter.set_exception(RuntimeError(f"the engine could not build the KV map: {snapshot!r}"))
        else:
            waiter.set_result(snapshot)

    def num_unfinished(self) -> int:
        return len(self._streams)

    def add_step_listener(self, fn: Callable[[StepStats], None]) -> None:
        """fn(StepStats) after every engine step (from the reader thread)."""
        self._step_listeners.append(fn)

    def add_finish_listener(self, fn: Callable[[RequestOutput], None]) -> None:
        """fn(RequestOutput) for every request that ends, aborted ones included."""
        self._processor.finish_listeners.append(fn)

    def add_death_listener(self, fn: Callable[[BaseException], None]) -> None:
        """fn(error) once, from the reader thread, if the engine dies (after every request was failed);
        at once if it already has."""
        self._death_listeners.append(fn)
        if self.dead_error is not None:
            fn(self.dead_error)

    # lifecycle
    def start(self) -> None:
        self._started.set()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Abort what runs, stop the engine process (terminate, then kill, if it does not exit)."""
        self._stopping = True
        self._started.set()
        self._outbox.put(("shutdown",))
        self._outbox.put(_CLOSE)
        engine_proc.wait_for_exit(self._proc, timeout)
        self._reader.join(timeout)
        self._fail_all(EngineDeadError("the engine was shut down"))
        self._results.close()
        atexit.unregister(self._exit_hook)

    # requests
    def add_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
                    quiet_after: float | None = None, parent_request_id: str | None = None,
                    stream_interval: int = 1) -> RequestStream:
        """Submit a request; read its outputs from the RequestStream returned, on this event loop, and
        close it (closing early aborts the request and frees its blocks). Raises at once what refuses
        it here: EngineDeadError, EngineOverloadedError (the waiting queue is full) or
        InvalidRequestError. parent_request_id: a running request with the same prompt whose prompt
        KV blocks this one shares (another of n outputs for one prompt: the prompt is prefilled once).

        Each output carries what arrived since the caller's previous read (one token per engine
        step, or several if the caller fell behind). With `quiet_after`, a read returns None each
        time that many seconds pass without an output (for keep-alives). With `stream_interval` k,
        after the first output a read waits for k tokens (or the end, or a quiet spell): fewer,
        larger outputs for a caller that writes each one to a client."""
        if stream_interval < 1:
            raise ValueError(f"stream_interval must be at least 1, got {stream_interval}")
        if not self.is_running:
            raise EngineDeadError(f"the engine is not running: {self.dead_error!r}")
        prompt_ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self.validate(prompt_ids, params)
        if self._adds_sent - self._adds_taken + self._stats.num_waiting >= self.max_waiting_requests:
            raise EngineOverloadedError(f"{self.max_waiting_requests} requests are already waiting; "
                                        "try again later")
        request_id = request_id or uuid.uuid4().hex
        stream = _Stream(asyncio.get_running_loop(), quiet_after, stream_interval)
        arrival = time.monotonic()
        with self._lock:
            if request_id in self._streams:
                raise InvalidRequestError(f"request id {request_id!r} is already in use", param="request_id")
            self._processor.add(request_id, prompt_ids, params, arrival)
            self._streams[request_id] = stream
        if not self.is_running:   # died (or stopped) while we registered: nobody would answer us
            self._forget(request_id)
            raise EngineDeadError(f"the engine is not running: {self.dead_error!r}")
        self._adds_sent += 1
        self._outbox.put(("add", request_id, prompt_ids, params, arrival, parent_request_id))
        return RequestStream(self, request_id, stream)

    async def generate(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
                       quiet_after: float | None = None,
                       parent_request_id: str | None = None) -> AsyncIterator[RequestOutput | None]:
        """add_request's outputs as an async iterator, ending after the final one; leaving the loop
        early aborts the request and frees its blocks."""
        stream = self.add_request(prompt, params, request_id, quiet_after, parent_request_id)
        try:
            while not stream.finished:
                yield await stream.next()
        finally:
            stream.close()

    def abort(self, request_id: str) -> None:
        """End a request now (its finish listeners see "abort") and free its blocks in the engine."""
        self._outbox.put(("abort", request_id))        # first: the engine frees the blocks whatever happens here
        with self._lock:
            out = self._processor.abort(request_id)
            target = self._streams.pop(request_id, None)
        if target is not None and out is not None:     # a caller still listening (a drain's abort) gets the final output
            with contextlib.suppress(RuntimeError):     # unless its event loop is closed
                target.loop.call_soon_threadsafe(target.put, out)

    def _forget(self, request_id: str) -> None:
        with self._lock:
            self._streams.pop(request_id, None)
            self._processor.states.pop(request_id, None)

    # the two pipe threads
    def _write(self) -> None:
        """Send queued commands, all that wait in one message."""
        try:
            while True:
                batch = [self._outbox.get()]
                while True:
                    try:
                        batch.append(self._outbox.get_nowait())
                    except queue.Empty:
                        break
                close = any(cmd is _CLOSE for cmd in batch)
                message = self._encode([cmd for cmd in batch if cmd is not _CLOSE])
                try:
                    if message is not None:
                        self._commands.send_bytes(message)
                except OSError:   # the engine process is gone; the reader reports it
                    return
                if close:
                    self._commands.close()
                    return
        except BaseException as exc:  # noqa: BLE001 - without a writer nothing reaches the engine
            log.exception("the engine writer died")
            self._die(exc)

    def _encode(self, batch: list) -> bytes | None:
        """The batch pickled; a command that cannot be (a caller's odd SamplingParams) fails alone."""
        if not batch:
            return None
        try:
            return pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:  # noqa: BLE001
            kept = []
            for cmd in batch:
                try:
                    pickle.dumps(cmd, protocol=pickle.HIGHEST_PROTOCOL)
                    kept.append(cmd)
                except Exception as exc:  # noqa: BLE001
                    self._refuse(cmd[1], InvalidRequestError(f"the request cannot be sent to the engine: {exc}"))
            return pickle.dumps(kept, protocol=pickle.HIGHEST_PROTOCOL) if kept else None

    def _refuse(self, request_id: str, exc: BaseException) -> None:
        with self._lock:
            self._processor.states.pop(request_id, None)
            stream = self._streams.pop(request_id, None)
        if stream is not None:
            with contextlib.suppress(RuntimeError):
                stream.loop.call_soon_threadsafe(stream.put, exc)

    def _read(self) -> None:
        try:
            while True:
                message = pickle.loads(self._results.recv_bytes())
                if message[0] == "dead":
                    raise RuntimeError(f"the engine process died: {message[1]}")
                if message[0] == "kv_snapshot":
                    self._on_kv_snapshot(*message[1:])
                    continue
                self._on_step(engine_proc.unpack_outputs(message[1]), *message[2:])
        except (EOFError, OSError, RuntimeError) as exc:
            if self._stopping and not isinstance(exc, RuntimeError):
                return
            try:
                self._proc.wait(1.0)
            except subprocess.TimeoutExpired:
                pass
            error = exc if isinstance(exc, RuntimeError) else RuntimeError(
                f"the engine process exited (code {self._proc.returncode})")
            self._die(error)
        except BaseException as exc:  # noqa: BLE001 - a bug here must not leave callers waiting
            log.exception("the engine reader died")
            self._die(exc)

    def _on_step(self, outputs: list, stats: EngineStats, step_stats: StepStats | None, adds_taken: int) -> None:
        now = time.monotonic()
        deliveries: dict[asyncio.AbstractEventLoop, list] = {}
        with self._lock:
            refused = [out for out in outputs if not isinstance(out, CoreOutput)]   # (request_id, error)
            results, stopped = self._processor.process([out for out in outputs if isinstance(out, CoreOutput)], now)
            for request_id, exc in refused:
                self._processor.states.pop(request_id, None)
                self._queue_for(deliveries, request_id, exc)
            for out in results:
                self._queue_for(deliveries, out.request_id, out)
        for request_id in stopped:
            self._outbox.put(("stop", request_id))
        self._stats, self._adds_taken = stats, adds_taken
        for loop, items in deliveries.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:   # that caller's event loop is closed: nobody reads these; free them
                for stream, _ in items:
                    self._orphaned(stream)
        if step_stats is not None:
            for fn in self._step_listeners:
                fn(step_stats)

    def _orphaned(self, stream: _Stream) -> None:
        with self._lock:
            request_ids = [rid for rid, s in self._streams.items() if s is stream]
        for request_id in request_ids:
            self.abort(request_id)

    def _queue_for(self, deliveries: dict, request_id: str, item) -> None:
        target = self._streams.get(request_id)
        if target is not None:
            deliveries.setdefault(target.loop, []).append((target, item))

    def _die(self, error: BaseException) -> None:
        with self._lock:
            if self.dead_error is not None:     # the reader and the writer may both see the end
                return
            self.dead_error = error
        log.error("the engine died: %s", error)
        self._fail_all(EngineDeadError(f"the engine died: {error!r}"))
        self._outbox.put(_CLOSE)
        engine_proc.wait_for_exit(self._proc, 0.0)   # gone already, or no longer reachable: end it
        for fn in self._death_listeners:
            fn(error)

    def _fail_all(self, error: EngineDeadError) -> None:
        """Every caller still waiting gets the error, those whose add is still in the pipe too."""
        self._stopping = True
        with self._lock:
            targets = list(self._streams.values())
            waiter, self._kv_waiter = self._kv_waiter, None
        if waiter is not None:
            waiter.set_exception(error)
        for stream in targets:
            try:
                stream.loop.call_soon_threadsafe(stream.put, error)
            except RuntimeError:   # that caller's loop is closed
                pass


def _put_all(items: list) -> None:
    for stream, item in items:
        stream.put(item)
