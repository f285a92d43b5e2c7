"""Self-speculative block decoding (docs/method.md §5): its greedy output is the same model's AR output.

The oracle is the engine's own mode="ar" (itself held against HF generate in test_engine), so every
test here fails if a draft token is ever committed without the causal verify agreeing, or if the
verify pass's K/V (which later rounds read as the exact causal cache) are wrong.
"""

from __future__ import annotations

import pytest
import torch

import fdllm
from fdllm.objective import IGNORE_INDEX, two_stream_batch, joint_loss
from tests.reference import MASK, reference_generate
from tests.unit.test_engine import make_engine, make_sequence, params, random_prompts, run_joining_mid_flight

LENGTHS = [1, 3, 7, 8, 9, 13, 16]  # block 8: prompts that are and are not block multiples


@pytest.fixture(scope="module")
def model(sharp_dir):
    return fdllm.load_model(sharp_dir)


def _run(engine, prompts, p):
    return [r.token_ids for r in engine.generate(prompts, p)]


@pytest.mark.parametrize("use_sub_block_cache", [False, True])
def test_greedy_speculative_equals_ar_alone_and_batched(model, use_sub_block_cache):
    prompts = random_prompts(7, LENGTHS, seed=21)
    engine = make_engine(model, use_sub_block_cache=use_sub_block_cache)
    ar = engine.generate(prompts, params(mode="ar", max_new_tokens=20))
    spec = engine.generate(prompts, params(mode="speculative", max_new_tokens=20))
    assert [r.token_ids for r in spec] == [r.token_ids for r in ar]  # 20 tokens: across 2+ block boundaries
    for prompt, batched in zip(prompts[1:3], spec[1:3]):
        alone = make_engine(model, use_sub_block_cache=use_sub_block_cache).generate(
            [prompt], params(mode="speculative", max_new_tokens=20))[0]
        assert alone.token_ids == batched.token_ids and alone.num_forwards == batched.num_forwards
    for r in spec:
        assert r.finish_reason == "length" and 0 <= r.num_accepted <= r.num_drafted
        assert r.num_forwards > 0 and r.forwards_per_token == r.num_forwards / 20
    assert sum(r.num_accepted for r in spec) > 0  # drafts do get accepted: the accept path is exercised


@pytest.mark.parametrize("block_size,sub_block_size,threshold", [(4, 2, 0.3), (16, 4, 0.6)])
def test_speculative_equals_ar_other_block_shapes(model, block_size, sub_block_size, threshold):
    prompts = random_prompts(4, [1, block_size, block_size + 1, 2 * block_size - 1], seed=block_size)
    engine = make_engine(model, block_size=block_size, sub_block_size=sub_block_size, threshold=threshold)
    assert _run(engine, prompts, params(mode="speculative", max_new_tokens=19)) == _run(
        engine, prompts, params(mode="ar", max_new_tokens=19))


def test_mid_flight_joins_mixed_with_ar_and_diffusion(model):
    """Speculative rounds share steps with AR tokens and diffusion sub-blocks (one packed forward)."""
    prompts = random_prompts(4, [2, 8, 11, 16], seed=23)
    mixed = [params(mode="speculative"), params(), params(mode="ar"), params(mode="speculative", max_new_tokens=7)]
    results = run_joining_mid_flight(make_engine(model, use_sub_block_cache=True), prompts, mixed)
    for i, (prompt, p) in enumerate(zip(prompts, mixed)):
        alone = make_engine(model, use_sub_block_cache=True).generate([prompt], p)[0]
        assert results[str(i)].token_ids == alone.token_ids
        if p.mode == "speculative":
            ar = make_engine(model).generate([prompt], params(mode="ar", max_new_tokens=p.max_new_tokens))[0]
            assert results[str(i)].token_ids == ar.token_ids


