"""Greedy output equals Hugging Face transformers token for token, and logprobs agree within 1e-3,
for every supported family and under every scheduling condition that changes how the KV cache is
filled: chunked prefill, preemption, block sizes 1 and 16, and requests joining mid-run."""

from __future__ import annotations

import pytest

from llmserve import LLM, SamplingParams
from llmserve.models.falcon import falcon_kv_heads
from tests.conftest import FAMILY_NAMES
from tests.hf_reference import hf_greedy, hf_prompt_logprobs

MAX_TOKENS = 12
PROMPTS = [
    "Hello world, this is",
    "The quick brown fox jumps over the lazy dog and then keeps running far away into the forest",
    "A",
    "Une phrase en français, avec des accents: café, naïve, garçon. 日本語もあります",
    "def add(a, b):\n    return a + b\n\n# call it with two numbers and print the result",
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=1)


def assert_matches_hf(path, outputs, max_tokens: int = MAX_TOKENS) -> None:
    for out in outputs:
        ref_tokens, ref_logprobs = hf_greedy(path, out.prompt_token_ids, max_tokens)
        completion = out.outputs[0]
        assert completion.token_ids == ref_tokens, f"prompt {out.prompt!r}"
        got = [pos[t].logprob for pos, t in zip(completion.logprobs, completion.token_ids)]
        assert got == pytest.approx(ref_logprobs, abs=1e-3)
        assert completion.finish_reason == "length"


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_batch_of_prompts_matches_hf(checkpoint_dir, family):
    path = checkpoint_dir(family)
    llm = LLM(str(path), kv_cache_memory_bytes="32MiB")
    assert_matches_hf(path, llm.generate(PROMPTS, GREEDY))


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("block_size", [1, 16])
def test_block_sizes(checkpoint_dir, family, block_size):
    path = checkpoint_dir(family)
    llm = LLM(str(path), block_size=block_size, kv_cache_memory_bytes="32MiB")
    assert_matches_hf(path, llm.generate(PROMPTS, GREEDY))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_chunked_prefill(checkpoint_dir, family):
    """A 7-token budget splits every longer prompt across several steps, mixed with other decodes."""
    path = checkpoint_dir(family)
    llm = LLM(str(path), max_num_batched_tokens=7, block_size=4, kv_cache_memory_bytes="32MiB")
    assert_matches_hf(path, llm.generate(PROMPTS, GREEDY))


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_preemption_recomputes_identically(checkpoint_dir, family):
    """A cache of 24 blocks x 4 tokens cannot hold all five sequences: some are preempted and recomputed."""
    path = checkpoint_dir(family)
    llm = LLM(str(path), block_size=4, kv_cache_memory_bytes=24 * llm_block_bytes(path, 4))
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=0))
    assert llm.engine.scheduler.num_preemptions > 0
    assert sum(o.num_preemptions for o in outputs) > 0
    assert_matches_hf(path, outputs, max_tokens=24)
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def assert_prefix_cache_repeats(llm: LLM, outputs: list) -> None:
    """A repeated prompt is served from the prefix cache and gives the same greedy tokens as its first run
    (``outputs``: the greedy outputs of PROMPTS)."""
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    llm.generate(PROMPTS[1:2], params)
    hits = llm.engine.block_manager.prefix_hit_tokens
    again = llm.generate(PROMPTS[1:2], params)
    assert llm.engine.block_manager.prefix_hit_tokens > hits
    assert again[0].outputs[0].token_ids == outputs[1].outputs[0].token_ids[:8]


def preempting_blocks(family: str) -> int:
    """Blocks of 4 tokens (in every layer) too few for the five :data:`PROMPTS` generating 24 tokens each in
    7-token steps, so that some are preempted. Phi-3 slides a 10-token window on every layer: its sequences hold
    only the window's blocks (the older ones are freed), so it needs a smaller cache than the others. Gemma 3,
    Cohere2 and Gemma 4 form KV-cache groups of one layer (the same bytes hold 6x, 4x and 3.75x the blocks: Gemma
    4's pages are its sliding layers', the largest) whose sliding groups free theirs: smaller caches too."""
    if family == "phi3":
        return 14
    return {"gemma3": 8, "cohere2": 10, "gemma4": 12, "gemma4_moe": 12}.get(family, 24)


