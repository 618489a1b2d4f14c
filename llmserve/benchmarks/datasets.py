"""Benchmark requests: random, ShareGPT-shaped (synthetic or a real ShareGPT JSON file) and prefix-repetition.

Every dataset works offline: prompt text is cut from the corpus bundled with llmserve
(``llmserve/testing/corpus/corpus.txt``), so no benchmark downloads anything. A real ShareGPT file
(e.g. ``ShareGPT_V3_unfiltered_cleaned_split.json``) is read with ``--dataset-path``.

ShareGPT-shaped synthetic lengths
---------------------------------
Without the ShareGPT file, prompt and output lengths (in tokens) are drawn from log-normal
distributions chosen to match published ShareGPT statistics, then filtered exactly as vLLM's
benchmark filters the real file (prompt and output >= 4 tokens, prompt <= 1024, prompt + output <= 2048):

===========  ==========================  ==================================================
             log-normal (of tokens)       after the filter (100k draws)
===========  ==========================  ==================================================
prompt       mu = ln(130), sigma = 1.0    mean ~ 187, median ~ 126, p90 ~ 423, p99 ~ 860
output       mu = ln(180), sigma = 0.9    mean ~ 259, median ~ 179, p90 ~ 559, p99 ~ 1274
===========  ==========================  ==================================================

Sources for the targets:

* the PagedAttention paper (Kwon et al., "Efficient Memory Management for Large Language Model
  Serving with PagedAttention", SOSP 2023, section 6.1 and figure 11): ShareGPT requests average
  161 input and 338 output tokens, with long tails (8.4x / 5.8x longer than Alpaca's);
* vLLM's ``benchmark_serving`` on ``ShareGPT_V3_unfiltered_cleaned_split.json`` with the filter above,
  as commonly reported with Llama tokenizers: roughly 215-230 input and ~200 output tokens per request.

The means are set between those two sources (about 187 input / 259 output tokens after the filter);
the spreads (sigma) put the median well below the mean and the 99th percentile at 4-5x the mean,
the long right tails both sources show. **These
are approximations, not fits to the raw data** (which llmserve cannot download); they reproduce the
scale and the skew, which is what matters for batching: a few long prompts and long outputs among
many short ones. For the real distribution pass the real file with ``--dataset-path``.

Token counting
--------------
Prompts are cut from the corpus in tokens of a *tokenizer*: the engine's own in offline benchmarks;
for ``bench serve`` a local ``--tokenizer``, else the server's ``/tokenize`` + ``/detokenize``
(llmserve and vLLM both have them), else an estimate of 4 characters per token. Counts reported by
``bench serve`` come from the ``usage`` the server returns whenever it returns one.
"""

from __future__ import annotations

import functools
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

CORPUS_PATH = Path(__file__).resolve().parent.parent / "testing" / "corpus" / "corpus.txt"

# vLLM's ShareGPT filter (benchmark_dataset.is_valid_sequence).
SHAREGPT_MIN_LEN = 4
SHAREGPT_MAX_PROMPT_LEN = 1024
SHAREGPT_MAX_TOTAL_LEN = 2048


@dataclass(frozen=True)
class LogNormal:
    """Log-normal length distribution: ``exp(N(ln(median), sigma^2))`` rounded to whole tokens."""

    median: float
    sigma: float

    @property
    def mean(self) -> float:
        """Mean before any filtering."""
        return self.median * math.exp(self.sigma ** 2 / 2)

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        return np.rint(rng.lognormal(math.log(self.median), self.sigma, size)).astype(np.int64)


SHAREGPT_PROMPT_LEN = LogNormal(median=130.0, sigma=1.0)
SHAREGPT_OUTPUT_LEN = LogNormal(median=180.0, sigma=0.9)

DATASET_NAMES = ("random", "sharegpt", "prefix-repetition")


@dataclass
class SampleRequest:
    """One benchmark request: the prompt (text or token ids), its length in tokens, the tokens to generate."""

    prompt: str | list[int]
    prompt_len: int
    expected_output_len: int


# ------------------------------------------------------------------------------------------- tokenizers


class TextTokenizer(Protocol):
    """What the datasets need from a tokenizer. ``encode`` returns opaque units (token ids for a real
    tokenizer) that ``decode`` turns back into text; ``exact`` says whether a unit is a real token."""

    name: str
    exact: bool

    def encode(self, text: str) -> list[Any]: ...

    def decode(self, units: Sequence[Any]) -> str: ...