def test_stop_tokens_truncation_and_streaming(model):
    prompt = random_prompts(1, [5], seed=29)[0]
    engine = make_engine(model)
    full = engine.generate([prompt], params(mode="ar", max_new_tokens=24))[0].token_ids
    stop = full[13]
    cut = full.index(stop) + 1
    streamed = []
    rid = engine.add_request(prompt, params(mode="speculative", max_new_tokens=24, stop_token_ids=(stop,)),
                             on_tokens=lambda _, new, done: streamed.append((list(new), done)))
    results = []
    while engine.has_unfinished():
        results += engine.step()
    (res,) = results
    assert res.request_id == rid and res.finish_reason == "stop" and res.token_ids == full[:cut]
    assert [t for new, _ in streamed for t in new] == res.token_ids  # streamed in order, nothing after the stop
    assert [done for _, done in streamed].count(True) == 1 and streamed[-1][1]
    for n in (1, 5, 9):  # max_new_tokens only cuts (a round may accept past it)
        short = engine.generate([prompt], params(mode="speculative", max_new_tokens=n))[0]
        assert short.token_ids == full[:n] and short.finish_reason == "length"


def test_seeded_sampling_is_reproducible_and_batch_invariant(model):
    prompts = random_prompts(3, [4, 9, 12], seed=31)
    p = params(mode="speculative", temperature=1.0, seed=7, max_new_tokens=10)
    batched = _run(make_engine(model), prompts, p)
    assert batched == _run(make_engine(model), prompts, p)
    assert batched[1] == _run(make_engine(model), [prompts[1]], p)[0]


def _sequence(block, draft):
    seq = make_sequence([1, 2, 3], params(mode="speculative"))
    seq.tokens, seq.draft, seq.num_cached = list(block), list(draft), 3  # the prompt is prefilled
    return seq


@pytest.mark.parametrize("verified,accepted,committed", [
    ([9, 9, 9, 9], 0, [9]),  # the first draft token is wrong: only the AR correction
    ([4, 5, 9, 9], 2, [4, 5, 9]),  # two agree, then the correction
    ([4, 5, 6, 7], 3, [4, 5, 6, 7]),  # all agree: the verify's last row is the token past the block
])
def test_accept_commits_the_agreeing_prefix_and_the_verify_token(verified, accepted, committed):
    seq = _sequence([1, 2, 3, 10, 11], [4, 5, 6])  # known up to position 4; draft of positions 5..7
    seq._accept(verified)
    assert seq.tokens == [1, 2, 3, 10, 11, *committed] and seq.draft is None
    assert (seq.num_drafted, seq.num_accepted) == (3, accepted)
    seq.draft = [7, 8]  # a second round: the counts add up over the request
    seq._accept([7, 1, 1])
    assert (seq.num_drafted, seq.num_accepted) == (5, accepted + 1)


def test_rounds_feed_from_the_last_known_token_to_the_block_end(model):
    seq = _sequence([1, 2, 3, 10, 11, 12, 13, 14], [])  # 8 known: the next block opens at position 8
    seq.draft = None
    work = seq.next_work(prefill_budget=0)  # e = 7 (its K/V is not cached yet), block [8, 16)
    assert work.draft and work.start == 7 and len(work.token_ids) == 9 and work.token_ids[1:] == [MASK] * 8
    assert work.rows[0].kv_len == 16 and not work.rows[0].causal and work.logit_rows == list(range(8))
    seq.draft = list(range(20, 28))
    verify = seq.next_work(prefill_budget=0)
    assert verify.verify and verify.rows[0].causal and verify.logit_rows[:9] == list(range(9))
    # The lookahead: the next block's masks (positions 16..23) ride along; rows 9..15 predict 17..23.
    assert [(r.q_len, r.kv_len, r.causal) for r in verify.rows] == [(9, 16, True), (8, 24, False)]
    assert verify.token_ids[9:] == [MASK] * 8 and verify.logit_rows[9:] == list(range(9, 16))
    assert verify.lookahead == 7 and verify.settling_rows == 9
    plain = seq.next_work(prefill_budget=0, lookahead=False)  # a step with too many running: the verify alone
    assert len(plain.rows) == 1 and plain.logit_rows == list(range(9)) and plain.lookahead == 0
    seq.lookahead = False  # EngineConfig(speculative_lookahead=False): never
    assert seq.next_work(prefill_budget=0).lookahead == 0


