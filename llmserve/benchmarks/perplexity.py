"""``llmserve bench perplexity``: perplexity of a text through the engine, to compare formats of one model.

The text (default: the held-out end of the bundled corpus that ``llmserve make-trained-model`` never trains
on) is tokenized once, without special tokens, and cut into windows as Hugging Face's perplexity recipe
does: each window holds up to ``max_model_len`` tokens, BOS first when the tokenizer has one (as in training
and in prompts), and starts ``--stride`` tokens after the previous one; it scores only the tokens the
previous windows did not, with the rest as context (without BOS, the text's first token has no context
and is not scored). All windows go to the engine in one batch with
``prompt_logprobs=0`` and ``max_tokens=0``: the engine scores the prompt and samples nothing. The prompt
logprobs are log-softmaxes in float32 of the model's logits, whatever ``--dtype`` computes them.

Perplexity is ``exp(total NLL / scored tokens)``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

from llmserve.benchmarks.flags import require_at_least
from llmserve.entrypoints.cli_args import engine_config_from_args
from llmserve.entrypoints.llm import LLM
from llmserve.model_loader.model_source import is_gguf
from llmserve.quantization.registry import checkpoint_quantization
from llmserve.sampling_params import SamplingParams


def windows(num_tokens: int, length: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, scored_from)`` per window over ``num_tokens`` text tokens: the window holds tokens
    ``[begin, end)`` (at most ``length``) and scores ``[scored_from, end)``; every token is scored once."""
    if length < 1 or stride < 1:
        raise ValueError(f"window length and stride must be at least 1, got {length} and {stride}")
    if stride > length:
        raise ValueError(f"stride ({stride}) must not exceed the window length ({length}): tokens would go unscored")
    result, scored = [], 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + length, num_tokens)
        result.append((begin, end, scored))
        scored = end
        if end == num_tokens:
            break
    return result


def score(llm: LLM, tokens: list[int], bos: int | None, max_model_len: int, stride: int) -> tuple[float, int]:
    """``(total NLL, scored tokens)`` of ``tokens`` through ``llm``, in windows of ``max_model_len`` (BOS
    included)."""
    prefix = [] if bos is None else [bos]
    if bos is None and stride >= max_model_len:
        raise ValueError(f"without a BOS token a window's first token is context only: the stride ({stride}) must be "
                         f"below the window ({max_model_len}) for every token after the first to be scored")
    spans = windows(len(tokens), max_model_len - len(prefix), stride)
    prompts = [{"prompt_token_ids": prefix + tokens[begin:end]} for begin, end, _ in spans]
    outputs = llm.generate(prompts, SamplingParams(max_tokens=0, prompt_logprobs=0), use_tqdm=False)
    nll, count = 0.0, 0
    for (begin, end, scored_from), output in zip(spans, outputs):
        ids = output.prompt_token_ids
        # Position p of the prompt holds text token begin + p - len(prefix); the first one is unscored.
        for p in range(max(1, scored_from - begin + len(prefix)), len(ids)):
            nll -= output.prompt_logprobs[p][ids[p]].logprob
            count += 1
    return nll, count


def what_ran(llm: LLM, quantization: str | None) -> tuple[str, str, str | None]:
    """``(model, dtype, quantisation)`` as the engine runs them: the demo model when none is named, the dtype
    ``--dtype auto`` chose, the checkpoint's own format without ``--quantization`` (a GGUF file's is gguf)."""
    engine = llm.engine
    if quantization is None and is_gguf(engine.model_path):
        quantization = "gguf"
    elif quantization is None:
        raw = checkpoint_quantization(engine.hf_config)
        quantization = str(raw["quant_method"]).lower() if raw else None
    return str(engine.model_path), str(engine.dtype).removeprefix("torch."), quantization


def run_perplexity_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    require_at_least(args, {"stride": 1, "max_tokens": 1})
    config = engine_config_from_args(args)
    if args.text_file:
        text = Path(args.text_file).read_text(encoding="utf-8")
    else:
        from llmserve.testing.trained_model import corpus_split

        text = corpus_split()[1]
    start = time.perf_counter()
    llm = LLM(**vars(config))
    try:
        tokenizer = llm.get_tokenizer()
        tokens = tokenizer.encode(text, add_special_tokens=False, verbose=False)   # longer than a window: no warning
        if args.max_tokens is not None:
            tokens = tokens[:args.max_tokens]
        if len(tokens) < 2:
            raise ValueError("the text has fewer than 2 tokens: nothing to score")
        max_model_len = llm.engine.max_model_len
        stride = args.stride if args.stride is not None else max_model_len // 2
        nll, count = score(llm, tokens, tokenizer.bos_token_id, max_model_len, stride)
        model, dtype, quantization = what_ran(llm, config.quantization)
    finally:
        llm.shutdown()
    result = {
        "model": model, "quantization": quantization, "dtype": dtype,
        "text": args.text_file or "held-out corpus", "tokens": len(tokens), "scored_tokens": count,
        "max_model_len": max_model_len, "stride": stride, "nll": nll / count, "perplexity": math.exp(nll / count),
        "elapsed_s": time.perf_counter() - start,
    }
    print(f"{model} ({quantization or 'unquantised'}, dtype {dtype}): perplexity "
          f"{result['perplexity']:.4f} (NLL {result['nll']:.4f} per token) over {count} tokens, windows of "
          f"{max_model_len}, stride {stride}")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(result, indent=2) + "\n")
    return result
