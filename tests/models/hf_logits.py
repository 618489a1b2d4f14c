"""What the family tests share: a prompt long enough to pass the tiny checkpoints' windows, transformers'
logits on a checkpoint (cached), checkpoint variants (config keys replaced, tensors rescaled) and the check
every family makes: llmserve's prefill logits equal transformers', and a variant's change moves
transformers' own logits, so the feature under test is not a no-op that a wrong engine would also pass."""

from __future__ import annotations

import json
import shutil
from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tests.model_helpers import load_tiny, prefill_logits

# 30 tokens: three times the tiny Gemmas' 10-token window.
LONG_PROMPT = [(i * 37) % 1990 + 5 for i in range(30)]


@lru_cache(maxsize=16)
def hf_logits(path: str, ids: tuple[int, ...] = tuple(LONG_PROMPT)) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    from tests.hf_reference import reference_attention

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **reference_attention(str(path))).eval()
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float()


def with_config(tmp_path: Path, base: Path, changes: dict, tensors: dict | None = None) -> Path:
    """A copy of ``base`` with config.json keys replaced and tensors rescaled (name suffix -> factor; None
    sets them to ones)."""
    path = Path(shutil.copytree(base, tmp_path / "variant"))
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))
    if tensors:
        weights = load_file(str(path / "model.safetensors"))
        for name in weights:
            for suffix, factor in tensors.items():
                if name.endswith(suffix):
                    weights[name] = torch.ones_like(weights[name]) if factor is None else weights[name] * factor
        save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def assert_matches_hf(path: Path, base: Path | None = None, changes_output: bool = True) -> None:
    """llmserve's prefill logits on ``path`` equal transformers' within 1e-4; with ``base`` (``path`` is its
    variant), transformers' logits moved by more than 1e-2 (or, with ``changes_output=False``, did not)."""
    expected = hf_logits(str(path))
    torch.testing.assert_close(prefill_logits(load_tiny(path), LONG_PROMPT), expected, atol=1e-4, rtol=1e-4)
    if base is None:
        return
    if changes_output:
        assert (expected - hf_logits(str(base))).abs().max() > 1e-2, "the variant does not change the output"
    else:
        torch.testing.assert_close(expected, hf_logits(str(base)), atol=1e-4, rtol=1e-4)
