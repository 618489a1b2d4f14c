"""Measure xgrammar against llguidance on this machine: the numbers behind the choice of llguidance.

A measurement script, not part of the package. Needs both libraries (``pip install xgrammar llguidance``) and
writes its tokenizers under ``--workdir``; the figures are in docs/structured_outputs.md. Run::

    python scripts/bench_grammar_libraries.py --threads 1

Per tokenizer it measures (a) compiling a small and a large JSON schema (cache off), (b) per token, the
cost of filling the bitmask and advancing the matcher, for 1 and 64 sequences in lock-step (the token
sequences are realistic JSON instances of the schema as the tokenizer splits them; a warm-up pass runs
first), (c) applying a [64, V] bitmask to float32 logits. It also checks which schema keywords each
library enforces, refuses, or ignores.
"""

from __future__ import annotations

import argparse
import glob
import json
import random
import statistics
import sysconfig
import time
from importlib.metadata import version
from pathlib import Path

import llguidance
import llguidance.hf
import llguidance.torch
import torch
import xgrammar
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from llmserve.structured_output import apply_token_bitmask
from llmserve.testing.tokenizer_files import SENTENCEPIECE, write_tokenizer_files

WORDS = ["alpha", "beta", "gamma", "delta", "report", "value", "north", "south", "order", "item", "stock",
         "price", "river", "blue", "green"]

SMALL = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


