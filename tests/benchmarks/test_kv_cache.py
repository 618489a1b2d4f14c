"""The KV-cache comparison reports what the engine's attention layers cache: for the tiny DeepSeek-V3 (3 layers,
4 heads, a 32-dim latent + 8 rope dims; heads of 16 + 8 key dims and 16 value dims), one latent + rope key per
token and layer against per-head K and V."""

from __future__ import annotations

import torch

from llmserve.benchmarks.kv_cache import kv_bytes_per_token, main
from llmserve.model_loader.loader import load_config


def test_mla_bytes_per_token_against_per_head_k_and_v(checkpoint_dir, capsys):
    path = checkpoint_dir("deepseek_v3")
    assert kv_bytes_per_token(load_config(path), torch.float32) == (3 * (32 + 8) * 4, 3 * 4 * (16 + 8 + 16) * 4)
    assert kv_bytes_per_token(load_config(path), torch.bfloat16) == (3 * (32 + 8) * 2, 3 * 4 * (16 + 8 + 16) * 2)
    main(["--model", str(path), "--dtype", "float32"])
    assert f"| {path} | 3 | 4 | 480 | 1,920 | 4.0x |" in capsys.readouterr().out


def test_quantised_cache_capacity_against_the_model_dtype(checkpoint_dir, capsys):
    path = checkpoint_dir("deepseek_v3")
    assert kv_bytes_per_token(load_config(path), torch.int8)[0] == 3 * (32 + 8)
    main(["--model", str(path), "--dtype", "float32", "--kv-cache-dtype", "fp8"])
    out = capsys.readouterr().out
    assert "fp8_e4m3 tokens per GiB (as built) | gain |" in out
    assert f"| {2**30 // 480:,} / {2**30 // 1920:,} | {2**30 // 120:,} | 4.0x |" in out


def test_a_model_without_mla_reports_its_own_cache(llama_dir, capsys):
    """Tiny Llama: 2 layers x 2 KV heads x 16 dims, K and V: 128 entries per token."""
    assert kv_bytes_per_token(load_config(llama_dir), torch.float32) == (512, 512)
    main(["--model", str(llama_dir), "--dtype", "float32", "--kv-cache-dtype", "int8"])
    assert f"| {llama_dir} | 2 | 4 | 512 | 512 | 1.0x | {2**30 // 512:,} / {2**30 // 512:,} | {2**30 // 128:,} | 4.0x |" \
        in capsys.readouterr().out
