"""The static-bucket decode path (what CUDA graphs capture) against the dynamic packed path, token for token.

The dynamic path (one varlen forward per step, no padding) is the oracle here: it is itself held
against the no-cache block-causal recompute and HF generate in test_engine.py.
"""

from __future__ import annotations

import pytest
import torch

import fdllm
from fdllm.decoding import counter_uniform, sample_confidence
from fdllm.engine.runner import batch_buckets, query_bucket
from tests.unit.test_engine import MASK, make_engine, params, random_prompts


@pytest.fixture(scope="module")
def model(sharp_dir):
    return fdllm.load_model(sharp_dir)


def count_static_steps(engine, entries: list | None = None) -> list:
    """Record the static shape of every step (None: dynamic), and into `entries` the (works, lengths
    of the attention rows) of every static step."""
    shapes, inner, run = [], engine.runner.static_shape, engine.runner.run
    works_per_step = []

    def run_spy(works, batches=()):
        works_per_step.append(len(works) + sum(len(b.seqs) for b in batches))  # sequences
        return run(works, batches)

    def spy(inputs):
        shapes.append(inner(inputs))
        if entries is not None and shapes[-1] is not None:
            entries.append((works_per_step[-1], inputs.q_lens.tolist()))
        return shapes[-1]

    engine.runner.run, engine.runner.static_shape = run_spy, spy
    return shapes


def record_steps(engine) -> list:
    """(whether it prefills, its attention rows, its static shape or None) of every step from now on."""
    steps, inner = [], engine.runner.static_shape

    def spy(inputs):
        steps.append((inputs.prefill, len(inputs.q_lens), inner(inputs)))
        return steps[-1][2]

    engine.runner.static_shape = spy
    return steps


def dynamic_only(engine):
    engine.runner.static_shape = lambda inputs: None
    return engine