def _leaf(i: int) -> dict:
    return [
        {"type": "string", "maxLength": 40},
        {"type": "integer", "minimum": 0, "maximum": 100000},
        {"type": "number"},
        {"type": "boolean"},
        {"enum": ["red", "green", "blue", "cyan", f"tag{i}"]},
        {"type": "array", "items": {"type": "string", "maxLength": 20}, "minItems": 1, "maxItems": 4},
        {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
        {"type": ["string", "null"]},
    ][i % 8]


def _object(prefix: str, n: int, depth: int) -> dict:
    props = {f"{prefix}_{i}": _leaf(i) for i in range(n)}
    if depth:
        props[f"{prefix}_child"] = _object(prefix + "c", n, depth - 1)
        props[f"{prefix}_list"] = {"type": "array", "items": _object(prefix + "l", 4, 0), "maxItems": 3}
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


LARGE = _object("f", 24, 2)   # 84 properties over 3 levels: enums, arrays, patterns, nullable, nested arrays of objects


def _without_max_length(schema):
    if isinstance(schema, dict):
        return {k: _without_max_length(v) for k, v in schema.items() if k != "maxLength"}
    return [_without_max_length(v) for v in schema] if isinstance(schema, list) else schema


# The same without string length bounds: llguidance's mask is much cheaper for unbounded strings.
LARGE_UNBOUNDED = _without_max_length(LARGE)
SCHEMAS = {"small": SMALL, "large": LARGE, "large, no maxLength": LARGE_UNBOUNDED}


def instance(schema: dict, rng: random.Random):
    """A random JSON value valid under the benchmark schemas (realistic words and numbers)."""
    if "enum" in schema:
        return rng.choice(schema["enum"])
    kind = schema["type"]
    if isinstance(kind, list):
        return None if rng.random() < 0.3 else " ".join(rng.choices(WORDS, k=rng.randint(1, 4)))
    if kind == "object":
        return {k: instance(v, rng) for k, v in schema["properties"].items()}
    if kind == "array":
        count = rng.randint(schema.get("minItems", 0), schema["maxItems"])
        return [instance(schema["items"], rng) for _ in range(count)]
    if kind == "string":
        if "pattern" in schema:
            return "".join(rng.choices("ABCDEFGHIJKLMNOPQRSTUVWXYZ", k=3)) + "-" + str(rng.randint(1000, 9999))
        return " ".join(rng.choices(WORDS, k=rng.randint(1, 5)))[: schema.get("maxLength", 1000)]
    if kind == "integer":
        return rng.randint(schema.get("minimum", -1000), schema.get("maximum", 1000))
    if kind == "number":
        return round(rng.uniform(-1000, 1000), rng.randint(0, 4))
    return rng.random() < 0.5


# -- tokenizers --------------------------------------------------------------------------------------

def _bytelevel_bpe(path: Path, vocab_size: int) -> Path:
    """A GPT-2-style byte-level BPE trained on CPython's standard library (no GPT-2 files are available offline)."""
    if not (path / "tokenizer.json").exists():
        files = sorted(glob.glob(sysconfig.get_paths()["stdlib"] + "/**/*.py", recursive=True))

        def texts():
            for name in files:
                try:
                    yield Path(name).read_text(encoding="utf-8")
                except (UnicodeDecodeError, OSError):
                    pass

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(texts(), trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
        PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(path)
    return path


def tokenizers(workdir: Path) -> dict[str, tuple[Path, int]]:
    """label -> (tokenizer folder, model vocabulary size)."""
    out = {}
    for size in (2000, 32000):
        path = workdir / f"spm-{size}"
        if not (path / "tokenizer.json").exists():
            path.mkdir(parents=True, exist_ok=True)
            write_tokenizer_files(path, SENTENCEPIECE, size, chat_template="", model_max_length=4096)
        out[f"llama-style {size} (project's test/demo tokenizer)"] = (path, size + 48 if size == 2000 else size)
    out["byte-level 50257 (GPT-2 size)"] = (_bytelevel_bpe(workdir / "bpe-50k", 50257), 50257)
    out["byte-level 128256 (Llama-3 size)"] = (_bytelevel_bpe(workdir / "bpe-128k", 128256), 128256)
    return out


def encode_continuation(tok, text: str) -> list[int]:
    """Token ids of ``text`` as generated after other text (no sentencepiece leading-space marker)."""
    ids = tok.encode("\n" + text, add_special_tokens=False)
    for k in range(1, 4):
        if tok.decode(ids[k:]) == text:
            return ids[k:]
    raise AssertionError("cannot tokenize as a continuation")


# -- the two libraries behind one interface ----------------------------------------------------------

class XGrammar:
    name = "xgrammar " + version("xgrammar")

    def __init__(self, tok, vocab: int, threads: int) -> None:
        self.info = xgrammar.TokenizerInfo.from_huggingface(tok, vocab_size=vocab, stop_token_ids=[tok.eos_token_id])
        self.threads = threads
        self.batch = xgrammar.BatchGrammarMatcher(max_threads=threads)

    def compile(self, schema: dict):
        compiler = xgrammar.GrammarCompiler(self.info, max_threads=self.threads, cache_enabled=False)
        return compiler.compile_json_schema(json.dumps(schema))

    def matcher(self, grammar):
        return xgrammar.GrammarMatcher(grammar)

    def fill(self, matchers, bitmask) -> None:
        if len(matchers) == 1:
            matchers[0].fill_next_token_bitmask(bitmask, 0)
        else:
            self.batch.batch_fill_next_token_bitmask(matchers, bitmask)

    def accept(self, matchers, tokens) -> bool:
        return all(m.accept_token(t) for m, t in zip(matchers, tokens))

    def ended(self, matcher) -> bool:
        return matcher.is_terminated()

    def accepts_string(self, schema: dict, text: str) -> str:
        """"accepts" or "rejects" ``text`` under ``schema``, or "refused: why" if the schema does not compile."""
        try:
            grammar = xgrammar.GrammarCompiler(self.info, cache_enabled=False).compile_json_schema(json.dumps(schema))
        except RuntimeError as exc:
            return "refused: " + str(exc).splitlines()[0].split(": ", 1)[-1][:60]
        matcher = xgrammar.GrammarMatcher(grammar)
        return "accepts" if matcher.accept_string(text) and matcher.is_completed() else "rejects"


class LLGuidance:
    name = "llguidance " + version("llguidance")

    def __init__(self, tok, vocab: int, threads: int) -> None:
        self.tok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab, eos_token=tok.eos_token_id)
        self.executor = llguidance.LLExecutor(num_threads=threads)
        self.templates: dict[str, llguidance.LLMatcher] = {}

    def compile(self, schema: dict) -> str:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema))
        template = llguidance.LLMatcher(self.tok, grammar)   # llguidance builds its parser here
        assert not template.is_error(), template.get_error()
        self.templates[grammar] = template
        return grammar

    def matcher(self, grammar):
        return self.templates[grammar].deep_copy()            # as llmserve does: copy a compiled template

    def fill(self, matchers, bitmask) -> None:
        if len(matchers) == 1:
            llguidance.torch.fill_next_token_bitmask(matchers[0], bitmask, 0)
        else:
            rows = [(m, i) for i, m in enumerate(matchers)]
            llguidance.torch.fill_next_token_bitmask_par(self.executor, rows, bitmask)

    def accept(self, matchers, tokens) -> bool:
        return all(m.consume_token(t) for m, t in zip(matchers, tokens))

    def ended(self, matcher) -> bool:
        return matcher.is_stopped()

    def accepts_string(self, schema: dict, text: str) -> str:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema))
        matcher = llguidance.LLMatcher(self.tok, grammar, limits=llguidance.LLParserLimits(verbose_errors=False))
        if matcher.is_error():
            lines = [line.strip() for line in matcher.get_error().splitlines() if line.strip()]
            return "refused: " + next((line for line in lines if line.startswith("error:")), lines[0])[:70]
        ok = matcher.consume_tokens(self.tok.tokenize_str(text)) and matcher.is_accepting()
        return "accepts" if ok else "rejects"