class HFTokenizer:
    """A Hugging Face tokenizer (or anything with ``encode(text, add_special_tokens=)`` and ``decode``)."""

    exact = True

    def __init__(self, tokenizer: Any, name: str = "") -> None:
        self.tokenizer = tokenizer
        self.name = name or getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, units: Sequence[Any]) -> str:
        return self.tokenizer.decode(list(units))

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    @property
    def special_ids(self) -> set[int]:
        return set(getattr(self.tokenizer, "all_special_ids", []) or [])


class ServerTokenizer:
    """The server's ``/tokenize`` and ``/detokenize`` endpoints (llmserve's and vLLM's)."""

    exact = True

    def __init__(self, base_url: str, model: str, headers: dict[str, str] | None = None) -> None:
        import httpx

        self.base_url = base_url.rstrip("/")
        self.model = model
        self.name = f"{self.base_url}/tokenize"
        self.client = httpx.Client(timeout=120, headers=headers or {})

    def encode(self, text: str) -> list[int]:
        response = self.client.post(f"{self.base_url}/tokenize",
                                    json={"model": self.model, "prompt": text, "add_special_tokens": False})
        response.raise_for_status()
        return list(response.json()["tokens"])

    def decode(self, units: Sequence[Any]) -> str:
        response = self.client.post(f"{self.base_url}/detokenize", json={"model": self.model, "tokens": list(units)})
        response.raise_for_status()
        return response.json()["prompt"]

    @functools.cached_property
    def corpus_token_ids(self) -> list[int]:
        """The distinct ids ``/tokenize`` gives the bundled corpus: ids the model has, none special. Neither
        llmserve's nor vLLM's server tells its vocabulary's size, and an id past it fails the request."""
        return sorted(set(CorpusText(self).units))

    @classmethod
    def probe(cls, base_url: str, model: str, headers: dict[str, str] | None = None) -> ServerTokenizer | None:
        """The server's tokenizer if both endpoints answer, else ``None``."""
        try:
            tokenizer = cls(base_url, model, headers)
            ids = tokenizer.encode("Hello world")
            tokenizer.decode(ids)
            return tokenizer
        except Exception:   # noqa: BLE001 - any failure means "not available"
            return None


class ApproxTokenizer:
    """No tokenizer at all: one "token" per ``chars_per_token`` characters (an estimate; English text
    averages about 4 characters per token with Llama-style tokenizers)."""

    exact = False

    def __init__(self, chars_per_token: float = 4.0) -> None:
        self.chars_per_token = chars_per_token
        self.name = f"estimate ({chars_per_token:g} characters per token)"

    def encode(self, text: str) -> list[str]:
        step = self.chars_per_token
        count = max(1, math.ceil(len(text) / step)) if text else 0
        return [text[round(i * step):round((i + 1) * step)] for i in range(count)]

    def decode(self, units: Sequence[Any]) -> str:
        return "".join(units)


# ------------------------------------------------------------------------------------------- corpus text


def load_corpus() -> str:
    return CORPUS_PATH.read_text(encoding="utf-8")


def _paragraph_chunks(text: str, size: int = 4000) -> list[str]:
    """``text`` in pieces of about ``size`` characters cut after a newline (each well under any tokenizer's
    maximum length, and small requests for a server's /tokenize)."""
    chunks, start = [], 0
    while start < len(text):
        end = min(len(text), start + size)
        if end < len(text):
            cut = text.rfind("\n", start, end)
            end = cut + 1 if cut > start else end
        chunks.append(text[start:end])
        start = end
    return chunks


