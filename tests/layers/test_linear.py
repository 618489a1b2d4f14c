"""Linear layers: every path ``apply_linear`` takes on CPU computes ``x W^T + b``; each parallel layer's
shards, at simulated tensor-parallel ranks, compose to the unsharded layer; fused checkpoint tensors load
like per-projection ones; KV heads replicate when there are fewer than ranks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmserve.layers.cpu_kernels import cpu_kernels
from llmserve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from llmserve.layers.linear import (ColumnParallelLinear, MergedColumnParallelLinear, QKVParallelLinear,
                                    ReplicatedLinear, RowParallelLinear, WeightShapeError, qkv_head_partition)
from llmserve.quantization import unquantized
from llmserve.quantization.unquantized import apply_linear
from tests.parallel_sim import as_rank, run_ranks, shape_only_group, simulated_groups


@pytest.mark.parametrize("rows", [1, 4, 8, 9, 64])   # the small-batch kernel up to 8 rows, oneDNN above
def test_apply_linear_matches_f_linear(rows):
    torch.manual_seed(rows)
    x, weight, bias = torch.randn(rows, 96), torch.randn(40, 96), torch.randn(40)
    torch.testing.assert_close(apply_linear(x, weight, bias), F.linear(x, weight, bias), atol=1e-4, rtol=1e-4)


def test_small_batches_take_the_compiled_kernel(monkeypatch):
    kernels = cpu_kernels()
    assert kernels is not None
    calls = []
    original = kernels.linear_small_batch
    monkeypatch.setattr(kernels, "linear_small_batch", lambda *a: calls.append(a[0].shape[0]) or original(*a))
    x, weight = torch.randn(kernels.max_linear_rows + 1, 16), torch.randn(8, 16)
    apply_linear(x[:1], weight, None)
    apply_linear(x, weight, None)
    assert calls == [1]


def test_without_kernels_or_in_other_dtypes_results_stay_the_same(monkeypatch):
    x, weight = torch.randn(2, 32), torch.randn(8, 32)
    expected = F.linear(x, weight)
    monkeypatch.setattr(unquantized, "cpu_kernels", lambda: None)
    torch.testing.assert_close(apply_linear(x, weight, None), expected, atol=1e-5, rtol=1e-5)
    out = apply_linear(x.bfloat16(), weight.bfloat16(), None)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=0.1, rtol=0.05)


def test_blocked_layout_keeps_the_results_and_skips_what_it_cannot_block():
    torch.manual_seed(0)
    layer = ReplicatedLinear(40, 48, bias=True)
    layer.weight.data.normal_()
    layer.bias.data.normal_()
    x = torch.randn(11, 40)
    expected = layer(x)
    layer.process_weights_after_loading()
    assert layer.weight.shape == (3, 40, 16)                       # one copy, blocked
    torch.testing.assert_close(layer(x), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(layer(x[:2]), expected[:2], atol=1e-4, rtol=1e-4)
    odd = ReplicatedLinear(40, 20)                                  # 20 outputs: not a multiple of 16
    odd.process_weights_after_loading()
    assert odd.weight.shape == (20, 40)
    embedding = VocabParallelEmbedding(64, 40)
    tied = ParallelLMHead(64, 40, tie_to=embedding)                 # the embedding reads rows of it
    tied.process_weights_after_loading()
    assert tied.weight.shape == (64, 40)
    untied = ParallelLMHead(64, 40)
    untied.weight.data.normal_()
    logits = untied(x)
    untied.process_weights_after_loading()
    assert untied.weight.shape == (4, 40, 16)
    torch.testing.assert_close(untied(x), logits, atol=1e-4, rtol=1e-4)


def test_loaded_cpu_models_store_linear_weights_blocked(llama_dir):
    from llmserve import LLM

    model = LLM(str(llama_dir), kv_cache_memory_bytes="32MiB").engine.runner.model
    layer = model.model.layers[0]
    assert layer.self_attn.qkv_proj.weight.dim() == 3 and layer.mlp.down_proj.weight.dim() == 3


# ---------------------------------------------------------------------------------------------------
# Tensor parallelism, simulated: each rank's layer is built under a group of that rank and size.
# ---------------------------------------------------------------------------------------------------

TP = 2


def build(rank: int, size: int, make):
    with as_rank(tp=shape_only_group(rank, size)):
        return make()


def load(layer, weights: dict):
    """Load full checkpoint tensors (param name -> tensor) through the parameters' own loaders."""
    for name, tensor in weights.items():
        param = getattr(layer, name)
        param.weight_loader(param, tensor, None)
    return layer


