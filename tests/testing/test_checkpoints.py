"""Tests for llmserve.testing: random-weight checkpoints must load cleanly in Hugging Face transformers."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from llmserve.testing import checkpoints
from llmserve.testing.checkpoints import FAMILIES, SIZES, demo_model_path, tensor_specs, write_checkpoint
from llmserve.testing.tokenizer_files import BYTELEVEL, SENTENCEPIECE, write_tokenizer_files

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]

TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "Return the number of items in the container.\n\tIndented line, then:    four spaces.",
    "Café, naïve, Straße, Ελληνικά, Привет, 日本語のテキスト, 中文, 한국어 and emoji 🚀👍🏽👨‍👩‍👧 ✓",
    "def f(x):\n    return {'a': [1, 2.5e-3, None]}  # comment <tag> & more",
    "x",
]


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {family: write_checkpoint(root / family, family=family) for family in FAMILIES}


def _weight_names(path: Path) -> set[str]:
    names = set()
    for file in path.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            names.update(f.keys())
    return names


class _ListHandler(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _load(path: Path):
    """Load with HF; return (model, loading info, transformers warnings)."""
    # transformers' logger does not propagate to the root logger, so listen to it directly.
    handler = _ListHandler()
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    finally:
        logger.removeHandler(handler)
    return model.eval(), info, handler.messages


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_loads_in_hf_with_every_weight(family, tiny_checkpoints, tmp_path):
    path = tiny_checkpoints[family]
    model, info, log = _load(path)
    assert all(not v for v in info.values()), info
    assert not [m for m in log if any(w in m.upper() for w in ("LOAD REPORT", "MISSING", "UNEXPECTED", "WEIGHT"))], log

    fam = FAMILIES[family]
    config = json.loads((path / "config.json").read_text())
    assert type(model).__name__ == config["architectures"][0] == fam.architecture
    file_names = _weight_names(path)
    assert file_names == {s.name for s in tensor_specs(family)}
    expected = set(model.state_dict())
    if fam.layout in ("moe", "deepseek"):   # transformers 5 stacks experts in memory, writes them back per expert
        model.save_pretrained(tmp_path / "resaved")
        expected = _weight_names(tmp_path / "resaved")
    if fam.tie_word_embeddings:
        assert "lm_head.weight" not in file_names
        expected.discard("lm_head.weight")
        assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert file_names == expected

    tokenizer = AutoTokenizer.from_pretrained(path)
    assert len(tokenizer) == config["vocab_size"] == model.config.vocab_size == SIZES["tiny"].vocab_size
    ids = tokenizer(TEXTS[0] + " " + TEXTS[2], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits[0]
    assert torch.isfinite(logits).all()
    spread = logits.std(dim=-1)
    assert 2.0 < spread.min() and spread.max() < 6.0, spread

    # Family-specific features.
    if family == "llama3":
        rope = model.config.rope_parameters
        assert rope["rope_type"] == "llama3" and rope["factor"] == 8.0
        assert rope["original_max_position_embeddings"] < config["max_position_embeddings"]
        assert config["rope_scaling"]["rope_type"] == "llama3" and config["tie_word_embeddings"] is True
    if family == "mistral":
        assert config["sliding_window"] is None and model.config.sliding_window is None
    if family == "qwen2":
        assert "model.layers.0.self_attn.q_proj.bias" in file_names
        assert model.model.layers[0].self_attn.q_proj.bias is not None
    if family == "qwen3":
        assert "model.layers.1.self_attn.k_norm.weight" in file_names
        assert config["head_dim"] != config["hidden_size"] // config["num_attention_heads"]
        assert config["attention_bias"] is False
        assert model.model.layers[0].self_attn.q_proj.weight.shape[0] == config["num_attention_heads"] * config["head_dim"]
    if fam.layout == "gemma":   # odd shapes: GQA ratio 3, head_dim != hidden / heads != query_pre_attn_scalar
        assert config["num_attention_heads"] // config["num_key_value_heads"] == 3
        assert config["head_dim"] != config["hidden_size"] // config["num_attention_heads"]
        assert config["query_pre_attn_scalar"] != config["head_dim"]
        assert "model.layers.0.pre_feedforward_layernorm.weight" in file_names
        types = model.config.layer_types
        assert "sliding_attention" in types and "full_attention" in types and model.config.sliding_window == 10
    if family == "gemma2":
        assert types == ["sliding_attention", "full_attention"]
        assert model.config.attn_logit_softcapping and model.config.final_logit_softcapping
    if family == "gemma3":
        assert types == ["sliding_attention"] * 5 + ["full_attention"]
        rope = model.config.rope_parameters
        assert rope["sliding_attention"]["rope_theta"] != rope["full_attention"]["rope_theta"]
        assert rope["full_attention"]["rope_type"] == "linear"
    if family == "gemma4":   # GQA 3 locally, one KV head of another size globally; the last two layers share K/V
        assert model.config.layer_types == ["sliding_attention", "sliding_attention", "full_attention"] * 2
        assert model.config.kv_sharing_modes == [None, None, "store", "store", "reuse", "reuse"]
        local, global_ = model.config.per_layer_config[0], model.config.per_layer_config[2]
        assert (local.head_dim, local.num_key_value_heads) == (16, 2)
        assert (global_.head_dim, global_.num_key_value_heads) == (24, 1)
        assert local.head_dim != config["hidden_size"] // config["num_attention_heads"]
        assert model.config.hidden_size_per_layer_input and model.config.attention_k_eq_v
        assert model.model.layers[2].self_attn.v_proj is None and model.config.sliding_window == 10
        assert model.config.rope_parameters["full_attention"]["rope_type"] == "proportional"
    if family == "gemma4_moe":   # an odd expert count, top-2, beside every layer's dense MLP
        assert model.config.enable_moe_block and config["num_experts"] == 5 and config["top_k_experts"] == 2
        assert all(layer.experts.gate_up_proj.shape == (5, 64, 48) for layer in model.model.layers)
        assert all(hasattr(layer.mlp, "down_proj") for layer in model.model.layers)
    if fam.layout == "moe":   # odd expert counts; dense and sparse layers where the config says
        experts = config.get("num_local_experts") or config["num_experts"]
        assert experts % 2 == 1 and 1 <= config["num_experts_per_tok"] < experts
        dense = [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "down_proj")]
        assert dense == {"mixtral": [], "qwen2_moe": [1], "qwen3_moe": [0]}[family]
    if family == "gpt2":   # Conv1D: [in, out]; n_inner is not 4 x hidden
        assert model.transformer.h[0].attn.c_attn.weight.shape == (config["n_embd"], 3 * config["n_embd"])
        assert config["n_inner"] != 4 * config["n_embd"] and config["eos_token_id"] == config["bos_token_id"]


@pytest.mark.parametrize("family", ["llama", "llama3", "qwen2"])
def test_sharded_checkpoint_matches_hf_save_pretrained(family, tiny_checkpoints, tmp_path):
    max_shard = 200_000
    path = write_checkpoint(tmp_path / "sharded", family=family, max_shard_bytes=max_shard)
    assert not (path / "model.safetensors").exists()
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shard_files = sorted(p.name for p in path.glob("model-*.safetensors"))
    n = len(shard_files)
    assert n > 2
    assert shard_files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert set(index["weight_map"].values()) == set(shard_files)
    for file in shard_files:
        with safe_open(str(path / file), framework="pt") as f:
            assert set(f.keys()) == {k for k, v in index["weight_map"].items() if v == file}
    specs = tensor_specs(family)
    assert set(index["weight_map"]) == {s.name for s in specs}
    assert index["metadata"] == {"total_parameters": sum(s.numel for s in specs), "total_size": 4 * sum(s.numel for s in specs)}

    sharded, info, _ = _load(path)
    assert all(not v for v in info.values()), info
    single, _, _ = _load(tiny_checkpoints[family])
    for (name, a), (_, b) in zip(sharded.state_dict().items(), single.state_dict().items()):
        assert torch.equal(a, b), name

    # Exactly what transformers itself writes for the same model and shard size.
    resaved = tmp_path / "resaved"
    single.save_pretrained(resaved, max_shard_size=max_shard)
    for file in shard_files + ["model.safetensors.index.json"]:
        assert (resaved / file).read_bytes() == (path / file).read_bytes(), file


def test_small_enough_model_is_not_sharded(tmp_path):
    path = write_checkpoint(tmp_path / "m", family="qwen3", max_shard_bytes=10**9)
    assert (path / "model.safetensors").exists()
    assert not (path / "model.safetensors.index.json").exists()
    # Rewriting with shards into the same folder removes the old single file.
    write_checkpoint(path, family="qwen3", max_shard_bytes=300_000)
    assert not (path / "model.safetensors").exists()
    assert (path / "model.safetensors.index.json").exists()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_tokenizer_round_trips_and_matches_tokenizer_json(family, tiny_checkpoints):
    path = tiny_checkpoints[family]
    hf = AutoTokenizer.from_pretrained(path)
    raw = Tokenizer.from_file(str(path / "tokenizer.json"))
    for text in TEXTS:
        ids = hf(text)["input_ids"]
        assert ids == raw.encode(text).ids, text
        assert hf.decode(ids, skip_special_tokens=True) == text
        assert raw.decode(ids) == text
    llama_like = FAMILIES[family].tokenizer_kind == SENTENCEPIECE
    ids = hf(TEXTS[2])["input_ids"]
    tokens = hf.convert_ids_to_tokens(ids)
    if llama_like:
        assert ids[0] == hf.bos_token_id == 1 and hf.eos_token_id == 2
        # Multi-byte characters outside the tiny vocabulary go through byte fallback.
        assert any(t.startswith("<0x") for t in tokens)
    else:
        assert hf.bos_token_id is None and ids[0] != hf.convert_tokens_to_ids("<|endoftext|>")
        assert hf.eos_token == "<|im_end|>"


@pytest.mark.parametrize(("kind", "vocab_size"), [(SENTENCEPIECE, 2000), (BYTELEVEL, 2000), (SENTENCEPIECE, 32000)])
def test_every_id_decodes(kind, vocab_size, tmp_path):
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    write_tokenizer_files(tmp_path, kind, vocab_size, chat_template=template, model_max_length=128)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert len(hf) == vocab_size
    raw = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert raw.get_vocab_size(with_added_tokens=True) == vocab_size
    texts = raw.decode_batch([[i] for i in range(vocab_size)], skip_special_tokens=False)
    assert len(texts) == vocab_size and all(isinstance(t, str) for t in texts)
    for i in range(0, vocab_size, 7 if vocab_size > 5000 else 1):
        assert isinstance(hf.decode([i]), str)
    assert all(isinstance(t, str) for t in hf.convert_ids_to_tokens(list(range(vocab_size))))


def test_bench_sentencepiece_vocab_is_all_learned():
    from llmserve.testing.tokenizer_files import build_tokenizer

    _, info = build_tokenizer(SENTENCEPIECE, SIZES["bench"].vocab_size)
    assert info.vocab_size == 32000 and not info.reserved_tokens


@pytest.mark.parametrize("family", list(FAMILIES))
def test_chat_template_renders(family, tiny_checkpoints):
    tok = AutoTokenizer.from_pretrained(tiny_checkpoints[family])
    config = json.loads((tiny_checkpoints[family] / "tokenizer_config.json").read_text())
    assert config["chat_template"] and config["eos_token"] and "bos_token" in config
    assert config["model_max_length"] == SIZES["tiny"].max_position_embeddings
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Où est le café ? 日本 🚀"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    for m in messages:
        assert m["content"] in text
    if FAMILIES[family].tokenizer_kind == BYTELEVEL:
        assert text.endswith("<|im_start|>assistant\n") and text.count("<|im_end|>") == 4
    elif FAMILIES[family].layout in ("gemma", "gemma4"):
        assert text.startswith("<s><start_of_turn>user\nBe brief.") and text.endswith("<start_of_turn>model\n")
    elif family == "llama3":
        assert text.startswith("<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>")
        assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    elif FAMILIES[family].layout == "phi3":
        assert text.startswith("<|system|>\nBe brief.<|end|>\n") and text.endswith("<|end|>\n<|assistant|>\n")
    else:
        assert text.startswith("<s>[INST]") and text.endswith("[/INST]") and "</s>" in text
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    encoded = tok.apply_chat_template(messages[1:2], add_generation_prompt=True)
    encoded = encoded["input_ids"] if not isinstance(encoded, list) else encoded
    assert len(encoded) > 3


def _digests(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def test_same_seed_same_bytes(tmp_path, tiny_checkpoints):
    a = write_checkpoint(tmp_path / "a", family="qwen3", seed=7, max_shard_bytes=300_000)
    b = write_checkpoint(tmp_path / "b", family="qwen3", seed=7, max_shard_bytes=300_000)
    assert _digests(a) == _digests(b)
    c = write_checkpoint(tmp_path / "c", family="qwen3", seed=8, max_shard_bytes=300_000)
    assert _digests(c)["tokenizer.json"] == _digests(a)["tokenizer.json"]
    assert _digests(c)["model-00001-of-00004.safetensors"] != _digests(a)["model-00001-of-00004.safetensors"]

    # A fresh process (new hash seeds, tokenizer trained again) writes the same bytes.
    out = tmp_path / "subprocess"
    code = "import sys; from llmserve.testing.checkpoints import write_checkpoint; write_checkpoint(sys.argv[1], 'llama')"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", code, str(out)], check=True, env=env, timeout=120)
    assert _digests(out) == _digests(tiny_checkpoints["llama"])


def test_dtypes(tmp_path):
    path = write_checkpoint(tmp_path / "bf16", family="mistral", dtype=torch.bfloat16)
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16
    config = json.loads((path / "config.json").read_text())
    assert config["torch_dtype"] == config["dtype"] == "bfloat16"
    model, info, _ = _load(path)
    assert all(not v for v in info.values())


def test_bench_shapes_and_parameter_count():
    specs = {s.name: s.shape for s in tensor_specs("llama", "bench")}
    assert specs["model.embed_tokens.weight"] == (32000, 768)
    assert specs["model.layers.11.self_attn.k_proj.weight"] == (256, 768)
    assert specs["model.layers.0.mlp.down_proj.weight"] == (768, 2048)
    assert "model.layers.12.input_layernorm.weight" not in specs
    total = sum(s.numel for s in tensor_specs("llama", "bench"))
    assert total == 124_668_672


def test_demo_model_path_is_built_once_and_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMSERVE_CACHE_DIR", str(tmp_path / "cache"))
    calls = []
    real_write = checkpoints.write_checkpoint

    def small_write(path, **kwargs):  # the demo shape, shrunk to keep the test fast
        calls.append(kwargs)
        return real_write(path, **{**kwargs, "size": "tiny"})

    monkeypatch.setattr(checkpoints, "write_checkpoint", small_write)
    path = demo_model_path()
    assert path == tmp_path / "cache" / "models" / "llmserve-demo-llama-125m"
    assert calls == [{"family": "llama", "size": "bench", "seed": 0, "dtype": torch.float32}]
    assert (path / "config.json").exists() and (path / "model.safetensors").exists()
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp folders left
    assert demo_model_path() == path and len(calls) == 1  # cached

    # A crash while writing leaves nothing behind and keeps no half checkpoint.
    monkeypatch.setenv("LLMSERVE_CACHE_DIR", str(tmp_path / "cache2"))

    def failing_write(path, **kwargs):
        real_write(path, **{**kwargs, "size": "tiny"})
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints, "write_checkpoint", failing_write)
    with pytest.raises(KeyboardInterrupt):
        demo_model_path()
    assert list((tmp_path / "cache2" / "models").iterdir()) == []