def kv_cache_layer_types(cfg) -> list[str]:
    """The layer types of a tiny model's layers that hold a KV cache (Gemma 4's layers sharing K/V hold none)."""
    kinds = list(getattr(cfg, "layer_types", None) or [])
    return kinds[:cfg.num_hidden_layers - (getattr(cfg, "num_kv_shared_layers", 0) or 0)]


def kv_cache_group_size(path) -> int | None:
    """Layers one KV block spans in a tiny model that mixes full and sliding layers (its KV-cache groups hold as
    many layers as its rarer kind: llmserve.worker.kv_cache_groups); None where the model forms one group (every
    layer alike)."""
    from transformers import AutoConfig

    kinds = kv_cache_layer_types(AutoConfig.from_pretrained(path))
    if len(set(kinds)) < 2:
        return None
    return min(kinds.count(kind) for kind in set(kinds))


def _rank_heads(kv_heads: int, tp: int) -> int:
    """KV heads on one of ``tp`` ranks (fewer than the ranks are replicated, one on each)."""
    return kv_heads // tp if kv_heads >= tp else 1


def llm_block_bytes(path, block_size: int, tp: int = 1) -> int:
    """Bytes of one KV block in every layer of the tiny model on one of ``tp`` ranks (2 tensors x layers x block x
    the rank's KV heads x head_dim x 4 bytes)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path)   # maps GPT-2's n_layer / n_head / n_embd onto the usual names
    if getattr(cfg, "kv_lora_rank", None):   # MLA: one tensor of latent + rope key per token, on every rank
        return cfg.num_hidden_layers * block_size * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
    if cfg.model_type == "gemma4_text":   # per-layer head sizes; layers sharing K/V hold none
        return sum(gemma4_page_bytes(cfg, i, block_size, tp) for i in range(len(kv_cache_layer_types(cfg))))
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = (falcon_kv_heads(cfg) if cfg.model_type == "falcon"
                else getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    return 2 * cfg.num_hidden_layers * block_size * _rank_heads(kv_heads, tp) * head_dim * 4


def gemma4_page_bytes(cfg, layer: int, block_size: int, tp: int) -> int:
    """Bytes of one block of a Gemma 4 layer's keys and values on one of ``tp`` ranks (head sizes per layer)."""
    layer_config = cfg.per_layer_config[layer]
    return 2 * block_size * _rank_heads(layer_config.num_key_value_heads, tp) * layer_config.head_dim * 4


