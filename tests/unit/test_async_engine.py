"""The asyncio driver of the engine used by Serve replicas, without Ray."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import pytest

import fdllm
from serve.async_engine import AsyncEngine, EngineOverloaded, RequestFailed, TokenDelta, interleave
from tests.helpers import slow_steps


@pytest.fixture
def driver(dllm_dir):
    drv = AsyncEngine(fdllm.Engine.from_pretrained(dllm_dir))
    yield drv
    drv.shutdown()


async def _collect(drv: AsyncEngine, prompt, params, rid: str, inject_fault: bool = False):
    deltas, result = [], None
    async for event in drv.generate(prompt, params, rid, inject_fault=inject_fault):
        if isinstance(event, TokenDelta):
            deltas += event.token_ids
        else:
            result = event
    return deltas, result


def test_concurrent_streams_deliver_every_token_and_equal_generate(driver, dllm_dir):
    params = fdllm.SamplingParams(max_new_tokens=24, temperature=0.0)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15, 16], [20]]

    async def main():
        return await asyncio.gather(*(_collect(driver, p, params, f"r{i}") for i, p in enumerate(prompts)))

    outs = asyncio.run(main())
    alone = fdllm.Engine.from_pretrained(dllm_dir).generate(prompts, params)
    for (deltas, result), expect in zip(outs, alone):
        assert result.token_ids == expect.token_ids
        assert deltas == result.token_ids  # streamed deltas add up to the answer, in order, none lost
    assert driver.stats()["free_pages"] == driver.stats()["total_pages"]


def test_cancelled_consumer_aborts_and_frees_pages(driver):
    params = fdllm.SamplingParams(max_new_tokens=400, temperature=0.0, mode="ar")

    async def main():
        stream = driver.generate([5, 6, 7], params, "long")
        first = await anext(stream)
        await stream.aclose()  # the client went away
        return first

    assert isinstance(asyncio.run(main()), TokenDelta)
    for _ in range(100):
        stats = driver.stats()
        if stats["running"] == 0 and stats["free_pages"] == stats["total_pages"]:
            break
        asyncio.run(asyncio.sleep(0.05))
    assert stats["running"] == 0 and stats["free_pages"] == stats["total_pages"], stats


def test_bad_request_is_raised_to_the_caller(driver):
    async def first_event():
        return await anext(driver.generate([], fdllm.SamplingParams(), "empty"))

    with pytest.raises(ValueError, match="empty"):
        asyncio.run(first_event())


def test_full_waiting_queue_is_overload_not_a_hang(dllm_dir):
    engine = fdllm.Engine.from_pretrained(dllm_dir, engine_config=fdllm.EngineConfig(max_num_seqs=1))
    drv = AsyncEngine(engine, max_waiting=1)
    long = fdllm.SamplingParams(max_new_tokens=400, temperature=0.0, mode="ar")

    async def main():
        running = drv.generate([5, 6], long, "running")
        await anext(running)  # admitted: the only running slot is taken
        queued = drv.generate([7, 8], long, "queued")
        pending = asyncio.ensure_future(anext(queued))
        while drv.stats()["waiting"] < 1:
            await asyncio.sleep(0.01)
        with pytest.raises(EngineOverloaded):
            await anext(drv.generate([9], long, "rejected"))
        pending.cancel()  # the queued client hangs up too: its generator aborts the request
        with contextlib.suppress(asyncio.CancelledError):
            await pending
        await running.aclose()
        while drv.stats()["running"] or drv.stats()["waiting"]:
            await asyncio.sleep(0.01)
        assert drv.stats()["free_pages"] == drv.stats()["total_pages"]

    try:
        asyncio.run(main())
    finally:
        drv.shutdown()


def test_a_request_failing_inside_a_step_fails_alone(driver, dllm_dir):
    params = fdllm.SamplingParams(max_new_tokens=24, temperature=0.0)
    prompts = [[5, 6, 7], [8, 9, 10, 11], [20]]

    async def main():
        async def faulty():
            deltas = []
            with pytest.raises(RequestFailed, match="fault injected"):
                async for event in driver.generate(prompts[1], params, "faulty", inject_fault=True):
                    deltas += event.token_ids
            return deltas

        return await asyncio.gather(_collect(driver, prompts[0], params, "a"), faulty(),
                                    _collect(driver, prompts[2], params, "b"))

    first, streamed_before_failing, last = asyncio.run(main())
    alone = fdllm.Engine.from_pretrained(dllm_dir).generate(prompts, params)
    assert streamed_before_failing, "the fault is armed after the first tokens: the stream fails midway"
    assert streamed_before_failing == alone[1].token_ids[: len(streamed_before_failing)]
    assert first[1].token_ids == alone[0].token_ids and last[1].token_ids == alone[2].token_ids
    assert driver.stats()["free_pages"] == driver.stats()["total_pages"]
    driver.check_alive()
    _, again = asyncio.run(_collect(driver, prompts[1], params, "again"))
    assert again.token_ids == alone[1].token_ids


def _pause_next_step(drv: AsyncEngine) -> tuple[threading.Event, threading.Event]:
    """The driver's next step, once begun (`paused` is set), waits until `resume` is set: commands sent
    meanwhile queue up, and the stepping thread reads them together after that step."""
    paused, resume = threading.Event(), threading.Event()
    step = drv.engine.step

    def paused_step():
        if not resume.is_set():
            paused.set()
            resume.wait()
        return step()

    drv.engine.step = paused_step
    return paused, resume


def _hold_after_first_tokens(drv: AsyncEngine, request_id: str) -> threading.Event:
    """Once the request has streamed tokens, the driver's steps do nothing until the returned event is
    set, while commands and scores still run between them: the test sees the cache exactly as it was
    then (a timed pause lets the stepping thread take another page first on a loaded machine)."""
    release = threading.Event()
    step = drv.engine.step

    def held_step():
        seq = drv.engine.scheduler.find(request_id)
        if seq is not None and seq.output and not release.wait(0.01):
            return []
        return step()

    drv.engine.step = held_step
    return release


def test_a_client_gone_while_its_request_waits_to_be_added_harms_nothing(driver):
    """A handler cancelled before the stepping thread reads its command (its client hung up during a
    long step) is skipped: setting the cancelled future's result would have stopped the thread."""
    long = fdllm.SamplingParams(max_new_tokens=400, temperature=0.0, mode="ar")
    slow_steps(driver.engine, 0.2)  # commands queue up meanwhile

    async def main():
        running = driver.generate([5, 6], long, "running")
        await anext(running)
        hung_up = asyncio.ensure_future(anext(driver.generate([7, 8], long, "hung-up")))
        await asyncio.sleep(0.05)  # queued behind the slow step
        hung_up.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await hung_up
        await asyncio.sleep(0.5)  # two more steps: the command was read
        await running.aclose()

    asyncio.run(main())
    driver.check_alive()
    assert driver.engine.scheduler.find("hung-up") is None
    _, result = asyncio.run(_collect(driver, [9], fdllm.SamplingParams(max_new_tokens=4), "after"))
    assert len(result.token_ids) == 4


