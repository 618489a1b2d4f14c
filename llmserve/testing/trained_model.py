"""Small Llama-shaped models TRAINED on the bundled corpus, for the figures random weights cannot give.

Perplexity per quantisation format, draft-model acceptance rates and LoRA quality mean nothing on random
weights, and no model can be downloaded here. ``llmserve make-trained-model`` trains one: transformers'
``LlamaForCausalLM`` (the model transformers itself checks against, so the oracle stays independent of the
engine) with AdamW, linear warm-up then a cosine decay, gradient clipping, seeded. Samples are random
windows of the training text, each starting with BOS as the engine's prompts do.

The corpus (:data:`~llmserve.testing.tokenizer_files.CORPUS_PATH`) is split once: its last
:data:`HELD_OUT_FRACTION` (from a paragraph boundary) is never trained on; ``llmserve bench perplexity``
measures on it. The checkpoint is a complete Hugging Face folder of the ``llama`` family (the same
sentencepiece-style tokenizer and chat template as the generated checkpoints, built for the preset's
vocabulary) plus ``training.json``: the loss log, the held-out loss, the unigram baseline and the time.

Presets (:data:`PRESETS`): ``target`` (~5M parameters; training times in docs/benchmarks.md), ``target-large``
(~29M: a target whose forward dominates a CPU decode step, as a real model's does, for draft-model speculative
decoding), ``draft`` (~1.5M, the same tokenizer) and ``tiny`` (seconds; tests). A model may be distilled from
another preset's (``distill_from``: soft labels, as drafts are fitted to their targets).
Without ``--output`` the model is cached in
``cache_dir()/models/llmserve-trained-<preset>[-from-<teacher>][-s<seed>][-<steps>steps]`` and reused while its
stamp (written last) matches.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from llmserve.config import cache_dir

from .checkpoint_families import SizeSpec
from .build_cache import build_once
from .checkpoints import FAMILIES, FORMAT_VERSION, write_model_files
from .tokenizer_files import corpus_text

logger = logging.getLogger(__name__)

FAMILY = "llama"
HELD_OUT_FRACTION = 0.05
REPORT_FILE = "training.json"
_VOCAB_SIZE = 4096   # ~158k corpus tokens: every embedding row is seen often enough in a few minutes


@dataclass(frozen=True)
class TrainingPreset:
    size: SizeSpec
    steps: int
    batch_size: int
    seq_len: int     # tokens per sample, BOS included
    lr: float
    warmup_steps: int
    log_every: int


def _preset(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, **training) -> TrainingPreset:
    """A preset whose context (``max_position_embeddings``) is its training length: positions past it were
    never seen."""
    size = SizeSpec(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                    num_key_value_heads=kv_heads, intermediate_size=intermediate,
                    max_position_embeddings=training["seq_len"], vocab_size=_VOCAB_SIZE)
    return TrainingPreset(size, **training)


# Hidden and intermediate sizes are multiples of 128 so that GPTQ/AWQ group size 128 and GGUF's 32- and
# 256-element blocks divide every projection.
PRESETS: dict[str, TrainingPreset] = {
    "target": _preset(256, 4, 4, 2, 768, steps=300, batch_size=4, seq_len=512, lr=2e-3, warmup_steps=20,
                      log_every=20),
    "draft": _preset(128, 2, 2, 1, 384, steps=300, batch_size=4, seq_len=512, lr=3e-3, warmup_steps=20,
                     log_every=20),
    "target-large": _preset(512, 8, 8, 4, 1536, steps=300, batch_size=4, seq_len=512, lr=1.5e-3, warmup_steps=30,
                            log_every=20),
    "tiny": _preset(64, 2, 2, 1, 128, steps=30, batch_size=2, seq_len=256, lr=3e-3, warmup_steps=3, log_every=10),
}


def corpus_split(text: str | None = None) -> tuple[str, str]:
    """``(train, held_out)``: the held-out part is the corpus' last :data:`HELD_OUT_FRACTION`, starting at
    the paragraph boundary before that point."""
    text = corpus_text() if text is None else text
    cut = text.rfind("\n\n", 0, int(len(text) * (1 - HELD_OUT_FRACTION)))
    cut = cut + 2 if cut >= 0 else int(len(text) * (1 - HELD_OUT_FRACTION))
    return text[:cut], text[cut:]


def _encode(folder: Path, text: str) -> list[int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text, add_special_tokens=False).ids


def _unigram_loss(train: list[int], held_out: list[int], vocab_size: int) -> float:
    """Mean NLL of the held-out tokens under the training tokens' add-one unigram distribution: the loss a
    model that ignores the context cannot beat."""
    counts = torch.bincount(torch.tensor(train), minlength=vocab_size).double() + 1
    logp = (counts / counts.sum()).log()
    return float(-logp[torch.tensor(held_out)].mean())


@torch.no_grad()
def _held_out_loss(model: torch.nn.Module, tokens: list[int], bos: int, seq_len: int) -> float:
    """Mean NLL per held-out token, in consecutive windows of ``seq_len`` that start with BOS."""
    model.eval()
    total, count = 0.0, 0
    step = seq_len - 1
    for begin in range(0, len(tokens) - 1, step):
        ids = torch.tensor([[bos] + tokens[begin:begin + step]])
        logits = model(input_ids=ids).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
        total, count = total + float(nll), count + ids.shape[1] - 1
    model.train()
    return total / count


def _lr_factor(step: int, warmup: int, steps: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def _distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the student's next-token distribution against the teacher's (soft labels), per token:
    the forward KL up to the teacher's entropy."""
    return -(teacher_logits.float().softmax(-1) * logits.float().log_softmax(-1)).sum(-1).mean()