def pool_block_bytes(path, block_size: int, tp: int = 1) -> int:
    """Bytes one block of the KV-cache pool takes on one of ``tp`` ranks: one cache tensor per layer of a KV-cache
    group (each kind of layer has one in every tensor), each a page as large as its largest layer's."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path)
    size = kv_cache_group_size(path)
    if size is None:
        return llm_block_bytes(path, block_size, tp)
    if cfg.model_type == "gemma4_text":
        return size * max(gemma4_page_bytes(cfg, i, block_size, tp) for i in range(len(kv_cache_layer_types(cfg))))
    return llm_block_bytes(path, block_size, tp) // cfg.num_hidden_layers * size


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "gemma4", "gpt2", "cohere", "cohere2", "phi3", "phi3_longrope",
                                    "phi4_mini", "bloom", "falcon", "falcon_mqa", "falcon_rw", "mixtral", "qwen2_moe",
                                    "qwen3_moe", "deepseek_v2_lite", "deepseek_v2", "deepseek_v3", "gemma4_moe"])
def test_chunked_prefill_preemption_and_prefix_caching(checkpoint_dir, family):
    """One engine per family under everything that changes how the KV cache fills: 7-token steps split the
    prompts, 24 blocks of 4 tokens force preemption, and a repeated prompt is served from the prefix cache.
    The tiny Gemmas, Cohere2 and Phi-3 slide a 10-token window (Gemma 3 on 5 of its 6 layers, Gemma 4 on 4 of 6,
    one of them reading another's K/V, Cohere2 on 3 of 4),
    shorter than most prompts and than every prompt plus its 24 tokens; BLOOM and Falcon-RW bias every score by
    ALiBi, over the cached context of each chunk and decode. The LongRoPE Phi-3s switch at 32 tokens: of the
    prompts (2, 11, 30, 39 and 60 tokens) two start past it, one stays short and two cross it while generating,
    and a preempted sequence recomputes its keys with the factors they were first computed with. The MoE families
    route each chunk's tokens and each decode batch to their experts (top-1, 2 and 3; experts left without a token
    in a step run nothing; Gemma 4's beside its dense MLPs). The DeepSeeks cache one latent per token and attend over it with absorbed weights, in
    decodes and in chunks over cached context alike."""
    path = checkpoint_dir(family)
    llm = LLM(str(path), block_size=4, max_num_batched_tokens=7,
              kv_cache_memory_bytes=preempting_blocks(family) * llm_block_bytes(path, 4))
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=0))
    assert llm.engine.scheduler.num_preemptions > 0
    assert_matches_hf(path, outputs, max_tokens=24)
    assert_prefix_cache_repeats(llm, outputs)


LONGROPE_SWITCH = 32   # the tiny LongRoPE checkpoints' original_max_position_embeddings
AROUND_THE_SWITCH = [[(i * 37 + n) % 1990 + 5 for i in range(n)] for n in (5, 25, 32, 33, 45)]


@pytest.mark.parametrize("family", ["phi3_longrope", "phi4_mini"])
def test_longrope_switches_per_sequence_in_one_batch(checkpoint_dir, family):
    """Prompts of 5, 25, 32, 33 and 45 tokens in one batch, 7-token steps: the 33- and 45-token prompts rotate
    every key long, the 5-token one stays short, the 25- and 32-token ones cross the switch while generating and
    keep their earlier keys short, as transformers does for each of them alone."""
    path = checkpoint_dir(family)
    llm = LLM(str(path), block_size=4, max_num_batched_tokens=7, kv_cache_memory_bytes="32MiB")
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=0)
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in AROUND_THE_SWITCH], params)
    assert_matches_hf(path, outputs, max_tokens=16)


def test_longrope_prefix_cache_keeps_the_two_rotations_apart(checkpoint_dir):
    """A 28-token prompt (short keys) is the prefix of a 40-token one (long keys from the first): the same tokens
    hold different keys, so neither reuses the other's blocks, while each repeat reuses its own."""
    path = checkpoint_dir("phi3_longrope")
    llm = LLM(str(path), block_size=4, kv_cache_memory_bytes="32MiB")
    manager = llm.engine.block_manager
    long_prompt = [(i * 37) % 1990 + 5 for i in range(40)]
    short_prompt = long_prompt[:28]
    assert len(short_prompt) <= LONGROPE_SWITCH < len(long_prompt)
    for prompt, hits_expected in ((short_prompt, False), (long_prompt, False), (long_prompt, True),
                                  (short_prompt, True)):
        hits = manager.prefix_hit_tokens
        outputs = llm.generate([{"prompt_token_ids": prompt}], GREEDY)
        assert (manager.prefix_hit_tokens > hits) == hits_expected
        assert_matches_hf(path, outputs)


def test_requests_added_mid_run(llama_dir):
    """New requests join between decode steps of others; every output still equals HF."""
    llm = LLM(str(llama_dir), block_size=4, kv_cache_memory_bytes="32MiB")
    engine = llm.engine
    finished = {}
    pending = list(enumerate(PROMPTS))
    step = 0
    while pending or engine.has_unfinished_requests():
        if pending and step % 3 == 0:
            i, prompt = pending.pop(0)
            engine.add_request(f"r{i}", prompt, GREEDY)
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        step += 1
    assert len(finished) == len(PROMPTS)
    assert_matches_hf(llama_dir, finished.values())


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_prompt_logprobs_match_hf(checkpoint_dir, family):
    path = checkpoint_dir(family)
    llm = LLM(str(path), max_num_batched_tokens=5, block_size=4, kv_cache_memory_bytes="32MiB")
    params = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=3)
    for out in llm.generate(PROMPTS[:2], params):
        assert out.prompt_logprobs[0] is None
        assert len(out.prompt_logprobs) == len(out.prompt_token_ids)
        got = [pos[t].logprob for pos, t in zip(out.prompt_logprobs[1:], out.prompt_token_ids[1:])]
        assert got == pytest.approx(hf_prompt_logprobs(path, out.prompt_token_ids), abs=1e-3)
        assert all(len(pos) >= 3 for pos in out.prompt_logprobs[1:])