def _predictions(tokens, probs):
    from fdllm.engine.sequence import Predictions

    return Predictions(tokens=list(tokens), probs=list(probs))


@pytest.mark.parametrize("verified,draft_after", [
    ([20, 21, 22, 23, 24, 25, 26, 27, 28], [40, MASK, 42, 43, 44, MASK, 46]),  # all accepted: lookahead drafts
    ([20, 21, 9, 9, 9, 9, 9, 9, 9], None),  # a correction at position 10: the lookahead assumed otherwise
])
def test_a_verify_drafts_the_next_round_only_when_it_accepts_the_whole_draft(verified, draft_after):
    seq = _sequence([1, 2, 3, 10, 11, 12, 13, 14], list(range(20, 28)))
    verify = seq.next_work(prefill_budget=0)
    ahead = [40 + i for i in range(7)]
    probs = [1.0] * 9 + [0.95, 0.5, 0.95, 0.95, 0.95, 0.2, 0.95]  # the threshold (0.9) picks the draft
    seq.apply(verify, _predictions(verified + ahead, probs))
    assert seq.draft == draft_after
    expected = verified if draft_after else verified[:3]
    assert seq.tokens == [1, 2, 3, 10, 11, 12, 13, 14, *expected]


def test_the_last_prefill_chunk_drafts_the_first_round_within_the_reservation():
    seq = make_sequence([1, 2, 3, 4, 5], params(mode="speculative"))  # 20 new tokens: pages up to 32 reserved
    work = seq.next_work(prefill_budget=64)  # the prompt, then masks at [5, 8) for the block holding 6
    assert [(r.q_len, r.kv_len, r.causal) for r in work.rows] == [(5, 5, True), (3, 8, False)]
    assert work.logit_rows == [4, 5, 6] and work.lookahead == 2 and work.num_prefill == 5
    seq.apply(work, _predictions([7, 8, 9], [1.0, 0.95, 0.95]))
    assert seq.tokens == [1, 2, 3, 4, 5, 7] and seq.draft == [8, 9]
    near_end = make_sequence(list(range(23)), params(mode="speculative", max_new_tokens=1))  # 3 pages: 24
    assert near_end.next_work(prefill_budget=64).lookahead == 0  # the next block lies past the reservation


def test_lookahead_saves_forwards_and_changes_no_token(joint_dir):
    prompts = [[(s + i) % 30 for i in range(n)] for s, n in [(3, 5), (11, 8), (20, 13), (1, 16)]]
    runs = {}
    for lookahead in (False, True):
        config = fdllm.EngineConfig(num_pages=64, speculative_lookahead=lookahead)
        runs[lookahead] = fdllm.Engine.from_pretrained(joint_dir, engine_config=config).generate(
            prompts, params(mode="speculative", max_new_tokens=24))
    assert [r.token_ids for r in runs[True]] == [r.token_ids for r in runs[False]]
    assert sum(r.num_forwards for r in runs[True]) < sum(r.num_forwards for r in runs[False])