def run_mixed(engine, requests, join_at: int = 3):
    """Half the requests at once, the rest after `join_at` steps (so batches change size mid-flight)."""
    first, later = requests[: len(requests) // 2], requests[len(requests) // 2 :]
    ids = [engine.add_request(p, sp) for p, sp in first]
    done = {}
    for step in range(10_000):
        if step == join_at:
            ids += [engine.add_request(p, sp) for p, sp in later]
        for r in engine.step():
            done[r.request_id] = r
        if len(done) == len(requests):
            break
    return [done[i].token_ids for i in ids]


def mixed_requests(temperature: float):
    """AR and diffusion requests, greedy and sampled, some diffusion ones with the block lookahead
    (whose commit steps run two attention rows: two entries of a static batch)."""
    prompts = random_prompts(7, [1, 3, 8, 9, 13, 17], seed=11)
    modes = ["diffusion", "ar", "diffusion", "diffusion", "ar", "diffusion", "diffusion"]
    return [(p, params(max_new_tokens=19, mode=m, temperature=temperature if i % 3 else 0.0, top_p=0.95, top_k=12,
                       seed=100 + i, threshold=0.3 + 0.1 * (i % 3), block_lookahead=i in (2, 3, 6)))
            for i, (p, m) in enumerate(zip(prompts, modes))]


@pytest.mark.parametrize("use_sub_block_cache", [False, True], ids=["cache-off", "sub-block-cache"])
@pytest.mark.parametrize("temperature", [0.0, 0.9], ids=["greedy", "seeded-sampling"])
def test_static_buckets_equal_dynamic_path(model, use_sub_block_cache, temperature):
    requests = mixed_requests(temperature)
    static = make_engine(model, use_sub_block_cache=use_sub_block_cache)
    entries = []
    shapes = count_static_steps(static, entries)
    got = run_mixed(static, requests)
    want = run_mixed(dynamic_only(make_engine(model, use_sub_block_cache=use_sub_block_cache)), requests)
    assert got == want
    used = [s for s in shapes if s is not None]
    assert len(used) > len(shapes) // 2, "most steps should be static decode steps"
    # whole-block rows (8) ran static and, with the sub-block cache, cached sub-block steps (4), in
    # entries of 4 when they share a step, the whole-block rows then cut in two
    assert any(8 in rows for _, rows in entries)
    assert {s.q_len for s in used} >= ({4} if use_sub_block_cache else {8})
    if use_sub_block_cache:
        assert any(max(rows) > s.q_len for s, (_, rows) in zip(used, entries)), "some rows should run in chunks"
    assert any(s.batch > 1 for s in used) and any(s.batch in (2, 4, 8) for s in used)
    assert any(len(rows) > works for works, rows in entries), "some static steps should carry a block lookahead"


def test_query_buckets_of_captured_steps_change_no_token(model):
    """With graphs, static steps pad each work's queries to a power of two (so speculative drafts of
    every length share a few graphs); on CPU the same padding runs eagerly and must equal the
    unpadded steps and the dynamic path token for token, for diffusion (one with the block lookahead,
    whose two rows then sit in entries longer than themselves), AR and speculative requests together."""
    assert [query_bucket(n) for n in (1, 2, 3, 4, 5, 8, 9, 17, 33)] == [1, 2, 4, 4, 8, 8, 16, 32, 64]
    requests = [(p, params(max_new_tokens=21, mode=m, temperature=t, seed=i, block_lookahead=i == 4))
                for i, (p, m, t) in enumerate(zip(random_prompts(6, [2, 7, 12], seed=5),
                                                  ["speculative", "diffusion", "ar", "speculative", "diffusion", "ar"],
                                                  [0.0, 0.8, 0.0, 0.0, 0.0, 0.9]))]
    padded, exact = make_engine(model), make_engine(model)
    padded.runner.bucket_query_len = True
    padded_shapes, exact_shapes = count_static_steps(padded), count_static_steps(exact)
    got = run_mixed(padded, requests)
    assert got == run_mixed(exact, requests) == run_mixed(dynamic_only(make_engine(model)), requests)
    assert any(s.causal for s in padded_shapes if s is not None), "speculative verifies should run static"
    q_lens = {s.q_len for s in padded_shapes if s is not None}
    assert q_lens and all(q & (q - 1) == 0 for q in q_lens), q_lens
    assert any(s.q_len & (s.q_len - 1) for s in exact_shapes if s is not None), "some steps must have needed padding"


@pytest.mark.parametrize("use_sub_block_cache", [False, True], ids=["cache-off", "sub-block-cache"])
def test_block_lookahead_rows_in_padded_entries_equal_dynamic_path(model, use_sub_block_cache):
    """A commit with the block lookahead takes two entries of a static step; with blocks of 6 and
    captured-graph padding (Q = 8), each of its rows is padded on its own, so the lookahead's logit
    rows sit past a gap in the flat layout. Token for token equal to the dynamic path."""
    requests = [(p, params(max_new_tokens=17, temperature=0.8 if i % 2 else 0.0, seed=i, block_lookahead=i != 3,
                           threshold=0.3)) for i, p in enumerate(random_prompts(6, [1, 4, 6, 9, 12], seed=21))]
    padded = make_engine(model, block_size=6, sub_block_size=3, use_sub_block_cache=use_sub_block_cache)
    padded.runner.bucket_query_len = True
    entries = []
    shapes = count_static_steps(padded, entries)
    got = run_mixed(padded, requests)
    dynamic = dynamic_only(make_engine(model, block_size=6, sub_block_size=3, use_sub_block_cache=use_sub_block_cache))
    assert got == run_mixed(dynamic, requests)
    assert 8 in {s.q_len for s in shapes if s is not None}
    assert any(len(rows) > works for works, rows in entries), "some static steps should carry a block lookahead"


@pytest.mark.parametrize("bucket_query_len", [False, True], ids=["eager-padding", "graph-padding"])
def test_causal_prefix_commits_and_verifies_run_static_with_per_entry_flags(model, bucket_query_len):
    """A causal-prefix checkpoint (the joint objective's) commits blocks with causal rows, and
    speculative verifies are causal: both run in static steps beside bidirectional rows, each entry
    with its own causal flag, token for token as the dynamic path."""
    requests = [(p, params(max_new_tokens=19, mode=m, temperature=0.8 if i % 3 == 1 else 0.0, seed=i,
                           block_lookahead=m == "diffusion" and i % 2 == 0))
                for i, (p, m) in enumerate(zip(random_prompts(7, [2, 7, 8, 12, 16], seed=13),
                                               ["diffusion", "speculative", "diffusion", "ar", "diffusion", "speculative",
                                                "diffusion"]))]
    static = make_engine(model, prefix_attention="causal")
    static.runner.bucket_query_len = bucket_query_len
    entries = []
    shapes = count_static_steps(static, entries)
    got = run_mixed(static, requests)
    assert got == run_mixed(dynamic_only(make_engine(model, prefix_attention="causal")), requests)
    causal = [s for s in shapes if s is not None and s.causal]
    assert causal and any(s.batch > 1 for s in causal), "causal rows should share static steps with others"
    assert any(len(rows) > works for works, rows in entries)


def test_causal_rows_cut_into_entries_keep_speculative_exactly_ar(model):
    """Speculative verifies are causal rows of up to the block + 1; beside cached sub-block steps (4)
    a static step cuts them into entries of 4, each keeping the row's kv_len and its queries'
    positions. Every verify logit is read, so a chunk that saw past its queries would change what is accepted: the
    speculative outputs stay the AR outputs of the same prompts, token for token."""
    prompts = random_prompts(8, [2, 5, 9, 14], seed=17)
    modes = ["speculative", "diffusion"] * 4
    requests = [(p, params(max_new_tokens=21, mode=m, threshold=0.3)) for p, m in zip(prompts, modes)]
    engine = make_engine(model, use_sub_block_cache=True)
    entries = []
    shapes = count_static_steps(engine, entries)
    got = run_mixed(engine, requests)
    ar = make_engine(model).generate(prompts[::2], params(max_new_tokens=21, mode="ar"))
    assert got[::2] == [r.token_ids for r in ar]
    assert got == run_mixed(dynamic_only(make_engine(model, use_sub_block_cache=True)), requests)
    used = [s for s in shapes if s is not None]
    assert any(s.causal and max(rows) > s.q_len for s, (_, rows) in zip(used, entries)), "a verify should have been cut"


def test_deterministic_mode_pads_every_step_to_max_num_seqs(model):
    requests = mixed_requests(0.9) + [(p, params(max_new_tokens=17, mode="speculative", seed=i))
                                      for i, p in enumerate(random_prompts(2, [3, 10], seed=2))]
    cfg = fdllm.BlockDiffusionConfig(block_size=8, sub_block_size=4, threshold=0.4, mask_token_id=MASK)
    engine = fdllm.Engine(model, None, cfg, fdllm.EngineConfig(num_pages=256, max_num_seqs=16, deterministic=True))
    shapes = count_static_steps(engine)
    got = run_mixed(engine, requests)
    # one shape for every static step: GEMMs never change shape (rows longer than the block, the
    # speculative ones, would be cut into entries of the block)
    assert {(s.batch, s.q_len) for s in shapes if s is not None} == {(16, 8)}
    want = run_mixed(dynamic_only(fdllm.Engine(model, None, cfg, fdllm.EngineConfig(num_pages=256))), requests)
    assert got == want


@pytest.mark.parametrize("block_lookahead", [False, True], ids=["plain", "block-lookahead"])
def test_seeded_request_is_independent_of_its_batch(model, block_lookahead):
    """The same seeded request alone, among greedy requests, among other sampled ones, first or last."""
    target = ([5, 9, 2, 7, 1], params(max_new_tokens=23, temperature=1.0, top_p=0.9, seed=7,
                                      block_lookahead=block_lookahead))
    others = [(p, params(max_new_tokens=n, temperature=t, seed=s, block_lookahead=s % 2 == 0))
              for p, n, t, s in zip(random_prompts(6, [2, 8, 11], seed=3), [5, 30, 9, 17, 12, 20],
                                    [0.0, 1.3, 0.0, 0.7, 2.0, 0.0], [1, 2, 3, 4, 5, 6])]
    alone = make_engine(model).generate([target[0]], target[1])[0].token_ids
    for batch in ([target] + others[:2], others[:5] + [target], others[2:4] + [target] + others[4:]):
        engine = make_engine(model)
        results = engine.generate([p for p, _ in batch], [sp for _, sp in batch])
        assert results[batch.index(target)].token_ids == alone
    reseeded = make_engine(model).generate([target[0]], params(max_new_tokens=23, temperature=1.0, top_p=0.9, seed=8,
                                                               block_lookahead=block_lookahead))
    assert reseeded[0].token_ids != alone


def test_head_in_row_chunks_changes_no_token(model):
    """The head makes logits a bounded number of rows at a time (a 152k vocabulary would otherwise
    take gigabytes for a full batch of verifies): with chunks of 3 rows, greedy, sampled (top-k,
    top-p), entropy-budget, lookahead and speculative requests decode exactly as with one chunk."""
    prompts = random_prompts(7, [2, 6, 11, 16], seed=23)
    kinds = [dict(), dict(temperature=0.9, top_p=0.8, seed=1), dict(selection="entropy_budget", entropy_budget=0.6),
             dict(temperature=1.2, top_k=5, seed=2, block_lookahead=True), dict(mode="speculative"),
             dict(mode="speculative", temperature=0.7, seed=3), dict(selection="entropy_budget", temperature=0.8, seed=4)]
    ps = [params(max_new_tokens=18, threshold=0.5, **k) if "selection" not in k else params(max_new_tokens=18, **k)
          for k in kinds]
    chunked = make_engine(model, use_sub_block_cache=True)
    chunked.runner.max_head_rows = 3
    sizes, inner = [], chunked.runner.logits
    chunked.runner.logits = lambda h: sizes.append(h.shape[0]) or inner(h)
    got = [r.token_ids for r in chunked.generate(prompts, ps)]
    assert got == [r.token_ids for r in make_engine(model, use_sub_block_cache=True).generate(prompts, ps)]
    assert max(sizes) == 3 and sizes.count(3) > 10, "candidate, sampled and entropy rows should have run in chunks"


def test_staging_buffer_growth_renews_the_static_views(model):
    """The views of a static step's inputs are made once per shape; when the staging buffer grows
    (a larger step), they must follow it, not keep reading the old buffer."""
    from fdllm.engine.runner import HostStage, StaticShape

    requests = mixed_requests(0.0)
    engine = make_engine(model, use_sub_block_cache=True)
    runner = engine.runner
    runner.stage = HostStage(runner.device, capacity=8)  # grows several times
    got = run_mixed(engine, requests)
    assert runner.stage.host.numel() > 8
    assert got == run_mixed(dynamic_only(make_engine(model, use_sub_block_cache=True)), requests)
    shape = StaticShape(4, 8, 2)
    before = runner._static_inputs(shape)
    runner.stage.begin({"big": 4 * runner.stage.host.numel()})  # the next step needs a larger buffer
    after = runner._static_inputs(shape)
    assert after.ids_1T.data_ptr() == runner.stage.dev.data_ptr() != before.ids_1T.data_ptr()


def test_the_mask_token_is_never_predicted_even_when_it_has_the_top_logit(model):
    """Hidden states that point along the mask token's LM-head row give it the largest logit at every
    row; the head holds it at -inf, so requests still decode ordinary tokens and finish."""
    engine = make_engine(model, use_sub_block_cache=True)
    weight = model.lm_head.weight.detach()
    along_mask = (weight[MASK] / weight[MASK].norm() * 4 * weight.norm(dim=1).max()).clone()
    engine.model.hidden = lambda ids, *a, **k: along_mask.expand(*ids.shape, -1)
    try:
        assert (weight @ along_mask).argmax() == MASK
        ids = [engine.add_request(p, params(max_new_tokens=10, mode=m))
               for p, m in zip(random_prompts(3, [3, 8], seed=5), ["diffusion", "ar", "speculative"])]
        done = {}
        for _ in range(100):
            done |= {r.request_id: r for r in engine.step()}
        assert sorted(done) == sorted(ids)
        assert all(len(r.token_ids) == 10 and MASK not in r.token_ids for r in done.values())
    finally:
        del engine.model.hidden


def test_counter_uniform_is_uniform_and_a_function_of_seed_and_counter():
    seed = torch.tensor([3, 3, 4, 2**40 + 3], dtype=torch.int64)
    counter = torch.tensor([0, 1, 0, 0], dtype=torch.int64)
    u = counter_uniform(seed, counter)
    assert len(set(u.tolist())) == 4, "seed and counter (all 64 bits) both matter"
    assert torch.equal(u[1:2], counter_uniform(seed[1:2], counter[1:2]))  # a row alone draws the same
    many = counter_uniform(torch.full((200_000,), 12345), torch.arange(200_000))
    assert 0.0 < many.min() and many.max() < 1.0
    hist = torch.histc(many, bins=10, min=0.0, max=1.0) / many.numel()
    assert (hist - 0.1).abs().max() < 0.005


def test_vectorised_sampling_follows_the_filtered_distribution():
    """Frequencies of the inverse-CDF draw match softmax(logits / T) restricted by top-k (an independent oracle)."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 3.0]])
    n = 40_000
    draws = counter_uniform(torch.full((n,), 5), torch.arange(n))
    token, prob = sample_confidence(logits.expand(n, -1), 5, temperature=0.7, top_k=3, uniform_T=draws)
    expect = torch.zeros(6)
    kept = torch.tensor([0, 1, 2])  # top-3 once token 5 (the mask) is excluded
    expect[kept] = (logits[0, kept] / 0.7).softmax(-1)
    freq = torch.bincount(token, minlength=6).float() / n
    assert (freq - expect).abs().max() < 0.01
    torch.testing.assert_close(prob, expect[token])


def test_chunk_len_pads_the_fewest_tokens():
    from fdllm.engine.runner import chunk_len

    b64 = batch_buckets(64)
    same = lambda n: n  # noqa: E731 - eager steps: any row length is a candidate
    big = 10**6
    assert chunk_len([8, 4, 4], b64, same, big) == 4  # 4 entries of 4 (16 tokens), not 4 x 8 (3 rows in bucket 4)
    assert chunk_len([32] + [8] * 63, b64, same, big) == 32  # entries of 8 would be 67 > 64
    assert chunk_len([32] * 2 + [8] * 40, b64, same, big) == 8  # 48 entries of 8 (384 tokens), not 48 x 32
    assert chunk_len([1, 1, 8], b64, same, big) == 8  # AR rows pad; a block is never cut into 1-token entries
    assert chunk_len([1, 1], b64, same, big) == 1
    assert chunk_len([6, 3], b64, query_bucket, big) == 8  # 4 x 4 or 2 x 8 tokens: the tie goes to the longer
    assert chunk_len([9, 4, 4], b64, same, big) == 4  # 3 + 1 + 1 entries of 4 (a short last chunk)
    assert chunk_len([8] * 65, b64, same, big) is None
    assert chunk_len([8] * 40, b64, same, 40 * 8) is None  # bucket 48 x 8 tokens is over the limit
    assert chunk_len([8] * 40 + [4] * 8, b64, same, 48 * 8) == 8  # 88 entries of 4 would fit no bucket


def test_full_batch_cuts_rows_into_up_to_four_entries_per_sequence(model):
    """A full batch (max_num_seqs) of sub-block steps and whole-block rows: the step holds more
    entries than sequences (rows cut into sub-blocks, block lookaheads' second rows), never more tokens
    than static steps were sized for (max_num_seqs rows of the block + 1, padded: 8 x 16), token for
    token as the dynamic path."""
    prompts = random_prompts(8, [3, 9, 12], seed=4)
    requests = [(p, params(max_new_tokens=19, threshold=0.5, block_lookahead=i % 2 == 0)) for i, p in enumerate(prompts)]
    cfg = {"use_sub_block_cache": True, "block_size": 8, "sub_block_size": 2}
    engine = fdllm.Engine(model, None, fdllm.BlockDiffusionConfig(threshold=0.4, mask_token_id=MASK, **cfg),
                          fdllm.EngineConfig(num_pages=256, max_num_seqs=8))
    entries = []
    shapes = count_static_steps(engine, entries)
    got = engine.generate([p for p, _ in requests], [sp for _, sp in requests])
    dynamic = dynamic_only(fdllm.Engine(model, None, fdllm.BlockDiffusionConfig(threshold=0.4, mask_token_id=MASK, **cfg),
                                        fdllm.EngineConfig(num_pages=256, max_num_seqs=8)))
    assert [r.token_ids for r in got] == [r.token_ids for r in dynamic.generate([p for p, _ in requests],
                                                                                 [sp for _, sp in requests])]
    used = [(s, rows) for s, (_, rows) in zip([s for s in shapes if s is not None], entries)]
    assert engine.runner.buckets[-1] == 32
    assert any(s.batch > 8 for s, _ in used), "a full batch should have run with rows cut beyond 8 entries"
    assert engine.runner.static_tokens == 8 * 16
    assert max(s.batch * s.q_len for s, _ in used) <= engine.runner.static_tokens


def test_batch_buckets():
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert batch_buckets(5) == [1, 2, 4, 5]
    assert batch_buckets(1) == [1]


@pytest.mark.parametrize("bucket_query_len", [False, True], ids=["eager-padding", "graph-padding"])
def test_lookahead_steps_of_a_lone_request_run_static(model, bucket_query_len):
    """A lone request (max_num_seqs 1: the GPU suite's batch-1 engine) with a lookahead runs two attention
    rows in a step: a speculative verify (up to the block + 1) and the next block's drafts, or a block
    commit and the next block. Every decode step is static all the same (`static_step_tokens`: the
    steps' tokens were bounded by max_num_seqs rows of the step's longest row, so on the H200 every
    lookahead step ran eagerly, ~4x a plain step), with the dynamic path's tokens."""
    for kw in ({"mode": "speculative"}, {"block_lookahead": True, "threshold": 0.3}):
        engines = [fdllm.Engine(model, None, fdllm.BlockDiffusionConfig(block_size=8, sub_block_size=4, threshold=0.4,
                                                                        mask_token_id=MASK),
                                fdllm.EngineConfig(num_pages=64, max_num_seqs=1, max_prefill_tokens=64)) for _ in range(2)]
        engines[0].runner.bucket_query_len = bucket_query_len
        steps = record_steps(engines[0])
        prompt = random_prompts(1, [11], seed=3)
        got = engines[0].generate(prompt, params(max_new_tokens=40, **kw))[0].token_ids
        assert got == dynamic_only(engines[1]).generate(prompt, params(max_new_tokens=40, **kw))[0].token_ids
        assert any(rows == 2 for _, rows, _ in steps), f"{kw}: no step carried a lookahead row"
        assert all(shape is not None for prefill, _, shape in steps if not prefill), f"{kw}: a decode step ran eagerly"


@pytest.mark.parametrize("max_num_seqs", [1, 6, 8])
def test_lookahead_batch_limit_is_what_static_steps_hold(model, max_num_seqs):
    """With CUDA graphs the speculative lookahead is on up to `lookahead_batch_limit` running requests by
    default: that many verifies with their lookahead rows run in static steps (padded as captured steps
    are), and every decode step of the run is static."""
    from fdllm.engine.runner import lookahead_batch_limit

    n = lookahead_batch_limit(max_num_seqs, 8)
    assert n == max(1, max_num_seqs // 2)
    engine = fdllm.Engine(model, None, fdllm.BlockDiffusionConfig(block_size=8, sub_block_size=4, threshold=0.4,
                                                                  mask_token_id=MASK),
                          fdllm.EngineConfig(num_pages=256, max_num_seqs=max_num_seqs, max_prefill_tokens=256,
                                             speculative_lookahead_max_batch=n))
    engine.runner.bucket_query_len = True  # as with graphs
    steps = record_steps(engine)
    engine.generate(random_prompts(n, [5, 11], seed=7), params(max_new_tokens=30, mode="speculative"))
    assert any(rows == 2 * n for _, rows, _ in steps), "every request should have looked ahead in some step"
    assert all(shape is not None for prefill, _, shape in steps if not prefill)


def test_the_lookahead_limit_defaults_to_what_captured_steps_hold(caplog):
    """On CUDA graphs EngineConfig.speculative_lookahead_max_batch=None is `lookahead_batch_limit`; a larger
    limit asked for is kept with a warning (its steps past the limit run eagerly); off graphs, or with
    the lookahead off, the config's value as it is."""
    from fdllm.engine.engine import speculative_lookahead_max_batch as limit

    cfg = lambda **kw: fdllm.EngineConfig(max_num_seqs=64, **kw)  # noqa: E731
    assert limit(cfg(), 32, use_graphs=True) == 32 and limit(cfg(), 32, use_graphs=False) is None
    assert limit(cfg(speculative_lookahead_max_batch=8), 32, use_graphs=True) == 8 and not caplog.records
    with caplog.at_level("WARNING", logger="fdllm.engine.engine"):
        assert limit(cfg(speculative_lookahead_max_batch=40), 32, use_graphs=True) == 40
    assert "more than 32 requests" in caplog.text and "run eagerly" in caplog.text
    assert limit(cfg(speculative_lookahead=False), 32, use_graphs=True) is None


@pytest.mark.parametrize("max_num_seqs", [8, 6])
def test_the_start_up_capture_holds_the_most_tokens_of_any_static_step(model, max_num_seqs):
    """With CUDA graphs the engine captures its largest static shape first (`capture_largest`), so the
    graphs' pool is sized once by it and later captures reuse it. Every static step of full batches of
    speculative verifies (rows of the block + 1), diffusion and AR requests, with rows padded to
    powers of two as captured steps are, holds at most that shape's tokens, also for a max_num_seqs
    that is no batch bucket (6)."""
    captured = []
    engine = fdllm.Engine(model, None, fdllm.BlockDiffusionConfig(block_size=8, sub_block_size=4, threshold=0.3,
                                                                  mask_token_id=MASK),
                          fdllm.EngineConfig(num_pages=256, max_num_seqs=max_num_seqs, max_prefill_tokens=256))
    engine.runner.bucket_query_len = True  # as with graphs
    engine.runner.graphs = type("Graphs", (), {"capture": lambda self, shape: captured.append(shape)})()
    engine.runner.capture_largest()
    engine.runner.graphs = None  # the eager static path from here
    shapes = count_static_steps(engine)
    modes = ["speculative"] * max_num_seqs + ["diffusion"] * max_num_seqs + ["ar"] * max_num_seqs
    prompts = random_prompts(len(modes), [3, 9, 14], seed=23)
    engine.generate(prompts, [params(max_new_tokens=17, mode=m, block_lookahead=m == "diffusion") for m in modes])
    [largest] = captured
    used = [s for s in shapes if s is not None]
    assert max(s.batch * s.q_len for s in used) <= largest.batch * largest.q_len
    assert any(s.batch * s.q_len == largest.batch * largest.q_len for s in used), "a full batch should reach it"


def test_flash_attn_refused_for_block_pages_and_graphs_need_cuda(model):
    with pytest.raises(ValueError, match="multiple of 256 tokens.*8 tokens"):
        make_engine(model, attention_backend="flash_attn")
    engine = make_engine(model)
    assert engine.runner.graphs is None  # CPU: the static path runs eagerly
    from fdllm.engine.runner import ModelRunner

    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        ModelRunner(model, engine.runner.cache, MASK, "torch", max_row_len=9, max_pages_per_seq=4, use_cuda_graphs=True)


def test_a_backend_without_causal_flags_runs_causal_rows_unpadded(model, monkeypatch):
    """flash_attn has no per-entry causal flag and aligns a causal row's queries to the end of the
    padded length, so it cannot pad them: the runner runs its causal steps (speculative verifies, AR
    prompts and decode, a causal-prefix checkpoint's commits) dynamic, each causal row in a call of
    its own length. With a stand-in that asserts exactly that (flash-attn itself needs CUDA), every
    step keeps the constraint and the tokens are the torch backend's."""
    from fdllm.engine import runner
    from tests.unit.test_cache import flash_like_attention

    requests = [(p, params(max_new_tokens=19, mode=m, temperature=0.8 if i % 3 == 1 else 0.0, seed=i))
                for i, (p, m) in enumerate(zip(random_prompts(8, [2, 7, 9, 12, 16], seed=21),
                                               ["speculative", "ar", "diffusion", "ar", "speculative", "diffusion",
                                                "ar", "speculative"]))]
    want = run_mixed(make_engine(model, prefix_attention="causal"), requests)
    engine = make_engine(model, prefix_attention="causal")
    monkeypatch.setattr(runner, "select_attention_backend", lambda name, device: flash_like_attention)
    engine.runner = runner.ModelRunner(model, engine.runner.cache, MASK, "flash_attn", max_row_len=9, max_num_seqs=64)
    shapes = count_static_steps(engine)
    assert run_mixed(engine, requests) == want
    assert None in shapes and not any(s.causal for s in shapes if s is not None)


@pytest.mark.parametrize("prefix_attention", ["block_causal", "causal"])
def test_block_lookahead_with_stops_and_unaligned_budgets(model, prefix_attention):
    """Random budgets (1-30 tokens, mostly ending inside a block), a stop token each, greedy and
    sampled, thresholds 0.2-0.9, all with the block lookahead: static == dynamic, and every request
    ends within its budget, on its stop token when it stops."""
    import random

    rng = random.Random(7)
    for trial in range(3):
        prompts = random_prompts(6, [1, 3, 8, 9, 16, 17], seed=trial)
        ps = [params(max_new_tokens=rng.randint(1, 30), block_lookahead=True, stop_token_ids=(rng.randrange(MASK),),
                     temperature=rng.choice([0.0, 0.9]), seed=i, threshold=rng.choice([0.2, 0.5, 0.9]))
              for i in range(6)]
        got = make_engine(model, prefix_attention=prefix_attention).generate(prompts, ps)
        want = dynamic_only(make_engine(model, prefix_attention=prefix_attention)).generate(prompts, ps)
        assert [r.token_ids for r in got] == [r.token_ids for r in want]
        for r, p in zip(got, ps):
            assert 1 <= len(r.token_ids) <= p.max_new_tokens and r.finish_reason in ("stop", "length")
            assert (r.finish_reason == "stop") == (r.token_ids[-1] in p.stop_token_ids)


def test_a_cuda_graph_is_captured_with_autograd_off(monkeypatch):
    """The engine's start-up capture (outside any forward) ran with autograd on: its warm-up and captured
    forwards recorded history on the KV cache and kept every layer's activations alive, gigabytes
    the KV sizing had counted as free. On CPU, with a stand-in for the captured step: the capture's
    body runs in inference mode whoever calls it."""
    from types import SimpleNamespace

    from fdllm.engine import graphs
    from fdllm.engine.runner import StaticShape

    seen = []
    monkeypatch.setattr(graphs, "CapturedStep", lambda *args: seen.append(torch.is_inference_mode_enabled()) or "step")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    pool = SimpleNamespace(steps={}, capture_seconds=0.0, model=None, attention_fn=None, fused=False, pool=None, stream=None,
                           cache=SimpleNamespace(k_LPSKH=torch.empty(1)), out_ND=torch.empty(8, 2))
    assert not torch.is_inference_mode_enabled()
    assert graphs.GraphPool.capture(pool, StaticShape(2, 4, 3)) == "step" and seen == [True]


def test_a_backend_output_in_any_layout_runs_static(model, monkeypatch):
    """A backend may return [B, Q, N, H] as a transposed view of [B, N, Q, H] (SDPA's CUDA kernels do,
    the torch backend's result then keeps that layout); static steps must take it as it comes (a
    `view` of it failed every request of the torch backend on CUDA; on CPU SDPA's layout hid it)."""
    from fdllm.engine import runner
    from fdllm.kernels.reference import paged_attention_torch

    def heads_first(*args, **kwargs):
        o_BQNH = paged_attention_torch(*args, **kwargs)
        return o_BQNH.transpose(1, 2).contiguous().transpose(1, 2)

    requests = mixed_requests(0.0)
    want = run_mixed(make_engine(model), requests)
    engine = make_engine(model)
    monkeypatch.setattr(runner, "select_attention_backend", lambda name, device: heads_first)
    engine.runner = runner.ModelRunner(model, engine.runner.cache, MASK, "torch", max_row_len=9, max_num_seqs=64)
    shapes = count_static_steps(engine)
    assert run_mixed(engine, requests) == want
    assert any(s is not None for s in shapes)
