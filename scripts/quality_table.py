"""Perplexity of one model in every format llmserve runs: the quality table of docs/quantization.md.

    python scripts/quality_table.py [--model DIR] [--work DIR] [--engine-flags "--num-threads 1"] [--output-json FILE]

The model (default: ``llmserve make-trained-model --preset target``) is written as GPTQ, AWQ and
compressed-tensors checkpoints (round-to-nearest from its float weights, by
``llmserve.testing.quantized_checkpoints``) and as GGUF files (the ``gguf`` package's quantisers), then each
format runs ``llmserve bench perplexity`` on the held-out corpus with ``--dtype float32``. The
``--quantization`` rows quantise the float checkpoint at load. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import shlex
import tempfile
from pathlib import Path

from llmserve.entrypoints.cli import main as llmserve
from llmserve.testing.gguf_files import write_gguf
from llmserve.testing.quantized_checkpoints import write_quantized_checkpoint
from llmserve.testing.trained_model import trained_model_path

GGUF_TYPES = ("Q8_0", "Q4_0")


def variants(model: Path, work: Path) -> list[tuple[str, str, list[str]]]:
    """``(label, model path, engine flags)`` per format; the quantised files are written into ``work``."""
    rows = [("float32", str(model), []), ("`--quantization int8` (W8A8)", str(model), ["--quantization", "int8"]),
            ("`--quantization fp8`", str(model), ["--quantization", "fp8"])]
    for label, fmt, options in (("GPTQ 8-bit g128", "gptq", {"bits": 8}), ("GPTQ 4-bit g128", "gptq", {"bits": 4}),
                                ("AWQ 4-bit g128", "awq", {}), ("compressed-tensors W8A8", "ct-w8a8", {})):
        out = work / f"{fmt}-{options.get('bits', '')}"
        write_quantized_checkpoint(model, out, fmt, group_size=128, **options)
        rows.append((label, str(out), []))
    for file_type in GGUF_TYPES:
        out = write_gguf(model, work / f"model-{file_type}.gguf", "llama", file_type)
        rows.append((f"GGUF {file_type}", str(out), ["--tokenizer", str(model)]))
    return rows


def _weights_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.glob("*.safetensors"))


def run(model: Path, work: Path, engine_flags: list[str]) -> list[dict]:
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for label, path, flags in variants(model, work):
        out = work / "ppl.json"
        if llmserve(["--log-level", "warning", "bench", "perplexity", path, "--dtype", "float32", *flags, *engine_flags,
                     "--output-json", str(out)]) != 0:
            raise RuntimeError(f"bench perplexity failed for {label}")
        result = json.loads(out.read_text())
        results.append({"format": label, **result, "weights_bytes": _weights_bytes(Path(path))})
    return results


def table(results: list[dict]) -> str:
    base = results[0]["perplexity"]
    lines = ["| format | perplexity | x float32 | weight file (MB) |", "|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['format']} | {r['perplexity']:.3f} | {r['perplexity'] / base:.4f} | "
                     f"{r['weights_bytes'] / 1e6:.1f} |")
    return "\n".join(lines)


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="a Llama-family checkpoint (default: the trained target)")
    parser.add_argument("--work", default=None, help="folder for the quantised copies (default: a temporary one)")
    parser.add_argument("--engine-flags", default="", help="more engine flags for every run, e.g. \"--num-threads 1\"")
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    model = Path(args.model) if args.model else trained_model_path("target")
    with tempfile.TemporaryDirectory() as tmp:
        results = run(model, Path(args.work or tmp), shlex.split(args.engine_flags))
    print(table(results))
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    _main()
