"""The flags of ``bench serve`` and ``bench sweep``, under ``vllm bench serve``'s names and meanings, so a
script written for vLLM's benchmark runs unchanged. A vLLM flag for something this benchmark does not do
(another server's protocol, the profiler, beam search, a dataset it has not) is refused by name with the
reason, never accepted and ignored.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from llmserve.benchmarks.datasets import DATASET_NAMES
from llmserve.benchmarks.flags import refuse_other_datasets_flags, require_at_least
from llmserve.benchmarks.results import add_result_args

COMPLETIONS_ENDPOINT = "/v1/completions"
CHAT_ENDPOINT = "/v1/chat/completions"
# vLLM's backends that speak the OpenAI API llmserve serves, and the endpoint each talks to
BACKENDS = {"openai": COMPLETIONS_ENDPOINT, "vllm": COMPLETIONS_ENDPOINT, "openai-chat": CHAT_ENDPOINT}
# the datasets whose prompts are random token ids on /v1/completions (corpus text on the chat endpoint)
TOKEN_ID_DATASETS = ("random", "prefix-repetition")
# each dataset's own flags (dests): another dataset's, set, would do nothing
DATASET_FLAGS = {
    "random": ("random_input_len", "random_output_len", "random_range_ratio", "random_prefix_len"),
    "sharegpt": ("dataset_path", "sharegpt_output_len"),
    "prefix-repetition": ("prefix_repetition_prefix_len", "prefix_repetition_suffix_len",
                          "prefix_repetition_num_prefixes", "prefix_repetition_output_len"),
}
# the least value each count or length can mean anything at
LEAST = {"num_prompts": 1, "max_concurrency": 1, "random_input_len": 1, "random_output_len": 1,
         "random_prefix_len": 0, "sharegpt_output_len": 1, "prefix_repetition_prefix_len": 0,
         "prefix_repetition_suffix_len": 1, "prefix_repetition_num_prefixes": 1, "prefix_repetition_output_len": 1}
MIN_TOKEN_ID = 100   # --vocab-size draws ids from [this, vocab size)

_NO_DATASET = "llmserve bench has the random, sharegpt and prefix_repetition datasets only"
UNSUPPORTED_VLLM_FLAGS = {
    "--profile": "the server has no profiler endpoints (/start_profile); profile it with py-spy",
    "--use-beam-search": "llmserve does not implement beam search",
    "--lora-modules": "bench serve does not spread requests over adapters; to benchmark one the server serves "
                      "(llmserve serve --lora-modules NAME=PATH), pass its NAME as --model",
    "--ramp-up-strategy": "no request-rate ramp-up; use llmserve bench sweep for several rates",
    "--ramp-up-start-rps": "no request-rate ramp-up; use llmserve bench sweep for several rates",
    "--ramp-up-end-rps": "no request-rate ramp-up; use llmserve bench sweep for several rates",
    "--sonnet-input-len": _NO_DATASET, "--sonnet-output-len": _NO_DATASET, "--sonnet-prefix-len": _NO_DATASET,
    "--hf-subset": _NO_DATASET, "--hf-split": _NO_DATASET, "--hf-output-len": _NO_DATASET,
    "--no-stream": _NO_DATASET, "--custom-output-len": _NO_DATASET, "--custom-skip-chat-template": _NO_DATASET,
}


class _Unsupported(argparse.Action):
    """Fails the parse with the reason as soon as the flag is seen (with or without a value)."""

    def __init__(self, option_strings: list[str], dest: str, reason: str = "", **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs="?", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        self.reason = reason

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        parser.error(f"{option_string} (a vllm bench serve flag) is not supported: {self.reason}")


def _dataset_name(value: str) -> str:
    """vLLM spells it ``prefix_repetition``; both spellings are accepted."""
    return value.replace("_", "-")


def add_dataset_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("dataset")
    g.add_argument("--dataset-name", default="random", type=_dataset_name, choices=DATASET_NAMES,
                   metavar="{random,sharegpt,prefix_repetition}")
    g.add_argument("--dataset-path", default=None,
                   help="a ShareGPT JSON file (with --dataset-name sharegpt); default: ShareGPT-shaped synthetic "
                        "requests built from the bundled corpus")
    g.add_argument("--num-prompts", type=int, default=64)
    g.add_argument("--random-input-len", type=int, default=128)
    g.add_argument("--random-output-len", type=int, default=128)
    g.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths are uniform in [len * (1 - r), len * (1 + r)]")
    g.add_argument("--random-prefix-len", type=int, default=0,
                   help="tokens of one prefix shared by every random request, before its own input tokens")
    g.add_argument("--sharegpt-output-len", type=int, default=None,
                   help="fixed output length for sharegpt requests (default: the dataset's)")
    g.add_argument("--prefix-repetition-prefix-len", type=int, default=256)
    g.add_argument("--prefix-repetition-suffix-len", type=int, default=256)
    g.add_argument("--prefix-repetition-num-prefixes", type=int, default=10)
    g.add_argument("--prefix-repetition-output-len", type=int, default=128)
    g.add_argument("--tokenizer", default=None,
                   help="tokenizer folder or Hub id used to build and count text prompts (default: the "
                        "server's /tokenize if it has one, else about 4 characters per token)")
    g.add_argument("--tokenizer-mode", default="auto", choices=["auto"], help="a Hugging Face tokenizer")
    g.add_argument("--trust-remote-code", action="store_true", help="allow the tokenizer's own Python code")
    g.add_argument("--vocab-size", type=int, default=None,
                   help=f"random token-id prompts draw ids in [{MIN_TOKEN_ID}, this) (default: the --tokenizer's "
                        "vocabulary, else the ids the server's /tokenize gives the bundled corpus)")


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling (sent with every request; unset fields are not sent)")
    g.add_argument("--temperature", type=float, default=None, help="default 0 (greedy), as vLLM's benchmark")
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--min-p", type=float, default=None)
    g.add_argument("--logprobs", type=int, default=None, help="logprobs per output token to ask for")


def add_serve_args(parser: argparse.ArgumentParser, sweep: bool = False) -> None:
    """Flags of ``bench serve`` (``sweep=True`` leaves out the single --request-rate and --save-detailed)."""
    parser.add_argument("--backend", default=None, choices=list(BACKENDS),
                        help="openai / vllm: /v1/completions; openai-chat: /v1/chat/completions "
                             "(default: the one --endpoint implies, else openai)")
    parser.add_argument("--base-url", default=None,
                        help="the server, without /v1 (default: http://HOST:PORT from --host and --port)")
    parser.add_argument("--host", default=None, help="default 127.0.0.1")
    parser.add_argument("--port", type=int, default=None, help="default 8000")
    parser.add_argument("--endpoint", default=None, choices=[COMPLETIONS_ENDPOINT, CHAT_ENDPOINT],
                        help="default: the one --backend implies")
    parser.add_argument("--model", default=None, help="model name (default: the server's first)")
    parser.add_argument("--served-model-name", default=None,
                        help="the name sent as 'model' when it differs from --model")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                        help="sent as 'Authorization: Bearer KEY' (default: $OPENAI_API_KEY)")
    add_dataset_args(parser)
    add_sampling_args(parser)
    if not sweep:
        parser.add_argument("--request-rate", type=float, default=float("inf"),
                            help="requests/s (Poisson); inf = all at once")
    parser.add_argument("--burstiness", type=float, default=1.0,
                        help="gamma shape of the arrival gaps: 1 = Poisson, < 1 burstier, > 1 more regular")
    parser.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight at once")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                        help="send ignore_eos so every request generates its full output length (default on)")
    parser.add_argument("--percentile-metrics", default="ttft,tpot,itl,e2el",
                        help="which of ttft,tpot,itl,e2el to report percentiles of")
    parser.add_argument("--metric-percentiles", default="50,99", help="comma-separated percentiles")
    parser.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS",
                        help="SLOs for goodput, e.g. ttft:500 tpot:50 (ms; keys ttft, tpot, e2el)")
    parser.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed single request sent first")
    add_result_args(parser, detailed=not sweep)
    for flag, reason in UNSUPPORTED_VLLM_FLAGS.items():
        parser.add_argument(flag, action=_Unsupported, reason=reason)


def resolve_url(args: argparse.Namespace) -> tuple[str, str, str]:
    """(base URL without /v1, endpoint, backend) from --base-url / --host / --port, --endpoint and --backend."""
    if args.base_url is not None and (args.host is not None or args.port is not None):
        raise ValueError("give --base-url or --host / --port, not both")
    base_url = (args.base_url or f"http://{args.host or '127.0.0.1'}:{args.port or 8000}").rstrip("/")
    base_url = base_url.removesuffix("/v1")
    endpoint = args.endpoint or BACKENDS[args.backend or "openai"]
    backend = args.backend or ("openai-chat" if endpoint == CHAT_ENDPOINT else "openai")
    if BACKENDS[backend] != endpoint:
        raise ValueError(f"--backend {backend} talks to {BACKENDS[backend]}, not --endpoint {endpoint}")
    return base_url, endpoint, backend


def sampling_fields(args: argparse.Namespace, chat: bool) -> dict[str, Any]:
    """The request fields the sampling flags set (greedy unless --temperature says otherwise)."""
    fields: dict[str, Any] = {"temperature": 0.0 if args.temperature is None else args.temperature}
    for name in ("top_p", "top_k", "min_p"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    if args.logprobs is not None:
        fields.update({"logprobs": True, "top_logprobs": args.logprobs} if chat else {"logprobs": args.logprobs})
    return fields


def check_serve_args(args: argparse.Namespace) -> None:
    """Refuse before any request: counts and lengths that cannot work, and flags that would do nothing with the
    dataset and endpoint chosen (another dataset's, --vocab-size for text prompts)."""
    require_at_least(args, LEAST)
    require_at_least(args, {"vocab_size": MIN_TOKEN_ID + 1})
    refuse_other_datasets_flags(args, DATASET_FLAGS)
    endpoint = resolve_url(args)[1]
    if args.vocab_size is not None and (endpoint == CHAT_ENDPOINT or args.dataset_name not in TOKEN_ID_DATASETS):
        raise ValueError(f"--vocab-size does nothing with --dataset-name {args.dataset_name} on {endpoint}: only "
                         f"{' and '.join(TOKEN_ID_DATASETS)} on {COMPLETIONS_ENDPOINT} send token-id prompts")
