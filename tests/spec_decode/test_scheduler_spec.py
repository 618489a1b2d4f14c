"""The scheduler with a proposer, and no model: a decoding sequence with k drafts is scheduled for 1 + k
tokens (blocks for them allocated as usual, the drafts sent in ``scheduled_spec_decode_tokens``); the
answer's accepted drafts are appended before the sampled token, the rejected ones never count as computed,
so only blocks of accepted tokens are published to the prefix cache; several tokens in one step stop at
the first stop (EOS, stop id, max_tokens); drafts never exceed the budget, max_tokens or the context; the
pool is whole again when everything finished; the counters add up."""

from __future__ import annotations

from llmserve.engine.block_manager import BlockManager, chain_hash, chain_root
from llmserve.engine.messages import ModelRunnerOutput, SchedulerOutput, TokenLogprobs, decode, encode
from llmserve.engine.scheduler import Scheduler
from llmserve.engine.sequence import Sequence
from llmserve.sampling_params import SamplingParams
from llmserve.spec_decode.adaptive import AcceptanceTracker
from llmserve.spec_decode.config import SpeculativeConfig
from llmserve.spec_decode.drafts_from_worker import DraftsFromWorker
from llmserve.spec_decode.ngram_proposer import NgramProposer
from llmserve.spec_decode.step_cost_fit import DecodingStepShape

BLOCK = 4
# A prompt whose n-gram lookup predicts 1 2 3 4 ... again.
PROMPT = [1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5, 6, 7, 8, 1]


def make(k: int = 3, num_blocks: int = 32, budget: int = 64, max_model_len: int | None = None) -> Scheduler:
    proposer = NgramProposer(SpeculativeConfig("ngram", k, prompt_lookup_min=1, prompt_lookup_max=3))
    return Scheduler(BlockManager(num_blocks, BLOCK, True), 8, budget, max_model_len=max_model_len,
                     proposer=proposer)


def add(sched: Scheduler, max_tokens: int = 20, eos: int | None = None, **params) -> Sequence:
    seq = Sequence(len(sched.running) + len(sched.waiting), "r", 0, list(PROMPT),
                   SamplingParams(max_tokens=max_tokens, **params), max_tokens, eos)
    sched.add(seq)
    return seq


def answer(sched: Scheduler, out: SchedulerOutput, accept: int, token: int = 99):
    """Every sampled sequence accepts its first ``accept`` drafts and then gets ``token``."""
    sampled, accepted = {}, {}
    for seq in list(sched.running.values()):
        n = out.num_scheduled_tokens.get(seq.seq_id)
        drafts = out.scheduled_spec_decode_tokens.get(seq.seq_id, [])
        if n is not None and seq.num_computed_tokens + n == seq.num_tokens + len(drafts):
            sampled[seq.seq_id] = token
            if drafts:
                accepted[seq.seq_id] = min(accept, len(drafts))
    return sched.update_from_output(out, ModelRunnerOutput(sampled=sampled, num_accepted_drafts=accepted))