def test_score_runs_between_steps_and_waits_for_pages(causal_dllm_dir):
    """A score the cache has no room for now waits for the running request to finish (no error), and
    is what the engine scores alone; the request running beside it decodes what it decodes alone."""
    engine = fdllm.Engine.from_pretrained(causal_dllm_dir, engine_config=fdllm.EngineConfig(num_pages=6))
    drv = AsyncEngine(engine)
    params = fdllm.SamplingParams(max_new_tokens=16, temperature=0.0)
    alone = fdllm.Engine.from_pretrained(causal_dllm_dir)
    tokens = list(range(5, 35))  # 4 pages: more than are free while the request runs

    async def main():
        release = _hold_after_first_tokens(drv, "running")  # the request holds its pages until released
        stream = drv.generate([5] * 30, params, "running")
        await anext(stream)  # its first tokens: prompt prefilled, first block open
        assert drv.stats()["free_pages"] == 2
        big = asyncio.ensure_future(drv.score(tokens, 2))
        small = await drv.score([7, 8, 9], 1)  # fits beside the request: answered at once
        await asyncio.sleep(0.2)  # steps go round meanwhile
        assert not big.done()
        assert engine.scheduler.held_pages == engine.score_pages(tokens)  # not given to later requests
        release.set()
        result = [event async for event in stream][-1]
        big_result = await big
        await asyncio.sleep(0.05)  # the next round between steps lets them go
        assert engine.scheduler.held_pages == 0
        return result, big_result, small

    try:
        result, big, small = asyncio.run(main())
        assert result.token_ids == alone.generate([[5] * 30], params)[0].token_ids
        assert big == alone.score([tokens], top_logprobs=2)[0] and small == alone.score([[7, 8, 9]], top_logprobs=1)[0]
        with pytest.raises(ValueError, match="top_logprobs"):
            asyncio.run(drv.score(tokens, -1))
        with pytest.raises(ValueError, match="KV pages"):  # more than the whole cache: refused, never waiting
            asyncio.run(asyncio.wait_for(drv.score(list(range(5, 65)), 0), timeout=30))
        drv.check_alive()
    finally:
        drv.shutdown()