def _median(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def replay(lib, grammar, sequences: list[list[int]], eos: int, vocab: int) -> tuple[float, float, int]:
    """Drive one matcher per sequence in lock-step: (fill seconds, accept seconds, tokens)."""
    matchers = [lib.matcher(grammar) for _ in sequences]
    bitmask = torch.full((len(sequences), (vocab + 31) // 32), -1, dtype=torch.int32)
    sequences = [s + [eos] for s in sequences]
    fill = accept = 0.0
    tokens = 0
    for step in range(max(map(len, sequences))):
        active = [i for i, s in enumerate(sequences) if step < len(s)]
        ms, ts = [matchers[i] for i in active], [sequences[i][step] for i in active]
        start = time.perf_counter()
        lib.fill(ms, bitmask[: len(active)])
        fill += time.perf_counter() - start
        start = time.perf_counter()
        assert lib.accept(ms, ts), (lib.name, step)
        accept += time.perf_counter() - start
        tokens += len(active)
    assert all(lib.ended(m) for m in matchers)
    return fill, accept, tokens


def bench_tokenizer(label: str, path: Path, vocab: int, threads: int) -> None:
    tok = AutoTokenizer.from_pretrained(path)
    rng = random.Random(0)
    data = {name: [encode_continuation(tok, json.dumps(instance(schema, rng))) for _ in range(64)]
            for name, schema in SCHEMAS.items()}
    print(f"\n### {label}: model vocabulary {vocab}\n")
    print("| library | schema (tokens per instance) | compile | fill + accept per token, B=1 | "
          "B=64 | B=64 per step |")
    print("|---|---|---|---|---|---|")
    for cls in (XGrammar, LLGuidance):
        start = time.perf_counter()
        lib = cls(tok, vocab, threads)
        setup = time.perf_counter() - start
        for name, schema in SCHEMAS.items():
            compile_time = _median(lambda lib=lib, schema=schema: lib.compile(schema))
            grammar = lib.compile(schema)
            replay(lib, grammar, data[name][:8], tok.eos_token_id, vocab)               # warm-up
            cells = []
            for batch in (1, 64):
                fill, accept, tokens = replay(lib, grammar, data[name][:batch], tok.eos_token_id, vocab)
                cells.append(f"{fill / tokens * 1e6:.0f} + {accept / tokens * 1e6:.0f} us")
            steps = max(map(len, data[name])) + 1
            cells.append(f"{(fill + accept) / steps * 1e3:.2f} ms")
            lib_cell = f"{lib.name} (tokenizer setup {setup * 1e3:.0f} ms)" if name == "small" else ""
            tokens_each = statistics.mean(map(len, data[name]))
            row = [lib_cell, f"{name} ({tokens_each:.0f})", f"{compile_time * 1e3:.1f} ms", *cells]
            print("| " + " | ".join(row) + " |", flush=True)


def bench_apply(vocab_sizes: list[int]) -> None:
    print("\n### Applying a [64, V] bitmask to float32 logits (median of 20, ms)\n")
    print("| V | llmserve (torch, integer bias) | torch unpack + masked_fill_ | xgrammar CPU kernel | "
          "llguidance (torch.compile) |")
    print("|---|---|---|---|---|")
    shifts = torch.arange(32, dtype=torch.int32)

    def masked_fill(logits, bitmask):
        allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().view(bitmask.shape[0], -1)[:, : logits.shape[1]]
        logits.masked_fill_(~allowed, float("-inf"))

    start = time.perf_counter()
    llguidance.torch.apply_token_bitmask_inplace(torch.zeros(2, 64), torch.zeros(2, 2, dtype=torch.int32))
    compile_time = time.perf_counter() - start
    for vocab in vocab_sizes:
        generator = torch.Generator().manual_seed(vocab)
        logits = torch.randn(64, vocab, generator=generator)
        bitmask = torch.randint(-2**31, 2**31, (64, (vocab + 31) // 32), dtype=torch.int32, generator=generator)
        cells = []
        for fn in (apply_token_bitmask, masked_fill, xgrammar.apply_token_bitmask_inplace,
                   llguidance.torch.apply_token_bitmask_inplace):
            work = logits.clone()
            fn(work, bitmask)
            cells.append(f"{(_median(lambda fn=fn, work=work, bitmask=bitmask: fn(work, bitmask), 20)) * 1e3:.2f}")
        print(f"| {vocab} | " + " | ".join(cells) + " |")
    print(f"\nllguidance's kernel compiled (torch.compile, C++ on CPU) on its first call in {compile_time:.1f} s.")


KEYWORD_CASES = [   # (keyword, schema, an instance violating it, a valid instance)
    ("uniqueItems", {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "[1, 1]", "[1, 2]"),
    ("not", {"not": {"type": "string"}}, '"abc"', "12"),
    ("if/then", {"type": "object", "if": {"properties": {"a": {"const": 1}}, "required": ["a"]},
                 "then": {"required": ["b"]}}, '{"a": 1}', '{"a": 1, "b": 2}'),
    ("contains", {"type": "array", "contains": {"const": 1}}, "[2]", "[2, 1]"),
    ("dependentRequired", {"type": "object", "dependentRequired": {"a": ["b"]}}, '{"a": 1}', '{"a": 1, "b": 2}'),
    ("pattern + maxLength", {"type": "string", "pattern": "^[a-z]+$", "maxLength": 3}, '"abcdefgh"', '"abc"'),
    ("pattern with look-ahead", {"type": "string", "pattern": "^(?=.*[0-9])[a-z0-9]{4}$"}, '"abcd"', '"ab12"'),
]


def bench_keywords(path: Path) -> None:
    print("\n### Schemas with keywords not every library implements: does the compiled grammar refuse a violating "
          "instance and accept a valid one?\n")
    print("| keyword | violating / valid instance | xgrammar | llguidance |")
    print("|---|---|---|---|")
    tok = AutoTokenizer.from_pretrained(path)
    libs = (XGrammar(tok, len(tok), 1), LLGuidance(tok, len(tok), 1))
    for keyword, schema, bad, good in KEYWORD_CASES:
        cells = []
        for lib in libs:
            verdict = lib.accepts_string(schema, bad)
            if verdict == "accepts" and lib.accepts_string(schema, good) == "accepts":
                verdict = "IGNORED: accepts the violation"
            elif verdict == "accepts":
                verdict = "accepts the violation, refuses the valid one"
            elif verdict == "rejects":
                verdict = "enforced" if lib.accepts_string(schema, good) == "accepts" else "refuses valid output too"
            cells.append(verdict)
        print(f"| {keyword} | `{bad}` / `{good}` | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="fill threads of both libraries")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/llmserve-grammar-bench"))
    parser.add_argument("--only", help="run the tokenizers whose label contains this")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, fill threads {args.threads}, torch threads 1")
    toks = tokenizers(args.workdir)
    for label, (path, vocab) in toks.items():
        if args.only is None or args.only in label:
            bench_tokenizer(label, path, vocab, args.threads)
    bench_apply([32000, 50257, 128256])
    bench_keywords(next(iter(toks.values()))[0])


if __name__ == "__main__":
    main()
