"""Train small real tokenizers on the bundled corpus and write them in Hugging Face format.

Two kinds are supported:

``"sentencepiece"``
    Llama / Mistral style: BPE over ``"▁"``-prefixed words (Metaspace
    pre-tokenizer, ``prepend_scheme="first"``, no splitting at ``"▁"`` at
    encode time), byte fallback to ``<0x00>`` ... ``<0xFF>`` for characters
    outside the vocabulary, ids 0/1/2 = ``<unk>``/``<s>``/``</s>``, ids
    3..258 = the 256 byte tokens, and a BOS token added on encode.

``"bytelevel"``
    Qwen2 / GPT-2 style byte-level BPE (NFC normalizer, Qwen2's split regex,
    ``ByteLevel`` mapping), with ``<|endoftext|>``, ``<|im_start|>`` and
    ``<|im_end|>`` as added special tokens right after the learned vocabulary.
    No BOS is added on encode.

Both pipelines are exactly the ones that transformers 5's ``LlamaTokenizer`` and
``Qwen2Tokenizer`` classes build in their constructors, so ``AutoTokenizer`` and
a plain ``tokenizers.Tokenizer.from_file("tokenizer.json")`` tokenize the same
way.

The tokenizer's total size (``len(tokenizer)``) is always exactly the requested
vocabulary size.  When the corpus is too small for BPE to learn that many
tokens (the byte-level kind tops out near 15.9k tokens on the bundled corpus),
the remaining ids are filled with reserved special tokens (``<reserved_N>`` /
``<|reserved_special_token_N|>``), the way real tokenizers pad their vocabularies.
They are never produced by encoding ordinary text.
"""

from __future__ import annotations

import collections
import functools
import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

CORPUS_PATH = Path(__file__).resolve().parent / "corpus" / "corpus.txt"

SENTENCEPIECE = "sentencepiece"
BYTELEVEL = "bytelevel"
TOKENIZER_KINDS = (SENTENCEPIECE, BYTELEVEL)

# Qwen2's pre-tokenization regex (as in transformers' Qwen2Tokenizer).
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

SPM_SPECIALS = ("<unk>", "<s>", "</s>")
BYTELEVEL_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_NUM_BYTE_TOKENS = 256


@dataclass(frozen=True)
class TokenizerInfo:
    """What a model config needs to know about a built tokenizer."""

    kind: str
    vocab_size: int  # == len(tokenizer), special and reserved tokens included
    learned_size: int  # tokens in the BPE model that encoding can produce (specials/bytes included)
    special_ids: dict  # token string -> id, for the named special tokens
    reserved_tokens: tuple  # padding tokens, if any


@functools.lru_cache(maxsize=None)
def corpus_text() -> str:
    return CORPUS_PATH.read_text(encoding="utf-8")


def _corpus_chunks() -> list[str]:
    return [chunk for chunk in corpus_text().split("\n\n") if chunk.strip()]


def _spm_training_chunks(alphabet_size: int) -> list[str]:
    """Corpus chunks with all but the ``alphabet_size`` most frequent characters blanked out.

    Like sentencepiece's character coverage: rare characters (CJK, emoji... in small vocabularies)
    get no token of their own and are encoded with byte fallback.  Done here rather than with the
    trainer's ``limit_alphabet``, which breaks frequency ties differently from run to run.
    """
    counts = collections.Counter(corpus_text())
    ranked = sorted(counts, key=lambda ch: (-counts[ch], ch))
    dropped = {ord(ch): " " for ch in ranked[alphabet_size:] if ch != " "}
    return [chunk.translate(dropped) for chunk in _corpus_chunks()]


def _added(content: str) -> AddedToken:
    return AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)


def _trained_vocab_and_merges(tokenizer: Tokenizer) -> tuple[list[str], list[tuple[str, str]]]:
    model = json.loads(tokenizer.to_str())["model"]
    vocab = [tok for tok, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model["merges"]]
    return vocab, merges


def _spm_pipeline(tokenizer: Tokenizer) -> None:
    tokenizer.normalizer = None
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(content=" ", left=1)]
    )


def _bytelevel_pipeline(tokenizer: Tokenizer) -> None:
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()