def test_interleave_delivers_every_event_and_an_error_or_a_close_ends_every_stream():
    """A request's choices stream together: every event with its stream's index, in each stream's
    order; the first error, or the consumer going away, closes the other streams (their requests abort)."""
    closed: list[int] = []

    async def stream(i: int, n: int, fail_at: int | None = None, delay: float = 0.0):
        try:
            for k in range(n):
                await asyncio.sleep(delay)
                if k == fail_at:
                    raise RequestFailed(f"stream {i} failed")
                yield (i, k)
        finally:
            closed.append(i)

    async def collect(streams):
        return [event async for event in interleave(streams)]

    events = asyncio.run(collect([stream(0, 3, delay=0.01), stream(1, 5), stream(2, 0)]))
    assert sorted(events) == [(0, (0, k)) for k in range(3)] + [(1, (1, k)) for k in range(5)]
    assert [e for e in events if e[0] == 1] == [(1, (1, k)) for k in range(5)]
    assert sorted(closed) == [0, 1, 2]

    closed.clear()

    async def failing():
        with pytest.raises(RequestFailed, match="stream 1"):
            await collect([stream(0, 100, delay=0.01), stream(1, 3, fail_at=1), stream(2, 100, delay=0.01)])
        await asyncio.sleep(0.05)
        return sorted(closed)  # while the loop still runs (asyncio.run cancels what is left when it ends)

    assert asyncio.run(failing()) == [0, 1, 2]  # the healthy ones were cancelled where they waited

    closed.clear()

    async def first_then_leave():
        merged = interleave([stream(0, 100, delay=0.01), stream(1, 100, delay=0.01), stream(2, 100, delay=0.01)])
        got = [await anext(merged) for _ in range(3)]
        await merged.aclose()  # the client went away
        return got, sorted(closed)  # closed by aclose itself, not later by asyncio.run's end

    got, closed_at_once = asyncio.run(first_then_leave())
    assert len(got) == 3 and closed_at_once == [0, 1, 2]


def test_scores_waiting_together_share_forwards_and_get_their_own_answers(causal_dllm_dir):
    """Scores that queue up during a step run as one batch (one forward here), each answered with its
    own top_logprobs; a bad one gets its own error and the others their answers."""
    engine = fdllm.Engine.from_pretrained(causal_dllm_dir)
    drv = AsyncEngine(engine)
    alone = fdllm.Engine.from_pretrained(causal_dllm_dir)
    asks = [([5, 6, 7, 8], 0), ([9, 10, 11], 3), ([12, 13], 1)]
    forwards = []
    score = engine.runner.score
    engine.runner.score = lambda rows, k: forwards.append(len(rows)) or score(rows, k)

    async def main(bad: list):
        # an id of its own each run: the last run's closed "busy" is in use until a step delivers its abort
        stream = drv.generate([5, 6], fdllm.SamplingParams(max_new_tokens=400, mode="ar", ignore_eos=True), f"busy{len(bad)}")
        await anext(stream)
        paused, resume = _pause_next_step(drv)
        assert await asyncio.to_thread(paused.wait, 30)
        scores = [asyncio.ensure_future(drv.score(ids, top)) for ids, top in asks + bad]
        await asyncio.sleep(0)  # each has sent its command: they queue up during the paused step
        resume.set()
        answers = await asyncio.gather(*scores, return_exceptions=True)
        await stream.aclose()
        return answers

    try:
        expect = [alone.score([ids], top_logprobs=top)[0] for ids, top in asks]
        for got, want in zip(asyncio.run(main([])), expect, strict=True):  # packed: GEMMs of another shape
            assert got.token_ids == want.token_ids and got.logprobs[1:] == pytest.approx(want.logprobs[1:], abs=1e-5)
            assert [[t for t, _ in top] for top in got.top_logprobs] == [[t for t, _ in top] for top in want.top_logprobs]
        assert forwards == [3]  # one forward, a row each
        *answers, bad = asyncio.run(main([([5, 10**6], 1)]))  # checked before anything runs: then one by one
        assert answers == expect and isinstance(bad, ValueError) and "token ids must be in" in str(bad)
        drv.check_alive()
    finally:
        drv.shutdown()