def test_token_id_prompts_equal_text_prompts(llama_dir):
    llm = LLM(str(llama_dir), kv_cache_memory_bytes="32MiB")
    by_text = llm.generate(PROMPTS[:2], GREEDY)
    by_ids = llm.generate([o.prompt_token_ids for o in by_text], GREEDY)
    assert [o.outputs[0].token_ids for o in by_text] == [o.outputs[0].token_ids for o in by_ids]
    assert [o.outputs[0].text for o in by_text] == [o.outputs[0].text for o in by_ids]


@pytest.fixture
def without_cpu_kernels(monkeypatch):
    """The PyTorch paths the engine takes where the C kernels cannot be built (no compiler)."""
    from llmserve.layers.cpu_kernels import CPU_KERNELS_ENV, cpu_kernels

    monkeypatch.setenv(CPU_KERNELS_ENV, "0")
    cpu_kernels.cache_clear()
    yield
    monkeypatch.undo()
    cpu_kernels.cache_clear()


# Soft-caps, a window, ALiBi, shared K/V and latent attention in PyTorch.
@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "gemma4", "bloom", "deepseek_v2_lite", "deepseek_v2",
                                    "deepseek_v3"])
def test_pytorch_paths_without_cpu_kernels_match_hf(checkpoint_dir, family, without_cpu_kernels):
    path = checkpoint_dir(family)
    llm = LLM(str(path), max_num_batched_tokens=7, block_size=4, kv_cache_memory_bytes="32MiB")
    assert llm.engine.runner.backend.name == "torch"
    assert_matches_hf(path, llm.generate(PROMPTS, GREEDY))


SLIDING = {
    "mistral": {"sliding_window": 6},                                                      # every layer
    "qwen2": {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 1},    # layer 1 only
}


@pytest.mark.parametrize("family", sorted(SLIDING))
def test_sliding_window_matches_hf(checkpoint_dir, tmp_path, family):
    """A 6-token window, much shorter than the prompts and outputs: the context is not capped at the
    window; each windowed layer attends to its last 6 positions, as HF does, through chunked prefill
    (7-token steps), decodes and preemption (24 blocks of 4 tokens; 10 for Mistral, which slides on every layer
    and so holds only its window's blocks)."""
    import json
    import shutil

    path = tmp_path / family
    shutil.copytree(checkpoint_dir(family), path)
    config = json.loads((path / "config.json").read_text())
    config.update(SLIDING[family])
    (path / "config.json").write_text(json.dumps(config))
    num_blocks = 10 if family == "mistral" else 24
    llm = LLM(str(path), block_size=4, max_num_batched_tokens=7,
              kv_cache_memory_bytes=num_blocks * llm_block_bytes(path, 4))
    assert llm.engine.max_model_len == config["max_position_embeddings"]
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=0))
    assert llm.engine.scheduler.num_preemptions > 0
    assert_matches_hf(path, outputs, max_tokens=24)
    # The window changes the output (so the comparison above could fail).
    full = LLM(str(checkpoint_dir(family)), kv_cache_memory_bytes="32MiB").generate(
        PROMPTS, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in full] != [o.outputs[0].token_ids for o in outputs]