def _build_sentencepiece(vocab_size: int) -> tuple[str, TokenizerInfo]:
    n_fixed = len(SPM_SPECIALS) + _NUM_BYTE_TOKENS
    if vocab_size < n_fixed + 64:
        raise ValueError(f"vocab_size {vocab_size} is too small for a sentencepiece-style tokenizer")
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    # Training splits at "▁" so that no merge spans two words (like sentencepiece's
    # split_by_whitespace); encoding then uses split=False exactly like Llama.
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - _NUM_BYTE_TOKENS, special_tokens=list(SPM_SPECIALS), show_progress=False
    )
    trainer_tok.train_from_iterator(_spm_training_chunks(min(1000, max(64, vocab_size // 12))), trainer=trainer)
    learned, merges = _trained_vocab_and_merges(trainer_tok)

    byte_tokens = [f"<0x{b:02X}>" for b in range(_NUM_BYTE_TOKENS)]
    vocab_list = list(SPM_SPECIALS) + byte_tokens
    taken = set(vocab_list)
    vocab_list += [tok for tok in learned if tok not in taken]
    learned_size = len(vocab_list)
    reserved = [f"<reserved_{i}>" for i in range(vocab_size - learned_size)]
    vocab_list += reserved
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    merges = [m for m in merges if m[0] in vocab and m[1] in vocab and m[0] + m[1] in vocab]

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    _spm_pipeline(tok)
    tok.add_special_tokens([_added(t) for t in list(SPM_SPECIALS) + reserved])
    tok.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", vocab["<s>"])]
    )
    info = TokenizerInfo(
        kind=SENTENCEPIECE,
        vocab_size=tok.get_vocab_size(with_added_tokens=True),
        learned_size=learned_size,
        special_ids={t: vocab[t] for t in SPM_SPECIALS},
        reserved_tokens=tuple(reserved),
    )
    return tok.to_str(pretty=True), info


def _build_bytelevel(vocab_size: int) -> tuple[str, TokenizerInfo]:
    n_fixed = len(BYTELEVEL_SPECIALS) + _NUM_BYTE_TOKENS
    if vocab_size < n_fixed + 64:
        raise ValueError(f"vocab_size {vocab_size} is too small for a byte-level tokenizer")
    trainer_tok = Tokenizer(models.BPE(dropout=None, unk_token=None, fuse_unk=False, byte_fallback=False))
    _bytelevel_pipeline(trainer_tok)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(BYTELEVEL_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    trainer_tok.train_from_iterator(_corpus_chunks(), trainer=trainer)
    learned, merges = _trained_vocab_and_merges(trainer_tok)

    vocab_list = list(learned)
    learned_size = len(vocab_list)
    vocab_list += list(BYTELEVEL_SPECIALS)
    reserved = [f"<|reserved_special_token_{i}|>" for i in range(vocab_size - len(vocab_list))]
    vocab_list += reserved
    # As in Qwen2's tokenizer.json, special tokens are added tokens, not BPE vocabulary entries.
    vocab = {tok: i for i, tok in enumerate(vocab_list[:learned_size])}

    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    _bytelevel_pipeline(tok)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.add_special_tokens([_added(t) for t in list(BYTELEVEL_SPECIALS) + reserved])
    ids = {t: learned_size + i for i, t in enumerate(BYTELEVEL_SPECIALS)}
    for t, i in ids.items():
        assert tok.token_to_id(t) == i, (t, i, tok.token_to_id(t))
    info = TokenizerInfo(
        kind=BYTELEVEL,
        vocab_size=tok.get_vocab_size(with_added_tokens=True),
        learned_size=learned_size,
        special_ids=ids,
        reserved_tokens=tuple(reserved),
    )
    return tok.to_str(pretty=True), info


@functools.lru_cache(maxsize=None)
def build_tokenizer(kind: str, vocab_size: int) -> tuple[str, TokenizerInfo]:
    """Train (once per process) and return ``(tokenizer.json text, info)``."""
    if kind == SENTENCEPIECE:
        text, info = _build_sentencepiece(vocab_size)
    elif kind == BYTELEVEL:
        text, info = _build_bytelevel(vocab_size)
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {TOKENIZER_KINDS}")
    if info.vocab_size != vocab_size:
        raise AssertionError(f"built a tokenizer of size {info.vocab_size}, wanted {vocab_size}")
    return text, info


def _added_token_entry(content: str) -> dict:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }


def _special_map_entry(content: str) -> dict:
    entry = _added_token_entry(content)
    del entry["special"]
    return entry


def write_tokenizer_files(
    path: Path, kind: str, vocab_size: int, *, chat_template: str, model_max_length: int, eos_token: str | None = None
) -> TokenizerInfo:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into ``path``."""
    text, info = build_tokenizer(kind, vocab_size)
    path = Path(path)
    (path / "tokenizer.json").write_text(text, encoding="utf-8")

    special_ids = dict(info.special_ids)
    id_of = {**special_ids, **{t: info.vocab_size - len(info.reserved_tokens) + i for i, t in enumerate(info.reserved_tokens)}}
    added_tokens_decoder = {str(i): _added_token_entry(t) for t, i in sorted(id_of.items(), key=lambda kv: kv[1])}

    if kind == SENTENCEPIECE:
        eos = eos_token or "</s>"
        config = {
            "add_bos_token": True,
            "add_eos_token": False,
            "added_tokens_decoder": added_tokens_decoder,
            "bos_token": "<s>",
            "chat_template": chat_template,
            "clean_up_tokenization_spaces": False,
            "eos_token": eos,
            "legacy": False,
            "model_max_length": model_max_length,
            "pad_token": None,
            "padding_side": "left",
            "spaces_between_special_tokens": False,
            "tokenizer_class": "LlamaTokenizer",
            "unk_token": "<unk>",
            "use_default_system_prompt": False,
        }
        special_map = {
            "bos_token": _special_map_entry("<s>"),
            "eos_token": _special_map_entry(eos),
            "unk_token": _special_map_entry("<unk>"),
        }
    else:
        eos = eos_token or "<|im_end|>"
        config = {
            "add_bos_token": False,
            "add_prefix_space": False,
            "added_tokens_decoder": added_tokens_decoder,
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
            "bos_token": None,
            "chat_template": chat_template,
            "clean_up_tokenization_spaces": False,
            "eos_token": eos,
            "errors": "replace",
            "model_max_length": model_max_length,
            "pad_token": "<|endoftext|>",
            "split_special_tokens": False,
            "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": None,
        }
        special_map = {
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
            "eos_token": _special_map_entry(eos),
            "pad_token": _special_map_entry("<|endoftext|>"),
        }
    _write_json(path / "tokenizer_config.json", config)
    _write_json(path / "special_tokens_map.json", special_map)
    return info


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