def _wait_until_idle(drv: AsyncEngine) -> dict:
    for _ in range(100):
        stats = drv.stats()
        if stats["running"] == stats["waiting"] == 0 and stats["free_pages"] == stats["total_pages"]:
            break
        time.sleep(0.05)
    return stats


def test_a_client_gone_just_after_its_request_was_added_aborts_it(driver):
    """The stepping thread adds the request while the event loop is busy; the handler is cancelled
    before it resumes: the request must not decode on to its token limit for nobody."""
    long = fdllm.SamplingParams(max_new_tokens=400, temperature=0.0, mode="ar")

    async def main():
        gen = driver.generate([5, 6, 7], long, "raced")
        first = asyncio.ensure_future(anext(gen))
        await asyncio.sleep(0)  # the handler sends its add
        time.sleep(0.3)  # the loop is busy: the thread adds it meanwhile
        first.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await first
        await gen.aclose()

    asyncio.run(main())
    stats = _wait_until_idle(driver)
    assert stats["running"] == 0 and stats["free_pages"] == stats["total_pages"], stats


@pytest.mark.parametrize("how", ["shutdown", "crash"])
def test_requests_in_flight_or_queued_when_the_loop_ends_get_engine_dead(dllm_dir, how):
    """Shut down or crashed, the loop answers every handler: running streams, an add queued behind the
    last step and a score (before, they waited forever)."""
    from serve.async_engine import EngineDead

    drv = AsyncEngine(fdllm.Engine.from_pretrained(dllm_dir))
    long = fdllm.SamplingParams(max_new_tokens=400, temperature=0.0, mode="ar")
    step = drv.engine.step
    ending = []

    def last_step():
        if ending:
            time.sleep(0.3)  # the queued commands arrive during it
            if how == "crash":
                raise RuntimeError("a bug outside per-request handling")
        return step()

    drv.engine.step = last_step

    async def main():
        running = drv.generate([5, 6], long, "running")
        await anext(running)
        ending.append(True)
        await asyncio.sleep(0.05)  # that step has begun
        late = asyncio.ensure_future(anext(drv.generate([7, 8], long, "late")))
        scored = asyncio.ensure_future(drv.score([5, 6, 7], 1))
        await asyncio.sleep(0.05)
        if how == "shutdown":
            await asyncio.to_thread(drv.shutdown)
        async def end_of(stream):  # its last event (tokens already delivered come first)
            async for _ in stream:
                pass

        outcomes = []
        for waiter in (end_of(running), late, scored):
            try:
                await asyncio.wait_for(waiter, 5)
                outcomes.append("answered")
            except Exception as e:  # noqa: BLE001
                outcomes.append(type(e).__name__)
        return outcomes

    assert asyncio.run(main()) == ["EngineDead"] * 3
    with pytest.raises(EngineDead):
        drv.check_alive()
    drv.shutdown()


