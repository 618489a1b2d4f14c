"""Every backend (PyTorch, the CPU kernel, Triton under the interpreter) against a dense reference written
here, on batches mixing the row kinds a step can hold:

(a) decodes: one query token over any context (a 1-token prompt, short and long contexts);
(b) rows of k > 1 query tokens over a cached context (speculative verification of 1 + k tokens, prefill
    chunks after earlier chunks), causal within the chunk;
(c) fresh prompts (no context), and a one-token row among the non-decode rows;

with block sizes 1 and 16, GQA ratios 1, 2 and 3, sliding windows (shorter than one row's query, than the
contexts, or longer than everything) and a logit soft-cap, on and off. Window semantics are transformers'
(``sliding_window_causal_mask_function``): a query at position p sees keys p - window < j <= p.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from llmserve.layers.attention.backend import AttentionBackend, AttentionSpec
from llmserve.layers.attention.cpu_backend import CPUAttentionBackend
from llmserve.layers.attention.torch_backend import TorchAttentionBackend
from llmserve.layers.cpu_kernels import cpu_kernels
from tests.layers.attention.paged_batch import PagedBatch

CPU = torch.device("cpu")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOLERANCES = {torch.float32: (2e-5, 1e-4), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def reference_mask(context_len: int, query_len: int, window: int | None) -> torch.Tensor:
    """[Q, S] keep-mask of queries at positions context_len.. over keys 0..S-1: causal, and within the
    window (keys p - window < j <= p), written out independently of the backends."""
    seq_len = context_len + query_len
    keep = torch.zeros(query_len, seq_len, dtype=torch.bool)
    for i in range(query_len):
        p = context_len + i
        for j in range(seq_len):
            keep[i, j] = j <= p and (window is None or j > p - window)
    return keep


def reference_attention(q, k, v, context_len, scale, window=None, soft_cap=None):
    """Dense float64 attention of q [Q, H, D] (positions context_len..) over k/v [S, KV, D]."""
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)
    v = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,shd->hqs", q.double(), k) * scale
    if soft_cap is not None:
        scores = soft_cap * torch.tanh(scores / soft_cap)
    keep = reference_mask(context_len, q.shape[0], window).to(scores.device)
    scores = scores.masked_fill(~keep, float("-inf"))
    return torch.einsum("hqs,shd->qhd", scores.softmax(-1), v)


def test_reference_window_is_transformers_sliding_window_causal_mask():
    masking_utils = pytest.importorskip("transformers.masking_utils")
    for window in (1, 3, 7):
        for ctx, n in [(0, 12), (9, 4), (20, 1)]:
            mask_fn = masking_utils.sliding_window_causal_mask_function(window)
            q_idx = torch.arange(ctx, ctx + n)[:, None]
            kv_idx = torch.arange(ctx + n)[None, :]
            hf = mask_fn(0, 0, q_idx, kv_idx).expand(n, ctx + n)
            assert torch.equal(hf, reference_mask(ctx, n, window))


class Batch(PagedBatch):
    """A :class:`PagedBatch` whose ``num_decodes`` leading rows have one query token. Its tensors stay on the CPU
    (the reference's and the CPU backends' device); a Triton run moves them to :data:`DEVICE`."""

    def __init__(self, seqs, num_decodes, block_size, num_heads, num_kv_heads, head_dim, dtype=torch.float32,
                 seed=0, query_scale=1.0):
        super().__init__(seqs, block_size, num_heads, num_kv_heads, head_dim, dtype, seed, query_scale=query_scale)
        self.num_decodes = num_decodes
        self.shape = (num_heads, num_kv_heads, head_dim)

    def caches(self, device):
        return self.key_cache.clone().to(device), self.value_cache.clone().to(device)

    def layout(self, device):
        return self.batch_layout(self.num_decodes, device)

    def spec(self, window=None, soft_cap=None):
        num_heads, num_kv_heads, head_dim = self.shape
        return AttentionSpec(num_heads, num_kv_heads, head_dim, head_dim ** -0.5, sliding_window=window,
                             logits_soft_cap=soft_cap)

    def expected(self, spec):
        return torch.cat([reference_attention(q, k, v, ctx, spec.scale, spec.sliding_window, spec.logits_soft_cap)
                          for (ctx, _), q, k, v in zip(self.seqs, self.queries, self.full_k, self.full_v)])


# (context, new tokens): decodes first (a 1-token prompt among them), then verification rows of 1 + k tokens
# over long and short contexts, prompts, a one-token row that is not a decode, and a chunk of 45 tokens
# after 70 cached ones (longer than a Triton prefill tile for GQA 2 and 3, with windows starting tiles later).
MIXED = [(0, 1), (5, 1), (37, 1), (130, 1), (100, 4), (9, 3), (60, 2), (0, 19), (3, 1), (70, 45)]
MIXED_DECODES = 4


def make_backend(name: str, dtype: torch.dtype = torch.float32) -> AttentionBackend:
    if name == "torch":
        return TorchAttentionBackend(dtype)
    if name == "cpu":
        kernels = cpu_kernels()
        assert kernels is not None, "the test machine has a C compiler"
        return CPUAttentionBackend(kernels, dtype)
    pytest.importorskip("triton", reason="triton is not installed")
    from llmserve.layers.attention.triton_backend import TritonAttentionBackend

    return TritonAttentionBackend(dtype, num_kv_heads=2)


def run(backend_name, batch, spec, dtype=torch.float32):
    device = DEVICE if backend_name == "triton" else CPU
    backend = make_backend(backend_name, dtype)
    key_cache, value_cache = batch.caches(device)
    metadata = backend.build_metadata(batch.layout(device), device)
    out = backend.forward(batch.query.to(device), batch.key.to(device), batch.value.to(device), key_cache,
                          value_cache, metadata, spec)
    return out, key_cache


def assert_close(actual, expected, dtype=torch.float32):
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend_name", ["torch", "cpu", "triton"])
@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("num_heads", [2, 4, 6])   # over 2 KV heads: GQA 1, 2, 3
@pytest.mark.parametrize("window", [None, 7, 40, 1000])
@pytest.mark.parametrize("soft_cap", [None, 2.5])
def test_mixed_rows_match_dense_reference(backend_name, block_size, num_heads, window, soft_cap):
    # Queries scaled up so scores reach well past the cap (where tanh bends).
    batch = Batch(MIXED, MIXED_DECODES, block_size, num_heads, 2, 64, seed=block_size + num_heads,
                  query_scale=3.0)
    spec = batch.spec(window, soft_cap)
    out, key_cache = run(backend_name, batch, spec)
    assert_close(out, batch.expected(spec))
    flat_k = key_cache.view(-1, 2, 64).cpu()
    assert torch.equal(flat_k[batch.slots], batch.key)   # the new tokens' K/V were stored


@pytest.mark.parametrize("backend_name", ["torch", "cpu", "triton"])
def test_layers_with_different_specs_share_one_step_metadata(backend_name):
    """Alternating sliding / full / soft-capped layers (Gemma 2) over one step's metadata: each layer gets
    its own masks, built once per window and reused."""
    batch = Batch(MIXED, MIXED_DECODES, 4, 4, 2, 64, seed=5, query_scale=2.0)
    device = DEVICE if backend_name == "triton" else CPU
    backend = make_backend(backend_name)
    key_cache, value_cache = batch.caches(device)
    metadata = backend.build_metadata(batch.layout(device), device)
    specs = [batch.spec(7, 2.0), batch.spec(None, 2.0), batch.spec(7, 2.0), batch.spec(33), batch.spec(None),
             batch.spec(1), batch.spec(7, 2.0)]
    for spec in specs:
        out = backend.forward(batch.query.to(device), batch.key.to(device), batch.value.to(device), key_cache,
                              value_cache, metadata, spec)
        assert_close(out, batch.expected(spec))
    if backend_name == "torch":
        assert metadata.decodes_for(7) is metadata.decodes_for(7)
        assert metadata.prefills_for(7) is metadata.prefills_for(7)
        assert set(metadata._decodes) == {7, None, 33, 1}
        assert metadata.window(10_000) is None   # longer than every row: full attention, shared masks
    if backend_name == "cpu":
        assert set(metadata._decodes) == {None}   # the kernel takes the window: one decode batch


def test_torch_backend_gathers_only_the_window_and_slices_capped_scores(monkeypatch):
    from llmserve.layers.attention import explicit_attention

    batch = Batch(MIXED, MIXED_DECODES, 4, 6, 2, 64, seed=2, query_scale=3.0)
    backend = TorchAttentionBackend(torch.float32)
    metadata = backend.build_metadata(batch.layout(CPU), CPU)
    # A decode row of a 7-token window touches at most 3 blocks of 4; a chunk after 70 cached tokens starts
    # gathering at the block holding its first query's window.
    assert all(group.block_tables.shape[1] <= 3 for group in metadata.decodes_for(7))
    assert max(group.block_tables.shape[1] for group in metadata.decodes_for(None)) == 33
    chunk = metadata.prefills_for(7)[-1]
    assert (chunk.context_len, chunk.key_start) == (70, 64) and chunk.mask.shape == (45, 51)
    # Soft-capped scores are materialised a slice of query rows at a time.
    monkeypatch.setattr(explicit_attention, "MAX_SCORE_ELEMENTS", 2000)
    key_cache, value_cache = batch.caches(CPU)
    for spec in (batch.spec(7, 2.5), batch.spec(None, 2.5)):
        out = backend.forward(batch.query, batch.key, batch.value, key_cache, value_cache, metadata, spec)
        assert_close(out, batch.expected(spec))


@pytest.mark.parametrize("backend_name", ["torch", "cpu"])
@pytest.mark.parametrize("head_dim", [20, 128])   # the C kernel's scalar path, and its other vector case
def test_other_head_sizes(backend_name, head_dim):
    batch = Batch(MIXED, MIXED_DECODES, 16, 6, 2, head_dim, seed=head_dim, query_scale=3.0)
    for spec in (batch.spec(9, 3.0), batch.spec(None, 3.0), batch.spec(9)):
        assert_close(run(backend_name, batch, spec)[0], batch.expected(spec))


@pytest.mark.parametrize("backend_name,dtype", [("torch", torch.bfloat16), ("cpu", torch.bfloat16),
                                                ("triton", torch.bfloat16), ("triton", torch.float16)])
def test_half_precision_with_window_and_cap(backend_name, dtype):
    batch = Batch(MIXED, MIXED_DECODES, 16, 4, 2, 64, dtype=dtype, seed=3, query_scale=2.0)
    spec = batch.spec(11, 2.0)
    out, _ = run(backend_name, batch, spec, dtype)
    assert out.dtype == dtype
    assert_close(out, batch.expected(spec), dtype)


def test_speculative_rows_only():
    """A step of nothing but 1 + k verification rows over long contexts (no decodes, no prompts)."""
    seqs = [(300, 5), (17, 2), (64, 4)]
    for name in ("torch", "cpu", "triton"):
        batch = Batch(seqs, 0, 16, 4, 2, 64, seed=9, query_scale=2.0)
        for spec in (batch.spec(), batch.spec(50, 2.0)):
            assert_close(run(name, batch, spec)[0], batch.expected(spec))


# ---------------------------------------------------------------------------------------------- kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])   # bfloat16: query, output and KV cache
@pytest.mark.parametrize("head_dim", [20, 64])
@pytest.mark.parametrize("window,soft_cap", [(None, None), (1, None), (5, None), (64, 1.5), (None, 4.0)])
def test_cpu_decode_kernel_window_and_soft_cap(head_dim, window, soft_cap, dtype):
    """The compiled kernel directly: many threads' worth of rows, and few rows (one KV head per work item)."""
    run_cpu_decode_kernel(head_dim, lambda batch: batch.spec(window, soft_cap), Batch.expected, dtype,
                          sliding_window=window, soft_cap=soft_cap)


