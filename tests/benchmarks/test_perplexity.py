"""``bench perplexity``: windows that score every token once, and the engine's figure equal to transformers' on
the same windows (Hugging Face's strided-perplexity recipe: labels -100 on the context); the model, dtype and
quantisation reported are those that ran; a stride or token count below 1 is refused."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoTokenizer

from llmserve.benchmarks.perplexity import windows
from llmserve.testing import checkpoints
from llmserve.testing.quantized_checkpoints import write_quantized_checkpoint
from llmserve.testing.trained_model import corpus_split
from tests.benchmarks.test_offline import ENGINE, bench
from tests.hf_reference import hf_model


@pytest.mark.parametrize("num_tokens,length,stride", [(300, 63, 40), (300, 63, 63), (10, 63, 31), (64, 32, 1)])
def test_windows_score_every_token_once(num_tokens, length, stride):
    spans = windows(num_tokens, length, stride)
    scored = [t for _, end, scored_from in spans for t in range(scored_from, end)]
    assert scored == list(range(num_tokens))
    assert all(end - begin <= length and begin <= scored_from for begin, end, scored_from in spans)
    assert spans[-1][1] == num_tokens


def test_windows_refuse_a_stride_that_skips_tokens():
    with pytest.raises(ValueError, match="stride"):
        windows(100, 10, 11)


@torch.inference_mode()
def hf_perplexity(path, tokens: list[int], bos: int, length: int, stride: int) -> tuple[float, int]:
    model = hf_model(str(path))
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(tokens), stride):
        end = min(begin + length - 1, len(tokens))
        ids = torch.tensor([[bos] + tokens[begin:end]])
        labels = ids.clone()
        labels[0, :1 + prev_end - begin] = -100
        scored = int((labels[0, 1:] != -100).sum())
        nll += model(ids, labels=labels).loss.item() * scored
        count, prev_end = count + scored, end
        if end == len(tokens):
            break
    return math.exp(nll / count), count


def test_perplexity_matches_transformers(tmp_path, llama_dir, capsys):
    out = tmp_path / "ppl.json"
    assert bench("perplexity", str(llama_dir), *ENGINE, "--dtype", "float32", "--max-model-len", "64",
                 "--stride", "40", "--max-tokens", "300", "--output-json", str(out)) == 0
    result = json.loads(out.read_text())
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    tokens = tokenizer.encode(corpus_split()[1], add_special_tokens=False)[:300]
    expected, count = hf_perplexity(llama_dir, tokens, tokenizer.bos_token_id, 64, 40)
    assert result["scored_tokens"] == count == 300 and result["tokens"] == 300
    assert result["perplexity"] == pytest.approx(expected, rel=1e-3)
    assert result["max_model_len"] == 64 and result["stride"] == 40
    assert "perplexity" in capsys.readouterr().out


def test_text_file_and_refusals(tmp_path, llama_dir):
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 8)
    out = tmp_path / "ppl.json"
    assert bench("perplexity", str(llama_dir), *ENGINE, "--dtype", "float32", "--max-model-len", "32",
                 "--text-file", str(text), "--output-json", str(out)) == 0
    result = json.loads(out.read_text())
    assert result["text"] == str(text) and result["stride"] == 16 and result["scored_tokens"] == result["tokens"]
    assert bench("perplexity", str(llama_dir), *ENGINE, "--max-model-len", "32", "--stride", "40") == 2
    text.write_text("")
    assert bench("perplexity", str(llama_dir), *ENGINE, "--text-file", str(text)) == 2


def test_without_bos_every_token_but_the_first_is_scored(tmp_path, checkpoint_dir):
    qwen2 = checkpoint_dir("qwen2")   # byte-level tokenizer: no BOS
    out = tmp_path / "ppl.json"
    assert bench("perplexity", str(qwen2), *ENGINE, "--dtype", "float32", "--max-model-len", "32", "--stride", "31",
                 "--max-tokens", "100", "--output-json", str(out)) == 0
    result = json.loads(out.read_text())
    assert result["tokens"] == 100 and result["scored_tokens"] == 99
    assert bench("perplexity", str(qwen2), *ENGINE, "--max-model-len", "32", "--stride", "32") == 2


@pytest.mark.parametrize("flags,fragment", [
    (["--stride", "0"], "--stride must be at least 1, got 0"),
    (["--max-tokens", "-5"], "--max-tokens must be at least 1, got -5"),
    (["--max-tokens", "0"], "--max-tokens must be at least 1, got 0"),
])
def test_a_stride_or_token_count_below_one_is_refused(llama_dir, flags, fragment, capsys):
    assert bench("perplexity", str(llama_dir), *ENGINE, "--max-model-len", "32", *flags) == 2
    assert fragment in capsys.readouterr().err


def test_reports_the_model_and_dtype_that_ran(tmp_path, llama_dir, monkeypatch, capsys):
    """No model named: the demo checkpoint (here the tiny llama) is what ran; --dtype auto: the dtype it chose."""
    monkeypatch.setattr(checkpoints, "demo_model_path", lambda: llama_dir)
    out = tmp_path / "ppl.json"
    assert bench("perplexity", *ENGINE, "--max-model-len", "32", "--max-tokens", "40", "--output-json", str(out)) == 0
    result = json.loads(out.read_text())
    assert result["model"] == str(llama_dir) and result["quantization"] is None
    assert result["dtype"] in ("float32", "bfloat16")
    assert f"{llama_dir} (unquantised, dtype {result['dtype']})" in capsys.readouterr().out
    gptq, _ = write_quantized_checkpoint(llama_dir, tmp_path / "gptq", "gptq")
    assert bench("perplexity", str(gptq), *ENGINE, "--dtype", "float32", "--max-model-len", "32", "--max-tokens",
                 "40", "--output-json", str(out)) == 0
    result = json.loads(out.read_text())
    assert (result["model"], result["quantization"], result["dtype"]) == (str(gptq), "gptq", "float32")


def test_a_gguf_file_is_reported_as_gguf(tmp_path, llama_dir):
    pytest.importorskip("gguf")
    from llmserve.testing.gguf_files import write_gguf

    path, out = write_gguf(llama_dir, tmp_path / "tiny-Q8_0.gguf", "llama", "Q8_0"), tmp_path / "ppl.json"
    assert bench("perplexity", str(path), *ENGINE, "--dtype", "float32", "--max-model-len", "32", "--max-tokens",
                 "40", "--output-json", str(out)) == 0
    result = json.loads(out.read_text())
    assert (result["model"], result["quantization"]) == (str(path), "gguf")
