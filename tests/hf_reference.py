"""The correctness oracle: Hugging Face transformers running the same checkpoint, greedily."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch


def reference_attention(path: str) -> dict:
    """Eager attention where the model caps its attention logits (Gemma 2): transformers 5.17 picks SDPA for it
    by default, which drops the cap (later versions pick eager)."""
    from transformers import AutoConfig

    return {"attn_implementation": "eager"} if getattr(AutoConfig.from_pretrained(path), "attn_logit_softcapping",
                                                       None) else {}


@lru_cache(maxsize=8)
def hf_model(path: str, adapter: str | None = None, dtype: torch.dtype = torch.float32):
    """A checkpoint folder, or a GGUF file (dequantised by transformers' own GGUF support); with ``adapter``,
    a PEFT LoRA adapter folder applied by PEFT on a fresh copy of the checkpoint; in ``dtype``."""
    from transformers import AutoModelForCausalLM

    if path.endswith(".gguf"):
        return AutoModelForCausalLM.from_pretrained(str(Path(path).parent), gguf_file=Path(path).name,
                                                    dtype=dtype).eval()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **reference_attention(path)).eval()
    if adapter is None:
        return model
    from peft import PeftModel

    return PeftModel.from_pretrained(model, adapter).eval()


@torch.inference_mode()
def hf_greedy(path: Path, prompt_ids: list[int], max_new_tokens: int, adapter: Path | str | None = None,
              dtype: torch.dtype = torch.float32) -> tuple[list[int], list[float]]:
    """Greedy tokens (EOS not special: never stops early) and their logprobs, with HF's own KV cache
    (``adapter``: with that PEFT adapter), the model in ``dtype`` (logprobs in float32)."""
    return model_greedy(hf_model(str(path), None if adapter is None else str(adapter), dtype), prompt_ids,
                        max_new_tokens)


@torch.inference_mode()
def model_greedy(model: torch.nn.Module, prompt_ids: list[int], max_new_tokens: int
                 ) -> tuple[list[int], list[float]]:
    """:func:`hf_greedy` on a transformers model already built."""
    out = model(torch.tensor([prompt_ids]), use_cache=True)
    tokens, logprobs = [], []
    for _ in range(max_new_tokens):
        step_logprobs = torch.log_softmax(out.logits[0, -1].float(), -1)
        token = int(step_logprobs.argmax())
        tokens.append(token)
        logprobs.append(step_logprobs[token].item())
        out = model(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens, logprobs


@torch.inference_mode()
def hf_prompt_logprobs(path: Path, prompt_ids: list[int]) -> list[float]:
    """logprob of prompt token i+1 given tokens 0..i, for every i."""
    model = hf_model(str(path))
    logits = model(torch.tensor([prompt_ids])).logits[0].float()
    logprobs = torch.log_softmax(logits, -1)
    return [logprobs[i, prompt_ids[i + 1]].item() for i in range(len(prompt_ids) - 1)]


@torch.inference_mode()
def hf_pooled(path: Path, prompt_ids: list[int], pooling_type: str, normalize: bool) -> torch.Tensor:
    """The final layer's hidden states (after the final norm) pooled as vLLM pools them: the last position,
    the mean of all, or the first (CLS); L2-normalised if asked."""
    model = hf_model(str(path))
    hidden = model(torch.tensor([prompt_ids]), output_hidden_states=True).hidden_states[-1][0].float()
    vector = {"LAST": hidden[-1], "MEAN": hidden.mean(0), "CLS": hidden[0]}[pooling_type]
    return torch.nn.functional.normalize(vector, dim=0) if normalize else vector