def run_cpu_decode_kernel(head_dim: int, make_spec, expected, dtype: torch.dtype = torch.float32,
                          **kernel_args) -> tuple:
    """Call the compiled paged decode kernel on decodes over many contexts (work split by rows) and on one long
    one (split by KV head), with query, output and caches in ``dtype``, comparing with ``expected(batch,
    spec)``; returns the last call's arguments."""
    kernels = cpu_kernels()
    assert kernels is not None
    for seqs in ([(c, 1) for c in (0, 3, 4, 5, 63, 64, 200, 31)], [(150, 1)]):
        batch = Batch(seqs, len(seqs), 4, 6, 2, head_dim, dtype, seed=head_dim, query_scale=2.0)
        key_cache, value_cache = batch.caches(CPU)
        key_cache.view(-1, 2, head_dim)[batch.slots] = batch.key
        value_cache.view(-1, 2, head_dim)[batch.slots] = batch.value
        width = max(map(len, batch.tables))
        tables = torch.tensor([t + [0] * (width - len(t)) for t in batch.tables], dtype=torch.int32)
        lens = torch.tensor([c + 1 for c, _ in seqs], dtype=torch.int32)
        out = torch.empty_like(batch.query)
        spec = make_spec(batch)
        kernels.paged_decode_attention(batch.query, key_cache, value_cache, tables, lens, spec.scale, out,
                                       **{k: v(spec) if callable(v) else v for k, v in kernel_args.items()})
        assert out.dtype == dtype
        assert_close(out, expected(batch, spec), dtype)
    return kernels, batch, key_cache, value_cache, tables, lens, spec, out