def test_an_added_stream_dropped_unread_aborts_its_request(driver):
    """A handler that added a request but neither read nor closed its stream (its response never started:
    the client left before the server began the body) must not leave it decoding for nobody."""
    slow_steps(driver.engine)  # its 400 tokens: ~20 s, past the wait below
    long = fdllm.SamplingParams(max_new_tokens=400, temperature=0.0, mode="ar", ignore_eos=True)

    async def add_and_drop() -> None:
        await driver.add([5, 6, 7], long, "dropped")

    asyncio.run(add_and_drop())
    stats = _wait_until_idle(driver)
    assert stats["running"] == 0 and stats["free_pages"] == stats["total_pages"], stats


def test_deltas_queued_while_nobody_reads_arrive_merged_and_whole(driver, dllm_dir):
    """A reader slower than the engine (a busy proxy) finds several deltas queued: they are sent as one,
    and that one holds all of their tokens, in order (the concurrency test's readers keep up, so it
    never merges)."""
    params = fdllm.SamplingParams(max_new_tokens=24, temperature=0.0, mode="ar")

    async def main():
        stream = await driver.add([5, 6, 7], params, "slow-reader")
        deadline = time.monotonic() + 60
        while (driver.stats()["running"] or driver.stats()["waiting"]) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # the request finishes while nobody reads: its events all queue up
        events = [event async for event in stream]
        return events

    events = asyncio.run(main())
    deltas = [e for e in events if isinstance(e, TokenDelta)]
    result = events[-1]
    assert len(deltas) < result.num_forwards  # deltas were merged
    assert [t for d in deltas for t in d.token_ids] == result.token_ids
    assert result.token_ids == fdllm.Engine.from_pretrained(dllm_dir).generate([[5, 6, 7]], params)[0].token_ids


def test_a_cancelled_read_of_a_request_stream_aborts_its_request(driver):
    """RequestStream's contract: cancelling a read (the client gone) aborts the request and frees its
    pages, without the caller closing the stream (generate() and interleave() also close it)."""
    params = fdllm.SamplingParams(max_new_tokens=400, temperature=0.0, mode="ar")
    slow_steps(driver.engine)

    async def main():
        stream = await driver.add([5, 6, 7], params, "cancelled")
        await stream.__anext__()  # running
        read = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0)
        read.cancel()
        with pytest.raises(asyncio.CancelledError):
            await read
        return stream

    stream = asyncio.run(main())
    deadline = time.monotonic() + 10
    while (stats := driver.stats())["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stats["running"] == 0 and stats["free_pages"] == stats["total_pages"], stats
    del stream


def test_a_score_needing_exactly_the_free_pages_is_answered(causal_dllm_dir):
    """A score whose sequence takes every page of an idle cache fits (nothing else will ever free one):
    it must be answered, not wait forever."""
    engine = fdllm.Engine.from_pretrained(causal_dllm_dir, engine_config=fdllm.EngineConfig(num_pages=6))
    tokens = next(list(range(5, 5 + n)) for n in range(1, 200) if engine.score_pages(list(range(5, 5 + n))) == engine.num_pages)
    drv = AsyncEngine(engine)
    try:
        assert drv.stats()["free_pages"] == engine.num_pages
        scored = asyncio.run(asyncio.wait_for(drv.score(tokens, 1), timeout=20))
        assert scored == fdllm.Engine.from_pretrained(causal_dllm_dir).score([tokens], top_logprobs=1)[0]
    finally:
        drv.shutdown()


def test_free_pages_are_net_of_what_admitted_requests_were_promised(dllm_dir):
    """With `deterministic` a request reserves every page it may reach at admission: /health's and the
    metrics' free pages counted those as free while the engine could admit nothing more."""
    engine = fdllm.Engine.from_pretrained(dllm_dir, engine_config=fdllm.EngineConfig(num_pages=32, deterministic=True))
    slow_steps(engine, 0.05)
    drv = AsyncEngine(engine)
    try:
        async def main():
            stream = drv.generate([5, 6, 7], fdllm.SamplingParams(max_new_tokens=200, temperature=0.0, mode="ar"), "r")
            async for _ in stream:  # the first delta: admitted, running
                break
            stats = drv.stats()
            await stream.aclose()
            return stats

        stats = asyncio.run(main())
        promised = -(-(3 + 200) // engine.config.block_size)  # every page of prompt + max_new_tokens
        assert stats["free_pages"] <= stats["total_pages"] - promised, stats
    finally:
        drv.shutdown()