def test_lookahead_only_in_steps_with_at_most_max_batch_running(joint_dir):
    """EngineConfig.speculative_lookahead_max_batch: four requests running together decode as without
    the lookahead, one alone as with it; the tokens never change."""
    prompts = [[(s + i) % 30 for i in range(n)] for s, n in [(3, 5), (11, 8), (20, 13), (1, 16)]]

    def run(batch, **engine_kw):
        config = fdllm.EngineConfig(num_pages=64, **engine_kw)
        engine = fdllm.Engine.from_pretrained(joint_dir, engine_config=config)
        return engine.generate(batch, params(mode="speculative", max_new_tokens=24))

    def forwards(results):
        return [r.num_forwards for r in results]

    on, off, capped = run(prompts), run(prompts, speculative_lookahead=False), run(prompts, speculative_lookahead_max_batch=3)
    assert [r.token_ids for r in capped] == [r.token_ids for r in on] == [r.token_ids for r in off]
    # requests 1 and 3 finish while all four run, so they never look ahead; request 2, left alone, does
    assert [forwards(capped)[i] for i in (1, 3)] == [forwards(off)[i] for i in (1, 3)]
    assert [forwards(on)[i] for i in (1, 3)] != [forwards(off)[i] for i in (1, 3)]
    assert sum(forwards(on)) <= sum(forwards(capped)) < sum(forwards(off))
    alone = run(prompts[:1], speculative_lookahead_max_batch=3)
    assert forwards(alone) == forwards(run(prompts[:1])) < forwards(off[:1])
    with pytest.raises(ValueError, match="speculative_lookahead_max_batch must be an int >= 1"):
        fdllm.EngineConfig(speculative_lookahead_max_batch=0)


def test_sampled_speculative_first_token_is_sampled_as_in_ar(model):
    """The prefill's last logit is AR's first token: sampled with the request's seed (the same draw
    as mode="ar", both the first forward's row 0), not its argmax."""
    prompt = random_prompts(1, [6], seed=33)[0]
    engine = make_engine(model)
    firsts = set()
    for seed in range(12):
        p = {"temperature": 2.0, "seed": seed, "max_new_tokens": 1}
        spec = engine.generate([prompt], params(mode="speculative", **p))[0].token_ids
        assert spec == engine.generate([prompt], params(mode="ar", **p))[0].token_ids
        firsts.add(spec[0])
    assert len(firsts) > 1  # sampled, not the argmax every time


# -- a jointly trained model (docs/method.md §5): causal prefix in the checkpoint, the engine follows it ------------


@pytest.fixture(scope="module")
def joint_dir(tmp_path_factory):
    """A tiny model trained briefly with the joint loss on a counting task, saved as a checkpoint."""
    from fdllm.config import ModelConfig
    from fdllm.loader import save_checkpoint

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = fdllm.Transformer(cfg)
    ids = (torch.arange(16)[:, None] + torch.arange(32)[None]) % 30  # count up from a random start, mod 30
    labels = ids.clone()
    labels[:, :4] = IGNORE_INDEX
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        batch = two_stream_batch(ids, labels, 31, 8, generator=g)
        loss, _ = joint_loss(model, batch, 8, mask_impl="dense")
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path_factory.mktemp("joint")
    save_checkpoint(model.eval(), path)
    fdllm.BlockDiffusionConfig(block_size=8, sub_block_size=4, threshold=0.5, mask_token_id=31,
                               prefix_attention="causal").save(path)
    return path


def test_joint_checkpoint_speculative_equals_ar_and_beats_one_token_per_forward(joint_dir):
    engine = fdllm.Engine.from_pretrained(joint_dir, engine_config=fdllm.EngineConfig(num_pages=64))
    assert engine.config.causal_prefix
    prompts = [[(s + i) % 30 for i in range(n)] for s, n in [(3, 5), (11, 8), (20, 13)]]
    ar = engine.generate(prompts, params(mode="ar", max_new_tokens=20))
    spec = engine.generate(prompts, params(mode="speculative", max_new_tokens=20))
    assert [r.token_ids for r in spec] == [r.token_ids for r in ar]
    assert sum(len(r.token_ids) for r in spec) > sum(r.num_forwards for r in spec)  # > 1 token per forward


def test_joint_checkpoint_diffusion_mode_prefills_and_commits_causally(joint_dir):
    engine = fdllm.Engine.from_pretrained(joint_dir, engine_config=fdllm.EngineConfig(num_pages=64))
    model = engine.model
    prompts = [[(s + i) % 30 for i in range(n)] for s, n in [(3, 5), (11, 8), (20, 16), (7, 19)]]
    got = engine.generate(prompts, params(max_new_tokens=14))
    for prompt, res in zip(prompts, got):
        causal = reference_generate(model, prompt, 14, 8, 4, 0.5, causal_prefix=True, mask_token_id=31)
        assert res.token_ids == causal