@pytest.mark.parametrize("num_splits", [1, 3, 8])
@pytest.mark.parametrize("window", [1, 50, 200, None])
def test_triton_decode_splits_only_the_window(num_splits, window):
    """Split-K over the window [seq_len - window, seq_len): splits past it are empty and combine to nothing."""
    pytest.importorskip("triton", reason="triton is not installed")
    run_triton_split_decode(num_splits, lambda batch: batch.spec(window, 3.0), Batch.expected, window=window,
                            soft_cap=3.0)


def run_triton_split_decode(num_splits: int, make_spec, expected, **kernel_args) -> None:
    """Triton's split-K decode kernel directly, on decodes over contexts of 0 to 300 tokens, against
    ``expected(batch, spec)``; a callable in ``kernel_args`` is given the spec."""
    from llmserve.layers.attention import triton_kernels as kernels

    seqs = [(300, 1), (0, 1), (49, 1), (70, 1)]
    batch = Batch(seqs, 4, 16, 4, 2, 64, seed=num_splits, query_scale=2.0)
    key_cache, value_cache = batch.caches(DEVICE)
    query, key, value = batch.query.to(DEVICE), batch.key.to(DEVICE), batch.value.to(DEVICE)
    kernels.store_kv(key, value, key_cache, value_cache, batch.slots.to(DEVICE))
    width = max(map(len, batch.tables))
    tables = torch.tensor([t + [0] * (width - len(t)) for t in batch.tables], dtype=torch.int32, device=DEVICE)
    lens = torch.tensor([c + 1 for c, _ in seqs], dtype=torch.int32, device=DEVICE)
    out = torch.empty_like(query)
    spec = make_spec(batch)
    kernels.decode_attention(query, key_cache, value_cache, out, tables, lens, num_splits, spec.scale,
                             **{k: v(spec) if callable(v) else v for k, v in kernel_args.items()})
    assert_close(out, expected(batch, spec))


