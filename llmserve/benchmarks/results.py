"""Saving ``bench serve`` / ``bench sweep`` results as vLLM's benchmark does: ``--save-result`` is a switch,
the file goes to ``--result-dir`` (default: the current folder) under ``--result-filename`` or vLLM's name
``{label}-{request_rate}qps[-concurrency{N}]-{model}-{YYYYmmdd-HHMMSS}.json`` (label: ``--label``, else
the backend), ``--append-result`` adds one JSON line per run to the file, and ``--metadata KEY=VALUE ...``
adds top-level fields (strings) to the result.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable
from typing import Any


def add_result_args(parser: argparse.ArgumentParser, detailed: bool = True) -> None:
    g = parser.add_argument_group("result file")
    g.add_argument("--save-result", action="store_true", help="save the result as JSON")
    g.add_argument("--append-result", action="store_true",
                   help="append the result to the file as one JSON line (implies --save-result)")
    g.add_argument("--result-dir", default=None, help="folder of the result file (created if missing)")
    g.add_argument("--result-filename", default=None,
                   help="file name (default: {label}-{request_rate}qps[-concurrency{N}]-{model}-{date}.json)")
    g.add_argument("--label", default=None, help="prefix of the default file name (default: the backend)")
    g.add_argument("--metadata", nargs="*", default=None, metavar="KEY=VALUE",
                   help="fields saved in the result, e.g. --metadata version=0.3.3 tp=1")
    if detailed:
        g.add_argument("--save-detailed", action="store_true",
                       help="also save per-request lengths, TTFTs, ITLs, texts and errors")


def saving(args: argparse.Namespace) -> bool:
    return args.save_result or args.append_result


def check_result_args(args: argparse.Namespace, result_fields: Iterable[str] = ()) -> dict[str, str]:
    """Fail before the run on result flags that would do nothing, are malformed, or would overwrite one of
    the ``result_fields``; returns the metadata."""
    if not saving(args):
        given = [flag for flag in ("result_dir", "result_filename", "label", "metadata", "save_detailed")
                 if getattr(args, flag, None)]
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} needs --save-result (or --append-result)")
    metadata: dict[str, str] = {}
    for item in args.metadata or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"invalid --metadata {item!r}: use KEY=VALUE")
        metadata[key.strip()] = value.strip()
    clash = sorted(set(metadata) & set(result_fields))
    if clash:
        raise ValueError(f"--metadata {clash[0]}=... would overwrite the result's own {clash[0]!r} field")
    return metadata


def default_filename(label: str, rate: str, max_concurrency: int | None, model: str, date: str) -> str:
    concurrency = f"-concurrency{max_concurrency}" if max_concurrency is not None else ""
    return f"{label}-{rate}qps{concurrency}-{model.split('/')[-1]}-{date}.json"


def save_result(args: argparse.Namespace, result: dict[str, Any], default_name: str) -> str:
    """Write ``result`` with the metadata (checked by :func:`check_result_args`); returns the path."""
    result = {**check_result_args(args), **result}
    path = args.result_filename or default_name
    if args.result_dir:
        os.makedirs(args.result_dir, exist_ok=True)
        path = os.path.join(args.result_dir, path)
    if args.append_result:
        with open(path, "a", encoding="utf-8") as f:
            if f.tell():
                f.write("\n")
            json.dump(result, f)
    else:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return path