def test_drafts_are_scheduled_and_rejected_ones_are_rolled_back():
    sched = make(k=3)
    seq = add(sched)
    answer(sched, sched.schedule(), accept=0, token=2)     # the prompt; samples 2: "... 1 2" repeats
    out = sched.schedule()
    assert out.scheduled_spec_decode_tokens == {seq.seq_id: [3, 4, 5]}
    assert out.num_scheduled_tokens == {seq.seq_id: 4}
    assert len(seq.block_table) == -(-(len(PROMPT) + 1 + 3) // BLOCK)   # room for the drafts, as for any token
    answer(sched, out, accept=1, token=9)
    assert seq.output_token_ids == [2, 3, 9]
    # 2 and 3 have K/V (2 computed as the step's input, 3 as an accepted draft); 9 is next step's input.
    assert seq.num_computed_tokens == len(PROMPT) + 2 == seq.num_tokens - 1
    assert sched.spec_stats.num_drafts == 1 and sched.spec_stats.num_draft_tokens == 3
    assert sched.spec_stats.num_accepted_tokens == 1 and sched.spec_stats.num_accepted_tokens_per_pos == [1, 0, 0]
    nxt = sched.schedule()
    [cached] = nxt.cached_seqs
    assert cached.new_token_ids == [3, 9] and cached.num_computed_tokens == len(PROMPT) + 2
    # Drafts and their verdicts cross process boundaries as msgpack, unchanged.
    assert decode(encode(out), SchedulerOutput) == out
    result = ModelRunnerOutput(sampled={1: 4}, num_accepted_drafts={1: 2},
                               draft_logprobs={1: [TokenLogprobs(3, -0.5, 1), TokenLogprobs(8, -0.1, 1)]})
    assert decode(encode(result), ModelRunnerOutput) == result


def test_only_blocks_of_accepted_tokens_are_published():
    sched = make(k=3)
    seq = add(sched)
    answer(sched, sched.schedule(), accept=0, token=2)     # 18 tokens, 17 computed: 4 full blocks
    answer(sched, sched.schedule(), accept=0, token=7)     # drafts 3 4 5 rejected: 18 computed, 19 tokens
    bm = sched.block_manager
    assert seq.num_published_blocks == 4
    assert seq.all_token_ids[16:] == [1, 2, 7]
    answer(sched, sched.schedule(), accept=3, token=7)    # whatever drafts it gets, all accepted
    full = seq.num_computed_tokens // BLOCK
    assert seq.num_published_blocks == full == 5
    parent = chain_root(b"")
    for i in range(full):   # every published hash is of the tokens the sequence really has
        parent = chain_hash(parent, seq.all_token_ids[i * BLOCK:(i + 1) * BLOCK])
        assert bm.cached[0, parent] == seq.block_table[i]


def test_several_tokens_stop_at_the_first_stop():
    sched = make(k=3)
    seq = add(sched, eos=4)
    answer(sched, sched.schedule(), accept=0, token=2)
    answer(sched, sched.schedule(), accept=3, token=9)     # drafts 3 4 5: 4 is EOS
    assert seq.output_token_ids == [2, 3, 4] and seq.finish_reason == "stop" and seq.is_finished
    sched = make(k=3)
    seq = add(sched, stop_token_ids=[3])
    answer(sched, sched.schedule(), accept=0, token=2)
    step = answer(sched, sched.schedule(), accept=3, token=9)
    assert seq.output_token_ids == [2, 3] and seq.stop_reason == 3
    assert [token for _, token, _ in step.sampled] == [3]
    sched = make(k=3)
    seq = add(sched, eos=4, min_tokens=4)                 # EOS under min_tokens does not stop
    answer(sched, sched.schedule(), accept=0, token=2)
    answer(sched, sched.schedule(), accept=3, token=9)
    assert seq.output_token_ids == [2, 3, 4, 5, 9] and not seq.is_finished
    assert sched.block_manager.num_free_blocks < sched.block_manager.num_blocks


def test_drafts_never_pass_max_tokens_the_context_or_the_budget():
    sched = make(k=3)
    seq = add(sched, max_tokens=3)
    answer(sched, sched.schedule(), accept=0, token=2)
    out = sched.schedule()
    assert out.scheduled_spec_decode_tokens[seq.seq_id] == [3]   # 2 more tokens allowed: 1 draft + 1 sampled
    answer(sched, out, accept=1, token=9)
    assert seq.output_token_ids == [2, 3, 9] and seq.finish_reason == "length"
    sched = make(k=3, max_model_len=len(PROMPT) + 3)
    seq = add(sched)
    answer(sched, sched.schedule(), accept=0, token=2)
    assert sched.schedule().scheduled_spec_decode_tokens[seq.seq_id] == [3]
    sched = make(k=3, budget=len(PROMPT))
    seq = add(sched)
    answer(sched, sched.schedule(), accept=0, token=2)
    sched.max_num_batched_tokens = 2
    out = sched.schedule()
    assert out.scheduled_spec_decode_tokens[seq.seq_id] == [3] and out.num_scheduled_tokens[seq.seq_id] == 2


def test_no_drafts_for_grammar_constrained_or_prefilling_sequences():
    sched = make(k=3)
    seq = add(sched, structured_outputs={"regex": "[0-9]+"})
    answer(sched, sched.schedule(), accept=0, token=2)
    out = sched.schedule()
    assert out.scheduled_spec_decode_tokens == {} and out.num_scheduled_tokens == {seq.seq_id: 1}
    sched = make(k=3, budget=8)                          # a prompt in chunks: drafts only once it decodes
    seq = add(sched)
    for expected in (8, 8, 1):                           # 17 prompt tokens, the last one alone
        out = sched.schedule()
        assert out.num_scheduled_tokens == {seq.seq_id: expected} and out.scheduled_spec_decode_tokens == {}
        answer(sched, out, accept=0, token=2)
    assert sched.schedule().scheduled_spec_decode_tokens == {seq.seq_id: [3, 4, 5]}


def test_every_block_is_free_after_preemption_and_finish():
    sched = make(k=3, num_blocks=12)
    a, b = add(sched, max_tokens=30), add(sched, max_tokens=30)
    for _ in range(40):
        out = sched.schedule()
        if out.is_empty:
            break
        answer(sched, out, accept=2, token=1)
    assert a.is_finished and b.is_finished and sched.num_preemptions > 0
    assert len(a.output_token_ids) == len(b.output_token_ids) == 30
    bm = sched.block_manager
    assert bm.num_free_blocks == bm.num_blocks and all(rc == 0 for rc in bm.ref_counts)
    stats = sched.spec_stats
    assert stats.num_accepted_tokens <= stats.num_draft_tokens
    assert stats.num_accepted_tokens == sum(stats.num_accepted_tokens_per_pos)


def test_a_draft_models_drafts_come_back_with_the_result_and_get_lookahead_slots():
    """A draft model drafts in the worker after a step: the drafts come back in the result, are checked in the
    sequence's next step, and every step that samples reserves k more slots for the K/V drafting writes."""
    k = 3
    sched = Scheduler(BlockManager(32, BLOCK, True), 8, 64,
                      proposer=DraftsFromWorker(SpeculativeConfig("draft_model", k, model="d")))
    seq = add(sched)
    out = sched.schedule()
    assert len(seq.block_table) == -(-(len(PROMPT) + k) // BLOCK)    # a whole prompt's step samples too
    sched.update_from_output(out, ModelRunnerOutput(sampled={seq.seq_id: 2}, draft_token_ids={seq.seq_id: [3, 4]}))
    out = sched.schedule()
    assert out.scheduled_spec_decode_tokens == {seq.seq_id: [3, 4]}
    assert len(seq.block_table) == -(-(len(PROMPT) + 1 + 2 + k) // BLOCK)   # 1 + 2 tokens, then k drafted
    sched.update_from_output(out, ModelRunnerOutput(sampled={seq.seq_id: 7}, num_accepted_drafts={seq.seq_id: 2},
                                                    draft_token_ids={seq.seq_id: [8]}))
    assert seq.output_token_ids == [2, 3, 4, 7]
    assert sched.schedule().scheduled_spec_decode_tokens == {seq.seq_id: [8]}


def test_a_prompt_ending_on_a_block_boundary_leaves_the_draft_model_room_after_its_prefill():
    """The prefill step samples, so the draft model drafts after it: a prompt that fills its last block exactly
    gets the k lookahead slots with its blocks (without them it could draft nothing, and its next step would feed
    the draft model the whole prompt again)."""
    k = 3
    sched = Scheduler(BlockManager(32, BLOCK, True), 8, 64,
                      proposer=DraftsFromWorker(SpeculativeConfig("draft_model", k, model="d")))
    seq = Sequence(0, "r", 0, PROMPT[:16], SamplingParams(max_tokens=8), 8, None)
    sched.add(seq)
    sched.schedule()
    assert len(seq.block_table) == -(-(16 + k) // BLOCK) == 16 // BLOCK + 1


def test_adaptive_caps_limit_the_drafts_and_are_sent_to_a_draft_model():
    class NoDrafts:   # the policy's view with every sequence capped at 0
        tracker = AcceptanceTracker()

        def num_drafts(self, seq_ids, context_lens):
            return dict.fromkeys(seq_ids, 0)

    sched = Scheduler(BlockManager(32, BLOCK, True), 8, 64,
                      proposer=DraftsFromWorker(SpeculativeConfig("draft_model", 3, model="d")), adaptive=NoDrafts())
    seq = add(sched)
    out = sched.schedule()
    assert out.num_drafts_after_step == {seq.seq_id: 0}
    sched.update_from_output(out, ModelRunnerOutput(sampled={seq.seq_id: 2}, draft_token_ids={seq.seq_id: [3, 4]}))
    out = sched.schedule()
    assert out.scheduled_spec_decode_tokens == {} and out.num_scheduled_tokens == {seq.seq_id: 1}


def test_a_decoding_steps_shape_and_time_reach_the_adaptive_policy():
    """The policy sees each decoding sequence's context; a step of decoding sequences only is reported with its
    rows and tokens, the sums of their contexts and the draft model's drafting rows and passes after it, any
    other step (here the prompt's) not at all."""
    class Recording:
        tracker = AcceptanceTracker()
        contexts: list[list[int]] = []
        observed: list[tuple] = []

        def num_drafts(self, seq_ids, context_lens):
            self.contexts.append(list(context_lens))
            return dict.fromkeys(seq_ids, 2)

        def observe_step(self, seconds, shape):
            self.observed.append((seconds, shape))

    policy = Recording()
    sched = Scheduler(BlockManager(32, BLOCK, True), 8, 64,
                      proposer=DraftsFromWorker(SpeculativeConfig("draft_model", 3, model="d")), adaptive=policy)
    seq = add(sched)
    out = sched.schedule()
    sched.update_from_output(out, ModelRunnerOutput(sampled={seq.seq_id: 2}, draft_token_ids={seq.seq_id: [3, 4]}))
    sched.speculation.observe_step_time(0.5)
    assert policy.observed == [] and policy.contexts == [[]]
    out = sched.schedule()
    assert out.num_scheduled_tokens == {seq.seq_id: 3} and policy.contexts[-1] == [len(PROMPT)]
    sched.update_from_output(out, ModelRunnerOutput(sampled={seq.seq_id: 7}, num_accepted_drafts={seq.seq_id: 2}))
    sched.speculation.observe_step_time(0.25)
    assert policy.observed == [(0.25, DecodingStepShape(1, 3, len(PROMPT), 3 * len(PROMPT), 1, 2))]