def test_column_parallel_shards_concatenate_to_the_full_output():
    torch.manual_seed(0)
    w, b, x = torch.randn(48, 40), torch.randn(48), torch.randn(5, 40)
    full = F.linear(x, w, b)
    outs = [load(build(r, TP, lambda: ColumnParallelLinear(40, 48, bias=True)), {"weight": w, "bias": b})(x)
            for r in range(TP)]
    assert outs[0].shape == (5, 24)
    torch.testing.assert_close(torch.cat(outs, dim=-1), full, atol=1e-4, rtol=1e-4)
    # gather_output: every rank returns the whole output (all-gather over the simulated group)
    layers = []
    for group in simulated_groups(TP):
        with as_rank(tp=group):
            layers.append(load(ColumnParallelLinear(40, 48, bias=True, gather_output=True), {"weight": w, "bias": b}))
    for out in run_ranks([lambda layer=layer: layer(x) for layer in layers]):
        torch.testing.assert_close(out, full, atol=1e-4, rtol=1e-4)


def test_row_parallel_partial_outputs_sum_to_the_full_output_with_the_bias_once():
    torch.manual_seed(1)
    w, b, x = torch.randn(32, 48), torch.randn(32), torch.randn(6, 48)
    full = F.linear(x, w, b)
    # reduce_results=False: the caller sums; rank 0 alone carries the bias
    partial = [load(build(r, TP, lambda: RowParallelLinear(48, 32, bias=True, reduce_results=False)),
                    {"weight": w, "bias": b}) for r in range(TP)]
    outs = [layer(x[:, r * 24:(r + 1) * 24]) for r, layer in enumerate(partial)]
    torch.testing.assert_close(outs[0] + outs[1], full, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(outs[1], F.linear(x[:, 24:], w[:, 24:]), atol=1e-4, rtol=1e-4)
    # reduce_results=True: each rank gets the sum, bias added once after it; input_is_parallel=False
    # lets each rank take its own slice of the full input
    for input_is_parallel in (True, False):
        layers = []
        for group in simulated_groups(TP):
            with as_rank(tp=group):
                layers.append(load(RowParallelLinear(48, 32, bias=True, input_is_parallel=input_is_parallel),
                                   {"weight": w, "bias": b}))
        inputs = [x[:, r * 24:(r + 1) * 24] if input_is_parallel else x for r in range(TP)]
        for out in run_ranks([lambda layer=layer, inp=inp: layer(inp) for layer, inp in zip(layers, inputs)]):
            torch.testing.assert_close(out, full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tp", [1, 2])
def test_merged_column_parallel_per_shard_and_fused_loading_agree(tp):
    torch.manual_seed(2)
    gate, up, x = torch.randn(64, 32), torch.randn(64, 32), torch.randn(3, 32)
    for r in range(tp):
        per_shard = build(r, tp, lambda: MergedColumnParallelLinear(32, [64, 64]))
        per_shard.weight.weight_loader(per_shard.weight, gate, 0)
        per_shard.weight.weight_loader(per_shard.weight, up, 1)
        fused = build(r, tp, lambda: MergedColumnParallelLinear(32, [64, 64]))
        fused.weight.weight_loader(fused.weight, torch.cat([gate, up]), None)
        assert torch.equal(per_shard.weight, fused.weight)
        rows = 64 // tp   # this rank's gate rows, then its up rows
        expected = torch.cat([gate[r * rows:(r + 1) * rows], up[r * rows:(r + 1) * rows]])
        assert torch.equal(fused.weight, expected)
        torch.testing.assert_close(fused(x), F.linear(x, expected), atol=1e-4, rtol=1e-4)


def _qkv_checkpoint(heads: int, kv_heads: int, head: int, hidden: int):
    torch.manual_seed(3)
    q, k, v = (torch.randn(n * head, hidden) for n in (heads, kv_heads, kv_heads))
    return q, k, v, *(torch.randn(n * head) for n in (heads, kv_heads, kv_heads))


@pytest.mark.parametrize("tp,heads,kv_heads", [(1, 4, 2), (2, 4, 2), (4, 4, 2), (4, 8, 1), (2, 4, 4)])
def test_qkv_parallel_splits_heads_and_replicates_kv_heads(tp, heads, kv_heads):
    head, hidden = 8, 32
    q, k, v, qb, kb, vb = _qkv_checkpoint(heads, kv_heads, head, hidden)
    x = torch.randn(5, hidden)
    full_q, full_k, full_v = F.linear(x, q, qb), F.linear(x, k, kb), F.linear(x, v, vb)
    replicas = max(1, tp // kv_heads)
    for r in range(tp):
        per_shard = build(r, tp, lambda: QKVParallelLinear(hidden, head, heads, kv_heads, bias=True))
        fused = build(r, tp, lambda: QKVParallelLinear(hidden, head, heads, kv_heads, bias=True))
        for shard, wt, bt in (("q", q, qb), ("k", k, kb), ("v", v, vb)):
            per_shard.weight.weight_loader(per_shard.weight, wt, shard)
            per_shard.bias.weight_loader(per_shard.bias, bt, shard)
        fused.weight.weight_loader(fused.weight, torch.cat([q, k, v]), None)
        fused.bias.weight_loader(fused.bias, torch.cat([qb, kb, vb]), None)
        assert torch.equal(per_shard.weight, fused.weight) and torch.equal(per_shard.bias, fused.bias)
        assert fused.num_heads == heads // tp and fused.num_kv_heads == max(1, kv_heads // tp)
        assert fused.num_kv_head_replicas == replicas
        out_q, out_k, out_v = fused(x).split([fused.q_size, fused.kv_size, fused.kv_size], dim=-1)
        kv_index = r // replicas   # the KV heads this rank holds: [kv_index * kv_size, ...)
        torch.testing.assert_close(out_q, full_q[:, r * fused.q_size:(r + 1) * fused.q_size], atol=1e-4, rtol=1e-4)
        for got, want in ((out_k, full_k), (out_v, full_v)):
            torch.testing.assert_close(got, want[:, kv_index * fused.kv_size:(kv_index + 1) * fused.kv_size],
                                       atol=1e-4, rtol=1e-4)
        # every query head of this rank reads a KV head this rank holds (query head h reads KV head h // group)
        group = heads // kv_heads
        held = range(kv_index * fused.num_kv_heads, (kv_index + 1) * fused.num_kv_heads)
        assert all((r * fused.num_heads + h) // group in held for h in range(fused.num_heads))


@pytest.mark.parametrize("heads,kv_heads,tp,named", [(6, 3, 2, "(3)"), (6, 2, 3, "(2)"), (6, 2, 4, "(6)"),
                                                      (8, 3, 6, None)])
def test_indivisible_heads_are_a_clear_error(heads, kv_heads, tp, named):
    with pytest.raises(ValueError, match="tensor-parallel size") as info:
        qkv_head_partition(heads, kv_heads, tp)
    assert f"({tp})" in str(info.value) and (named is None or named in str(info.value))
    with pytest.raises(ValueError, match="tensor-parallel size"):
        build(0, tp, lambda: QKVParallelLinear(16, 4, heads, kv_heads))


def test_shape_errors_name_the_unsharded_shapes():
    layer = build(1, TP, lambda: MergedColumnParallelLinear(32, [64, 64]))
    with pytest.raises(WeightShapeError, match=r"shape \(63, 32\) but the model expects \(64, 32\)"):
        layer.weight.weight_loader(layer.weight, torch.zeros(63, 32), 1)
    with pytest.raises(WeightShapeError, match=r"expects \(128, 32\)"):
        layer.weight.weight_loader(layer.weight, torch.zeros(127, 32), None)
    with pytest.raises(ValueError, match="unknown shard 2"):
        layer.weight.weight_loader(layer.weight, torch.zeros(64, 32), 2)
    row = build(0, TP, lambda: RowParallelLinear(48, 32))
    with pytest.raises(WeightShapeError, match=r"expects \(32, 48\)"):
        row.weight.weight_loader(row.weight, torch.zeros(32, 24), None)
    qkv = build(0, TP, lambda: QKVParallelLinear(32, 8, 4, 2))
    with pytest.raises(WeightShapeError, match=r"expects \(16, 32\)"):
        qkv.weight.weight_loader(qkv.weight, torch.zeros(15, 32), "k")


@pytest.mark.parametrize("vocab", [64, 50])   # 50: the last shard is padded
def test_vocab_parallel_embedding_and_lm_head_match_the_unsharded_ones(vocab):
    torch.manual_seed(4)
    table, hidden = torch.randn(vocab, 24), torch.randn(7, 24)
    ids = torch.randint(0, vocab, (9,))
    embeddings, heads, tied_heads = [], [], []
    for group in simulated_groups(TP):
        with as_rank(tp=group):
            emb = VocabParallelEmbedding(vocab, 24)
            emb.weight.weight_loader(emb.weight, table)
            head = ParallelLMHead(vocab, 24)
            head.weight.weight_loader(head.weight, table)
            head.process_weights_after_loading()
            tied = ParallelLMHead(vocab, 24, tie_to=emb)
            tied.process_weights_after_loading()
        assert emb.shard_rows % 16 == 0 and torch.all(emb.weight[emb.shard_end - emb.shard_start:] == 0)
        assert head.weight.dim() == 3 and tied.weight.dim() == 2   # untied shard blocked, tied one row-major
        embeddings.append(emb), heads.append(head), tied_heads.append(tied)
    results = run_ranks([lambda r=r: (embeddings[r](ids), heads[r](hidden), tied_heads[r](hidden)) for r in range(TP)])
    for looked_up, logits, tied_logits in results:
        torch.testing.assert_close(looked_up, F.embedding(ids, table))
        assert logits.dtype == torch.float32 and logits.shape == (7, vocab)
        torch.testing.assert_close(logits, hidden @ table.T, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(tied_logits, hidden @ table.T, atol=1e-4, rtol=1e-4)