class CorpusText:
    """Prompts of an exact number of tokens, cut from the bundled corpus at random offsets."""

    def __init__(self, tokenizer: TextTokenizer, text: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.units: list[Any] = []
        for piece in _paragraph_chunks(text if text is not None else load_corpus()):
            self.units.extend(tokenizer.encode(piece))
        if not self.units:
            raise ValueError("the corpus is empty")

    def units_of_length(self, length: int, rng: random.Random) -> list[Any]:
        units, n = self.units, len(self.units)
        start = rng.randrange(n)
        if start + length <= n:
            return units[start:start + length]
        out = list(units[start:])
        while len(out) < length:   # wrap around (only for prompts longer than the corpus)
            out.extend(units[:length - len(out)])
        return out

    def text_of_length(self, length: int, rng: random.Random) -> str:
        return self.tokenizer.decode(self.units_of_length(length, rng))


# ------------------------------------------------------------------------------------------- samplers


def uniform_lengths(rng: np.random.Generator, mean: int, range_ratio: float, size: int) -> np.ndarray:
    """vLLM's random-dataset lengths: uniform integers in [mean * (1 - r), mean * (1 + r)], at least 1."""
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")
    if mean < 1:
        raise ValueError(f"a random length must be at least 1 token, got {mean}")
    low = max(1, int(mean * (1 - range_ratio)))
    high = max(low, int(mean * (1 + range_ratio)))
    return rng.integers(low, high + 1, size=size)


def random_token_ids(rng: random.Random, length: int, allowed: Sequence[int]) -> list[int]:
    return [allowed[rng.randrange(len(allowed))] for _ in range(length)]


def random_piece(rng: random.Random, length: int, token_ids: Sequence[int] | None,
                 corpus: CorpusText | None) -> Any:
    """``length`` random ids drawn from ``token_ids``, else corpus text of ``length`` tokens."""
    if token_ids is not None:
        return random_token_ids(rng, length, token_ids)
    return corpus.text_of_length(length, rng)   # type: ignore[union-attr]


def allowed_token_ids(vocab_size: int, special_ids: set[int] | None = None, low: int = 0) -> list[int]:
    special = special_ids or set()
    return [t for t in range(low, vocab_size) if t not in special]


def sample_random(num: int, input_len: int, output_len: int, range_ratio: float = 0.0, seed: int = 0, *,
                  token_ids: Sequence[int] | None = None, corpus: CorpusText | None = None,
                  prefix_len: int = 0) -> list[SampleRequest]:
    """``num`` requests of about ``input_len`` prompt tokens and ``output_len`` output tokens, each after
    the same ``prefix_len``-token prefix (vLLM's ``--random-prefix-len``).

    With ``token_ids`` the prompts are random ids drawn from it (token-id prompts); with ``corpus`` they
    are corpus text of that many tokens."""
    if (token_ids is None) == (corpus is None):
        raise ValueError("give exactly one of token_ids or corpus")
    if prefix_len < 0:
        raise ValueError(f"--random-prefix-len must be >= 0, got {prefix_len}")
    np_rng = np.random.default_rng(seed)
    rng = random.Random(seed)
    in_lens = uniform_lengths(np_rng, input_len, range_ratio, num)
    out_lens = uniform_lengths(np_rng, output_len, range_ratio, num)
    prefix = random_piece(rng, prefix_len, token_ids, corpus) if prefix_len else None
    requests = []
    for n_in, n_out in zip(in_lens.tolist(), out_lens.tolist()):
        prompt = random_piece(rng, n_in, token_ids, corpus)
        if prefix is not None:
            prompt = prefix + prompt if token_ids is not None else prefix + " " + prompt
        requests.append(SampleRequest(prompt, prefix_len + n_in, n_out))
    return requests


def sharegpt_lengths(num: int, seed: int = 0, max_total_len: int = SHAREGPT_MAX_TOTAL_LEN,
                     max_prompt_len: int = SHAREGPT_MAX_PROMPT_LEN,
                     fixed_output_len: int | None = None) -> list[tuple[int, int]]:
    """``num`` (prompt, output) token lengths from the ShareGPT-shaped distributions, filtered like vLLM
    filters the real file (draws that fail the filter are redrawn)."""
    max_total_len = min(max_total_len, SHAREGPT_MAX_TOTAL_LEN)
    max_prompt_len = min(max_prompt_len, SHAREGPT_MAX_PROMPT_LEN, max_total_len - SHAREGPT_MIN_LEN)
    if max_prompt_len < SHAREGPT_MIN_LEN:
        raise ValueError(f"a context of {max_total_len} tokens is too short for ShareGPT-shaped requests")
    rng = np.random.default_rng(seed)
    out: list[tuple[int, int]] = []
    while len(out) < num:
        batch = max(64, 2 * (num - len(out)))
        prompts = SHAREGPT_PROMPT_LEN.sample(rng, batch)
        outputs = SHAREGPT_OUTPUT_LEN.sample(rng, batch)
        for p, o in zip(prompts.tolist(), outputs.tolist()):
            if fixed_output_len is not None:
                o = fixed_output_len
            if p < SHAREGPT_MIN_LEN or p > max_prompt_len or p + o > max_total_len:
                continue
            if fixed_output_len is None and o < SHAREGPT_MIN_LEN:
                continue
            out.append((p, o))
            if len(out) == num:
                break
    return out


def sample_sharegpt_synthetic(num: int, corpus: CorpusText, seed: int = 0,
                              max_total_len: int = SHAREGPT_MAX_TOTAL_LEN,
                              fixed_output_len: int | None = None,
                              as_token_ids: bool = False) -> list[SampleRequest]:
    """ShareGPT-shaped requests with corpus text (or its token ids) as prompts."""
    rng = random.Random(seed)
    requests = []
    for p, o in sharegpt_lengths(num, seed, max_total_len, fixed_output_len=fixed_output_len):
        units = corpus.units_of_length(p, rng)
        prompt = list(units) if as_token_ids else corpus.tokenizer.decode(units)
        requests.append(SampleRequest(prompt, p, o))
    return requests


def _turns(entry: dict[str, Any]) -> list[str]:
    """The texts of a conversation, from ShareGPT's ``conversations: [{from, value}]`` or a
    ``messages: [{role, content}]`` list."""
    conversation = entry.get("conversations") or entry.get("conversation") or entry.get("messages") or []
    texts = []
    for turn in conversation:
        if isinstance(turn, dict):
            value = turn.get("value", turn.get("content"))
            if isinstance(value, str):
                texts.append(value)
    return texts


def load_sharegpt(path: str | Path, num: int, tokenizer: TextTokenizer, seed: int = 0,
                  fixed_output_len: int | None = None, max_total_len: int = SHAREGPT_MAX_TOTAL_LEN,
                  as_token_ids: bool = False) -> list[SampleRequest]:
    """Requests from a ShareGPT JSON file, as vLLM samples them: conversations with at least two turns,
    shuffled with ``seed``; the first turn is the prompt, the second's length is the output length
    (or ``fixed_output_len``); pairs failing the length filter are skipped. If the file has fewer valid
    conversations than ``num``, they are reused in order."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if isinstance(data, dict):
        data = data.get("data") or data.get("conversations") or []
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of conversations")
    pairs = [t[:2] for t in map(_turns, (e for e in data if isinstance(e, dict))) if len(t) >= 2]
    random.Random(seed).shuffle(pairs)
    max_total = min(max_total_len, SHAREGPT_MAX_TOTAL_LEN)
    requests: list[SampleRequest] = []
    for prompt, completion in pairs:
        if len(requests) == num:
            break
        prompt_units = tokenizer.encode(prompt)
        prompt_len = len(prompt_units)
        output_len = fixed_output_len if fixed_output_len is not None else len(tokenizer.encode(completion))
        if prompt_len < SHAREGPT_MIN_LEN or prompt_len > SHAREGPT_MAX_PROMPT_LEN or prompt_len + output_len > max_total:
            continue
        if fixed_output_len is None and output_len < SHAREGPT_MIN_LEN:
            continue
        requests.append(SampleRequest(list(prompt_units) if as_token_ids else prompt, prompt_len, output_len))
    if not requests:
        raise ValueError(f"{path}: no conversation with two turns passes the length filter")
    i = 0
    while len(requests) < num:
        requests.append(requests[i])
        i += 1
    return requests


def sample_prefix_repetition(num: int, prefix_len: int, suffix_len: int, num_prefixes: int, output_len: int,
                             seed: int = 0, *, token_ids: Sequence[int] | None = None,
                             corpus: CorpusText | None = None) -> list[SampleRequest]:
    """vLLM's prefix-repetition dataset: ``num_prefixes`` shared prefixes, each followed by a random suffix
    in ``num / num_prefixes`` requests, shuffled; exercises prefix caching."""
    if (token_ids is None) == (corpus is None):
        raise ValueError("give exactly one of token_ids or corpus")
    if num_prefixes < 1:
        raise ValueError("--prefix-repetition-num-prefixes must be >= 1")
    rng = random.Random(seed)
    per_prefix, extra = divmod(num, num_prefixes)
    requests = []
    for i in range(num_prefixes):
        prefix = random_piece(rng, prefix_len, token_ids, corpus)
        for _ in range(per_prefix + (1 if i < extra else 0)):
            suffix = random_piece(rng, suffix_len, token_ids, corpus)
            prompt = prefix + suffix if token_ids is not None else prefix + " " + suffix
            requests.append(SampleRequest(prompt, prefix_len + suffix_len, output_len))
    rng.shuffle(requests)
    return requests