@pytest.mark.parametrize("causal_prefix", [False, True])
def test_diffusion_prefill_and_commit_rows_follow_the_prefix_attention(causal_prefix):
    seq = make_sequence(list(range(19)), causal_prefix=causal_prefix)
    prefill = seq.next_work(prefill_budget=64)  # 16 prompt tokens, then the first block's denoising step
    rows = [(r.q_len, r.kv_len, r.causal) for r in prefill.rows]
    expected = [(16, 16, True)] if causal_prefix else [(8, 8, False), (8, 16, False)]
    assert rows == expected + [(8, 24, False)]  # the noisy block always attends bidirectionally
    seq.num_cached, seq.block = 16, list(range(16, 24))  # a fully decoded block: next is its commit
    commit = seq.next_work(prefill_budget=64)
    assert commit.commit and [r.causal for r in commit.rows] == [causal_prefix]


def test_checkpoints_without_prefix_attention_stay_block_causal(tmp_path):
    import json

    fdllm.BlockDiffusionConfig(block_size=8, sub_block_size=4, mask_token_id=31).save(tmp_path)
    raw = json.loads((tmp_path / "fdllm_config.json").read_text())
    raw.pop("prefix_attention")  # as written before the field existed
    (tmp_path / "fdllm_config.json").write_text(json.dumps(raw))
    assert fdllm.BlockDiffusionConfig.load(tmp_path).prefix_attention == "block_causal"
    with pytest.raises(ValueError, match="prefix_attention must be one of"):
        fdllm.BlockDiffusionConfig(prefix_attention="bidirectional")


def test_speculative_equals_ar_on_every_held_out_world_record():
    """The lossless claim on the embedded world: the shipped base's speculative output is its AR output
    on every held-out record, all decoded together, and on a sample decoded alone."""
    from pipelines.evaluate import load_records, prompt_ids
    from pipelines.world import DEFAULT_DATA_DIR, DEFAULT_MODEL_DIR, TEST_FILE

    engine = fdllm.Engine.from_pretrained(DEFAULT_MODEL_DIR)
    prompts = [prompt_ids(engine, r) for r in load_records(DEFAULT_DATA_DIR / TEST_FILE)]
    assert len(prompts) == 300

    def greedy(mode: str):
        return fdllm.SamplingParams(max_new_tokens=48, mode=mode, temperature=0.0)

    ar = _run(engine, prompts, greedy("ar"))
    assert _run(engine, prompts, greedy("speculative")) == ar
    for i in range(0, 300, 15):  # alone: no batch neighbour to lean on
        assert _run(engine, [prompts[i]], greedy("speculative")) == [ar[i]], i


@pytest.mark.parametrize("lookahead_max_batch", [None, 1])
def test_seeded_speculative_samples_ar_s_own_tokens(model, lookahead_max_batch):
    """A draw per position: a seeded speculative request samples the AR request's tokens of the same
    seed, token for token, whatever its drafts, its lookahead (on in every step, or only while it runs
    alone) and the requests running beside it."""
    prompts = random_prompts(4, [3, 9, 13], seed=35)
    p = {"temperature": 1.5, "top_p": 0.95, "max_new_tokens": 24}
    ar = [make_engine(model).generate([pr], params(mode="ar", seed=i, **p))[0].token_ids for i, pr in enumerate(prompts)]
    engine = make_engine(model)
    engine.scheduler.lookahead_max_batch = lookahead_max_batch  # EngineConfig.speculative_lookahead_max_batch
    results = run_joining_mid_flight(engine, prompts, [params(mode="speculative", seed=i, **p) for i in range(4)])
    spec = [results[str(i)] for i in range(4)]
    assert [r.token_ids for r in spec] == ar
    assert sum(r.num_accepted for r in spec) > 0  # drafts were accepted (and others rejected) on the way