def graph_decode_batch() -> Batch:
    """Three decodes for a CUDA-graph batch of 8 (5 padded rows of length 0)."""
    return Batch([(50, 1), (3, 1), (17, 1)], 3, 16, 4, 2, 64, seed=5, query_scale=2.0)


def assert_graph_decode_matches(batch: Batch, specs, expected) -> object:
    """Triton's CUDA-graph decode: static metadata (captured for 8 rows) filled once serves every spec; the
    real rows equal ``expected(spec)``, the padded rows stay zero. Returns the static metadata."""
    from llmserve.layers.attention.triton_backend import TritonAttentionBackend

    backend = TritonAttentionBackend(torch.float32, num_kv_heads=2)
    static = backend.graph_decode_metadata(batch_size=8, max_blocks=6, max_seq_len=96, device=DEVICE)
    key_cache, value_cache = batch.caches(DEVICE)
    backend.fill_graph_decode_metadata(static, batch.layout(DEVICE))

    def padded(x):
        return torch.cat([x, torch.zeros(5, *x.shape[1:], dtype=x.dtype)]).to(DEVICE)

    for spec in specs:
        out = backend.forward(padded(batch.query), padded(batch.key), padded(batch.value), key_cache, value_cache,
                              static, spec)
        assert_close(out[:3], expected(spec))
        assert not out[3:].any()
    return static


def test_triton_window_splits_and_graph_metadata():
    """CUDA-graph static metadata serves windowed, soft-capped layers: the window start comes from the
    lengths inside the kernel, the split count per window is fixed for the metadata's life."""
    pytest.importorskip("triton", reason="triton is not installed")
    batch = graph_decode_batch()
    static = assert_graph_decode_matches(batch, [batch.spec(8, 2.0), batch.spec(None, 2.0), batch.spec(8)],
                                         batch.expected)
    assert static.window(96) is None and static.window(95) == 95   # against the captured width
    assert static.splits_for(8) == static.splits_for(8) <= static.num_splits
    # A window shorter than the longest decode may take fewer splits, never more.
    static.num_splits = 16
    assert static.splits_for(None) == 16 and static.splits_for(8) <= 16