def train(folder: Path, preset: TrainingPreset, seed: int = 0, threads: int | None = None,
          teacher: Path | None = None) -> dict:
    """Train ``preset`` into ``folder`` (tokenizer, config, ``model.safetensors``, ``training.json``); returns the
    report that ``training.json`` holds. ``threads`` defaults to every core (one is faster on a machine that
    others keep busy: spinning threads then wait for each other). With ``teacher`` (a trained model's folder of
    the same vocabulary) the model learns the teacher's next-token distributions on the same batches instead
    of the text's tokens: a draft model distilled from its target agrees with it more often."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(threads or os.cpu_count() or 1)
    folder.mkdir(parents=True, exist_ok=True)
    write_model_files(folder, FAMILIES[FAMILY], preset.size)
    config = json.loads((folder / "config.json").read_text())
    train_text, held_out_text = corpus_split()
    train_ids, held_out_ids = _encode(folder, train_text), _encode(folder, held_out_text)
    bos = config["bos_token_id"]

    teacher_model = None
    if teacher is not None:
        teacher_model = LlamaForCausalLM.from_pretrained(str(teacher), torch_dtype=torch.float32).eval()
        if teacher_model.config.vocab_size != config["vocab_size"]:
            raise ValueError(f"the teacher {teacher} has a vocabulary of {teacher_model.config.vocab_size} tokens, "
                             f"this preset {config['vocab_size']}")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig.from_dict(config)).float()
    optimizer = torch.optim.AdamW(model.parameters(), lr=preset.lr, betas=(0.9, 0.95), weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _lr_factor(step, preset.warmup_steps, preset.steps))
    gen = torch.Generator().manual_seed(seed)
    data = torch.tensor(train_ids)
    body = preset.seq_len - 1
    log, start = [], time.perf_counter()
    for step in range(preset.steps):
        offsets = torch.randint(0, len(data) - body, (preset.batch_size,), generator=gen)
        batch = torch.stack([data[o:o + body] for o in offsets.tolist()])
        ids = torch.cat([torch.full((preset.batch_size, 1), bos), batch], dim=1)
        if teacher_model is None:
            loss = model(input_ids=ids, labels=ids).loss
        else:
            with torch.no_grad():
                teacher_logits = teacher_model(input_ids=ids).logits
            loss = _distillation_loss(model(input_ids=ids).logits, teacher_logits)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % preset.log_every == 0 or step == preset.steps - 1:
            log.append({"step": step, "loss": round(loss.item(), 4), "elapsed_s": round(time.perf_counter() - start, 1)})
            logger.info("step %d/%d: loss %.4f, lr %.2e", step + 1, preset.steps, loss.item(), schedule.get_last_lr()[0])
    train_time = time.perf_counter() - start
    held_out = _held_out_loss(model, held_out_ids, bos, preset.seq_len)
    save_file({name: t.detach().contiguous() for name, t in model.state_dict().items()},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    report = {
        "preset": dataclasses.asdict(preset), "seed": seed, "teacher": None if teacher is None else str(teacher),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_tokens": len(train_ids), "held_out_tokens": len(held_out_ids),
        "train_time_s": round(train_time, 1), "threads": torch.get_num_threads(),
        "held_out_loss": round(held_out, 4), "held_out_perplexity": round(math.exp(held_out), 2),
        "unigram_held_out_loss": round(_unigram_loss(train_ids, held_out_ids, preset.size.vocab_size), 4),
        "log": log,
    }
    (folder / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    logger.info("held-out loss %.4f (unigram %.4f) after %.0f s", held_out, report["unigram_held_out_loss"], train_time)
    return report


def trained_model_path(preset: str = "target", *, steps: int | None = None, seed: int = 0,
                       output: str | os.PathLike | None = None, threads: int | None = None,
                       distill_from: str | None = None) -> Path:
    """The model of ``preset`` (``steps`` overriding its step count), trained on first use into ``output`` or
    the cache, and reused from there while its stamp matches. ``distill_from``: a preset whose model (at its
    default steps and ``seed``, trained first if need be) teaches this one."""
    try:
        spec = PRESETS[preset]
    except KeyError:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}") from None
    if steps is not None:
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        spec = dataclasses.replace(spec, steps=steps)
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    if output is None:
        name = f"llmserve-trained-{preset}" + (f"-from-{distill_from}" if distill_from else "") + (
            f"-s{seed}" if seed else "") + (f"-{spec.steps}steps" if spec.steps != PRESETS[preset].steps else "")
        output = cache_dir() / "models" / name
    stamp = {"trained": preset, **dataclasses.asdict(spec), "seed": seed, "format_version": FORMAT_VERSION}
    if distill_from is not None:
        stamp["distilled_from"] = distill_from

    def build(folder: Path) -> dict:   # the teacher is looked up (or trained) only when this model is built
        teacher = None if distill_from is None else trained_model_path(distill_from, seed=seed, threads=threads)
        return train(folder, spec, seed, threads, teacher)

    return build_once(Path(output), stamp, build)
