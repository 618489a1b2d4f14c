"""Pipeline parallelism in the model: how layers split over stages, what each stage builds and loads,
and that stage 0 -> IntermediateTensors -> stage 1 computes what the one-stage model does."""

from __future__ import annotations

import pytest
import torch

from llmserve.models.interface import CausalLMModel, IntermediateTensors, layer_range
from llmserve.models.llama import CheckpointMismatchError, PPMissingLayer
from tests.model_helpers import PROMPT, bind_cache, load_tiny, step_metadata
from tests.parallel_sim import as_rank, shape_only_group


def test_layer_range_splits_evenly_and_earlier_stages_take_the_remainder():
    assert layer_range(2, 0, 1) == (0, 2)
    assert [layer_range(5, r, 2) for r in range(2)] == [(0, 3), (3, 5)]
    assert [layer_range(7, r, 3) for r in range(3)] == [(0, 3), (3, 5), (5, 7)]
    for layers in range(1, 13):
        for stages in range(1, layers + 1):
            ranges = [layer_range(layers, r, stages) for r in range(stages)]
            assert ranges[0][0] == 0 and ranges[-1][1] == layers
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            sizes = [end - start for start, end in ranges]
            assert sizes == sorted(sizes, reverse=True) and sizes[0] - sizes[-1] <= 1 and sizes[-1] >= 1


def test_layer_range_errors_name_the_numbers():
    with pytest.raises(ValueError, match="cannot split 3 decoder layers over 4 pipeline stages"):
        layer_range(3, 0, 4)
    with pytest.raises(ValueError, match="rank 2 is outside a pipeline of 2 stages"):
        layer_range(4, 2, 2)


def build_stages(path, stages: int = 2):
    models = []
    for rank in range(stages):
        with as_rank(pp=shape_only_group(rank, stages)):
            models.append(load_tiny(path))
    return models


def test_each_stage_builds_and_loads_only_its_part(checkpoint_dir):
    first, last = build_stages(checkpoint_dir("llama"))
    assert isinstance(first, CausalLMModel) and isinstance(last, CausalLMModel)
    names = [{name for name, _ in m.named_parameters()} for m in (first, last)]
    assert "model.embed_tokens.weight" in names[0] and "model.layers.0.self_attn.qkv_proj.weight" in names[0]
    assert not any(n.startswith(("model.layers.1.", "model.norm.", "lm_head.")) for n in names[0])
    assert "model.layers.1.mlp.down_proj.weight" in names[1] and {"model.norm.weight", "lm_head.weight"} <= names[1]
    assert not any(n.startswith(("model.layers.0.", "model.embed_tokens.")) for n in names[1])
    assert isinstance(first.model.layers[1], PPMissingLayer) and isinstance(last.model.layers[0], PPMissingLayer)
    assert first.lm_head is None and last.model.embed_tokens is None
    assert first.attention_layers() == [first.model.layers[0].self_attn.attn]
    assert last.attention_layers() == [last.model.layers[1].self_attn.attn]
    # Tensors of other stages are skipped, but a stage still reports what is wrong with its own part.
    with pytest.raises(CheckpointMismatchError, match=r"unexpected tensors: model\.layers\.9\.mlp\.up_proj\.weight"):
        first.load_weights([("model.layers.9.mlp.up_proj.weight", torch.zeros(1))])
    with pytest.raises(CheckpointMismatchError, match=r"missing tensors: .*model\.layers\.1\.") as info:
        last.load_weights([("model.layers.0.mlp.up_proj.weight", torch.zeros(1)),
                           ("model.embed_tokens.weight", torch.zeros(1))])
    assert "model.layers.0" not in str(info.value) and "embed_tokens" not in str(info.value)


# llama3, gemma2, gpt2, cohere2: tied embeddings; gemma2: a scaled embedding and four norms per layer; gpt2: learned
# positions on the first stage only; cohere2: the parallel residual handed over, logit_scale on the last stage;
# phi3: fused checkpoint tensors; deepseek_v3: latent attention, its dense layer and first MoE layer on stage 0
@pytest.mark.parametrize("family", ["llama", "llama3", "qwen3", "gemma2", "gpt2", "cohere2", "phi3", "deepseek_v3"])
def test_two_stages_compose_to_the_one_stage_model(checkpoint_dir, family):
    path = checkpoint_dir(family)
    full = load_tiny(path)
    first, last = build_stages(path)
    if full.tie_word_embeddings:   # the last stage holds its own copy of the tied matrix
        assert full.lm_head.tied and not last.lm_head.tied
    hidden_size, vocab = full.config.hidden_size, full.config.vocab_size
    backends = [bind_cache(m) for m in (full, first, last)]
    ids, positions, n = torch.tensor(PROMPT), torch.arange(len(PROMPT)), len(PROMPT)
    with torch.inference_mode():
        for context, new in ((0, n), (n, 1)):   # a prefill, then a decode over the cached prompt
            step = slice(context, context + new)
            expected = full.compute_logits(full(ids[step], positions[step], step_metadata(backends[0], context, new)))
            handover = first(ids[step], positions[step], step_metadata(backends[1], context, new))
            assert isinstance(handover, IntermediateTensors) and handover.hidden.shape == (new, hidden_size)
            hidden = last(ids[step], positions[step], step_metadata(backends[2], context, new), handover)
            got = last.compute_logits(hidden)
            assert got.dtype == torch.float32 and got.shape == expected.shape == (new, vocab)
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
            ids = torch.cat([ids, expected[-1:].argmax(-1)])
            positions = torch.arange(len(ids))


def test_a_later_stage_needs_the_handover(checkpoint_dir):
    _, last = build_stages(checkpoint_dir("llama"))
    backend = bind_cache(last)
    with pytest.raises(ValueError, match="IntermediateTensors"):
        last(torch.tensor([1]), torch.tensor([0]), step_metadata(backend, 0, 1))
