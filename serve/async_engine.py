"""Drive an `fdllm.Engine` from asyncio: one background thread steps the engine (continuous
batching), request handlers await per-request queues.

The engine is not thread-safe, so every call into it (add, abort, step) happens on the stepping
thread; handlers talk to it through a command queue and get answers through futures. Tokens flow
back through `loop.call_soon_threadsafe`. Ray-free, so it runs under Serve and in plain tests alike.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from dataclasses import dataclass, replace

from fdllm.engine import Engine, GenerationResult, SamplingParams, SequenceLogprobs

log = logging.getLogger(__name__)


class EngineOverloaded(Exception):
    """Too many requests waiting for admission: the caller should answer 503 and the client retry."""


class EngineDead(Exception):
    """The stepping thread crashed; the replica must be restarted (health checks report it)."""


class RequestFailed(Exception):
    """A step could not serve this request (the engine logged why and keeps serving the others)."""


class InjectedFault(RuntimeError):
    """The failure `AsyncEngine.add(..., inject_fault=True)` plants inside a step (chaos tests)."""


async def interleave(streams: list[RequestStream | AsyncGenerator]) -> AsyncIterator[tuple[int, object]]:
    """(i, event) of several streams as their events come (a request's choices). The first error of
    any stream is raised and, like closing this iterator (the client gone), ends them all: each is
    cancelled where it waits and closed, so its request aborts."""
    events: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, stream: RequestStream | AsyncGenerator) -> None:
        try:
            async for event in stream:
                events.put_nowait((i, event))
        except Exception as exc:  # noqa: BLE001 - raised to the consumer below
            events.put_nowait((i, exc))
        finally:
            events.put_nowait((i, done))

    tasks = [asyncio.ensure_future(pump(i, stream)) for i, stream in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            i, event = await events.get()
            if event is done:
                left -= 1
            elif isinstance(event, Exception):
                raise event
            else:
                yield i, event
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in streams:  # one whose pump never started was never read, so never cancelled either
            await stream.aclose()


async def add_all(adds: list[Awaitable[RequestStream]]) -> list[RequestStream]:
    """Each `AsyncEngine.add` of a request's choices, awaited together: their streams once every choice is
    admitted (not once each has tokens: a choice queued behind running requests may wait a whole decode
    for its first, and a stream that sent nothing for that long looks stalled to its client). The first
    refusal is raised as soon as it comes; it, like cancelling this call (the client gone), closes every
    stream already added, so no choice decodes on for nobody."""
    tasks = [asyncio.ensure_future(add) for add in adds]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        failed = next((t.exception() for t in tasks if t in done and t.exception() is not None), None)
        if failed is not None:
            raise failed
        return [t.result() for t in tasks]
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # an add cancelled on its way aborts itself
        for task in tasks:
            if not task.cancelled() and task.exception() is None:
                await task.result().aclose()
        raise


def _answer(future: concurrent.futures.Future, result: object = None, exc: BaseException | None = None) -> bool:
    """Hand a command's outcome to its handler; False if the handler is gone (cancelled while its client
    disconnected: setting a cancelled future raises, which would stop the stepping thread)."""
    if not future.set_running_or_notify_cancel():
        return False
    if exc is None:
        future.set_result(result)
    else:
        future.set_exception(exc)
    return True


@dataclass(frozen=True)
class TokenDelta:
    token_ids: list[int]


class RequestStream:
    """The events of a request the engine has admitted (`AsyncEngine.add`): `TokenDelta`s as tokens become
    final, then the `GenerationResult`. Closing it before its end, or cancelling a read of it (the
    client gone), aborts the request and frees its pages. Raises RequestFailed when a step fails the
    request, EngineDead when the engine loop ends under it."""

    def __init__(self, engine: AsyncEngine, request_id: str, events: asyncio.Queue) -> None:
        self.request_id = request_id
        self._engine, self._events = engine, events
        self._held: object | None = None  # an event read past a run of deltas, sent next
        self._open = True

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> TokenDelta | GenerationResult:
        if not self._open:
            raise StopAsyncIteration
        try:
            event = await self._next_event()
        except asyncio.CancelledError:
            self._abort()
            raise
        # Under load several deltas queue up between two reads: sent as one, since each chunk costs a
        # trip through the HTTP proxy.
        while isinstance(event, TokenDelta) and not self._events.empty():
            following = self._events.get_nowait()
            if not isinstance(following, TokenDelta):
                self._held = following
                break
            event = TokenDelta(event.token_ids + following.token_ids)
        if isinstance(event, BaseException):
            self._open = False
            raise event
        if isinstance(event, GenerationResult):
            self._open = False
            if event.finish_reason == "error":
                raise RequestFailed(f"request {self.request_id} failed inside the engine ({event.error})")
        return event

    async def _next_event(self) -> object:
        if self._held is not None:
            event, self._held = self._held, None
            return event
        return await self._events.get()

    async def aclose(self) -> None:
        self._abort()

    def __del__(self) -> None:  # the backstop of a stream its handler never read nor closed (a response never sent)
        self._abort()

    def _abort(self) -> None:
        if self._open:
            self._open = False
            self._engine._send("abort", self.request_id)


@dataclass
class EngineMetrics:
    steps: int = 0
    step_seconds_total: float = 0.0
    last_step_seconds: float = 0.0


class AsyncEngine:
    """`add()` admits a request and returns its `RequestStream`; `generate()` is both in one: `TokenDelta`s
    as tokens become final, then the `GenerationResult`."""

    def __init__(self, engine: Engine, max_waiting: int = 256, idle_wait_s: float = 0.05) -> None:
        self.engine = engine
        self.max_waiting = max_waiting
        self.metrics = EngineMetrics()
        self._idle_wait_s = idle_wait_s
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._stopped = threading.Event()
        self._error: BaseException | None = None
        self._scores: list[tuple[tuple, concurrent.futures.Future]] = []  # waiting for cache pages (stepping thread's)
        self._thread = threading.Thread(target=self._run, name="fdllm-engine-loop", daemon=True)
        self._thread.start()

    # ---- called from the event loop -------------------------------------------------------------
    async def add(
        self, prompt: str | list[int], params: SamplingParams, request_id: str, inject_fault: bool = False,
    ) -> RequestStream:
        """Admit one request: its event stream once the engine has it (it may still wait for a batch
        slot). Raises ValueError (bad request), EngineOverloaded or EngineDead if it is refused.
        `inject_fault` makes the request's first step raise inside the engine (for chaos tests; the
        engine must fail it alone and go on)."""
        self.check_alive()
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def deliver(event: TokenDelta | GenerationResult | BaseException) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the consumer's loop is closed: nobody is listening any more
                pass

        def on_tokens(_rid: str, token_ids: list[int], _finished: bool) -> None:
            deliver(TokenDelta(list(token_ids)))

        try:
            await self._call("add", prompt, params, request_id, on_tokens, deliver, inject_fault)  # ValueError -> caller
        except asyncio.CancelledError:  # the stepping thread may have added it just before: it must not run on
            self._send("abort", request_id)
            raise
        return RequestStream(self, request_id, events)

    async def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str, inject_fault: bool = False,
    ) -> AsyncIterator[TokenDelta | GenerationResult]:
        """Stream one request (`add`, then its `RequestStream`). Cancelling the consumer (client gone)
        aborts it and frees its pages. Raises `add`'s refusals before the first event."""
        stream = await self.add(prompt, params, request_id, inject_fault)
        try:
            async for event in stream:
                yield event
        finally:
            await stream.aclose()

    async def score(self, token_ids: list[int], top_logprobs: int, score_from: int = 1,
                    cache_salt: str | None = None) -> SequenceLogprobs:
        """`Engine.score` of one sequence (from position `score_from`, under its request's `cache_salt`), run
        on the stepping thread between two steps. When running requests hold too much of the cache it waits
        for some to finish (never fails for it). Raises ValueError (bad request) or EngineDead."""
        self.check_alive()
        return await self._call("score", token_ids, top_logprobs, score_from, cache_salt)

    def check_alive(self) -> None:
        if self._error is not None or not self._thread.is_alive():
            raise EngineDead(f"engine loop stopped: {self._error!r}")

    def stats(self) -> dict[str, int | float]:
        e = self.engine
        # free pages net of those promised to admitted requests (all of a request's, with `deterministic`)
        return {"running": e.num_running, "waiting": e.num_waiting, "free_pages": e.allocator.num_unreserved,
                "cached_pages": e.num_cached_pages, "total_pages": e.num_pages, "preemptions": e.num_preemptions,
                "steps": self.metrics.steps,
                "last_step_seconds": self.metrics.last_step_seconds}

    def shutdown(self) -> None:
        self._stopped.set()
        self._wakeup.set()
        self._thread.join(timeout=10)

    async def _call(self, *command) -> object:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._send(*command, future=fut)
        return await asyncio.wrap_future(fut)

    def _send(self, *command, future: concurrent.futures.Future | None = None) -> None:
        self._commands.put((command, future))
        self._wakeup.set()

    # ---- the stepping thread --------------------------------------------------------------------
    def _run(self) -> None:
        done_callbacks: dict[str, object] = {}
        try:
            while not self._stopped.is_set():
                self._drain_commands(done_callbacks)
                self._run_scores()
                if not self.engine.has_unfinished():
                    self._wakeup.wait(self._idle_wait_s)
                    self._wakeup.clear()
                    continue
                start = time.perf_counter()
                finished = self.engine.step()
                self._record_step(time.perf_counter() - start)
                for result in finished:
                    callback = done_callbacks.pop(result.request_id, None)
                    if callback is not None:
                        callback(result)
        except BaseException as exc:  # noqa: BLE001 - the loop must report, not vanish
            log.exception("engine loop crashed; failing %d in-flight request(s)", len(done_callbacks))
            self._error = exc
            self._fail_pending(done_callbacks, EngineDead(f"engine loop crashed: {exc!r}"))
            return
        self._fail_pending(done_callbacks, EngineDead("engine shut down"))

    def _fail_pending(self, done_callbacks: dict[str, object], error: EngineDead) -> None:
        """The loop has ended: every request still running or queued, every score and every command
        not yet read gets `error` (a handler waiting on any of them would wait forever)."""
        for callback in done_callbacks.values():
            callback(error)
        for _, future in self._scores:
            _answer(future, exc=error)
        while True:
            try:
                _, future = self._commands.get_nowait()
            except queue.Empty:
                return
            if future is not None:
                _answer(future, exc=error)

    def _drain_commands(self, done_callbacks: dict[str, object]) -> None:
        while True:
            try:
                (kind, *args), future = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                if future.cancelled():  # the handler is gone (client disconnected): nothing to run
                    continue
                prompt, params, rid, on_tokens, on_done, inject_fault = args
                try:
                    if self.engine.num_waiting >= self.max_waiting:
                        raise EngineOverloaded(f"{self.engine.num_waiting} requests already waiting; retry later")
                    self.engine.add_request(prompt, params, request_id=rid, on_tokens=on_tokens)
                    if inject_fault:
                        self._plant_fault(rid)
                except Exception as exc:  # noqa: BLE001 - handed to the awaiting handler
                    _answer(future, exc=exc)
                    continue
                done_callbacks[rid] = on_done
                if not _answer(future, rid):  # cancelled meanwhile: nobody will read its tokens
                    done_callbacks.pop(rid)
                    self.engine.abort(rid)
            elif kind == "score":
                self._scores.append((args, future))
            elif kind == "abort":
                (rid,) = args
                if done_callbacks.pop(rid, None) is not None:
                    self.engine.abort(rid)

    def _run_scores(self) -> None:
        """Score, in one call (so they share forwards), the waiting sequences the free pages hold now, in
        order; the rest wait for the next step to free pages (with no request running every page is
        free). One that could never fit goes with them, for `Engine.score` to refuse."""
        free, batch, waiting, held = self.engine.num_free_pages, [], [], 0
        for args, future in self._scores:
            if future.cancelled():
                continue
            pages = self.engine.score_pages(args[0])
            if pages > self.engine.num_pages:  # could never fit: Engine.score says so
                batch.append((args, future))
            elif pages <= free:
                free -= pages
                batch.append((args, future))
            else:
                if not waiting:  # the oldest waiting score's pages are not given to requests arriving after it
                    held = pages
                waiting.append((args, future))
        self._scores = waiting
        self.engine.hold_free_pages(held)
        if not batch:
            return
        try:  # the largest top_logprobs of the batch, each answer cut to its own
            scored = self.engine.score([ids for (ids, *_), _ in batch], max(top for (_, top, *_), _ in batch),
                                       [start for (_, _, start, _), _ in batch], [salt for (*_, salt), _ in batch])
        except ValueError:  # a bad request in the batch (checked before anything ran): each on its own
            scored = None
        except Exception as exc:  # noqa: BLE001 - the forward failed: so does every request of the batch
            for _, future in batch:
                _answer(future, exc=exc)
            return
        for i, ((ids, top, start, salt), future) in enumerate(batch):
            try:
                one = self.engine.score([ids], top, start, salt)[0] if scored is None else scored[i]
            except Exception as exc:  # noqa: BLE001 - handed to the awaiting handler
                _answer(future, exc=exc)
                continue
            _answer(future, replace(one, top_logprobs=[alternatives[:top] for alternatives in one.top_logprobs]))

    def _plant_fault(self, request_id: str) -> None:
        """Make the request raise inside a step once it has streamed its first tokens (so a stream
        fails midway), as a bug in applying a step would."""
        seq = self.engine.scheduler.find(request_id)
        apply = seq.apply

        def apply_then_fail(*args: object, **kwargs: object) -> list[int]:
            if seq.output:
                raise InjectedFault(f"fault injected into request {request_id}")
            return apply(*args, **kwargs)

        seq.apply = apply_then_fail

    def _record_step(self, seconds: float) -> None:
        m = self.metrics
        m.steps += 1
        m.step_seconds_total += seconds
        m.last_step_seconds = seconds
