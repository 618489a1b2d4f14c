"""What a JSON-schema constraint costs: output tok/s with and without one, at batch 1 and batch N, and the
time to compile a large schema. Offline engine, greedy; the constrained runs use compact JSON. Rates
count every output token over the whole run (prefill included), free text stopping at EOS as usual.

    python scripts/bench_structured_outputs.py [--model DIR] [--num-prompts 64] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import time

from llmserve import LLM, SamplingParams
from llmserve.structured_output import GrammarCompiler, StructuredOutputSpec

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags", "address"],
          "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer"},
                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 6},
                         "address": {"type": "object", "required": ["city", "zip"],
                                     "properties": {"city": {"type": "string", "maxLength": 30},
                                                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}}}}


def large_schema(num_properties: int = 80) -> dict:
    kinds = [{"type": "string", "maxLength": 20}, {"type": "integer"}, {"type": "boolean"},
             {"enum": ["red", "green", "blue"]}, {"type": "array", "items": {"type": "number"}, "maxItems": 4},
             {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}, {"type": ["string", "null"]}]
    props = {f"field_{i}": kinds[i % len(kinds)] for i in range(num_properties)}
    return {"type": "object", "properties": props, "required": list(props)[::2], "additionalProperties": False}


def run(llm: LLM, prompts: list[str], params: SamplingParams, batch: int) -> float:
    """Output tokens per second, ``batch`` prompts at a time."""
    tokens, start = 0, time.perf_counter()
    for i in range(0, len(prompts), batch):
        tokens += sum(len(o.outputs[0].token_ids) for o in llm.generate(prompts[i:i + batch], params))
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint (default: the demo model)")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    llm = LLM(args.model, kv_cache_memory_bytes="2GiB")
    prompts = [f"Describe person number {i} as JSON:" for i in range(args.num_prompts)]
    spec = StructuredOutputSpec.json_schema(SCHEMA, any_whitespace=False)
    free = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    constrained = SamplingParams(temperature=0, max_tokens=args.max_tokens, structured_outputs=spec)
    for batch in (1, args.num_prompts):
        count = min(len(prompts), 4 if batch == 1 else len(prompts))
        run(llm, prompts[:count], free, batch)          # warm up both paths (and compile the schema)
        run(llm, prompts[:count], constrained, batch)
        pairs = [(run(llm, prompts[:count], free, batch), run(llm, prompts[:count], constrained, batch))
                 for _ in range(2)]   # alternating; the better run of each (noise only slows a run down)
        a, b = max(p[0] for p in pairs), max(p[1] for p in pairs)
        print(f"batch {batch:3d}: free text {a:7.1f} tok/s, JSON schema {b:7.1f} tok/s ({100 * b / a:.0f}%)")
    compiler = GrammarCompiler(llm.get_tokenizer())
    start = time.perf_counter()
    compiler.compile(StructuredOutputSpec.json_schema(large_schema()))
    print(f"compile an {len(large_schema()['properties'])}-property schema: "
          f"{1000 * (time.perf_counter() - start):.1f} ms")
    compiler.shutdown()
    llm.shutdown()


if __name__ == "__main__":
    main()
