"""Checks the ``bench`` commands share on their flags, so that a flag is refused by name when its value cannot
work, or when it would do nothing with the other flags given, rather than accepted and ignored."""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping


def flag(dest: str) -> str:
    """The command-line spelling of an argparse ``dest``."""
    return "--" + dest.replace("_", "-")


def require_at_least(args: argparse.Namespace, least: Mapping[str, int]) -> None:
    """Refuse a flag below the least value it can mean anything at (an unset flag, None, is not checked)."""
    for dest, minimum in least.items():
        value = getattr(args, dest)
        if value is not None and value < minimum:
            raise ValueError(f"{flag(dest)} must be at least {minimum}, got {value}")


def set_flags(args: argparse.Namespace, dests: Iterable[str]) -> list[str]:
    """Those of ``dests`` whose value is not the parser's default for this ``llmserve bench`` command: the flags
    the command line set (a flag given its default value is indistinguishable from one not given)."""
    from llmserve.entrypoints.cli import build_parser

    defaults = build_parser().parse_args(["bench", args.bench_command])
    return [dest for dest in dests if getattr(args, dest) != getattr(defaults, dest)]


def refuse_other_datasets_flags(args: argparse.Namespace, own_flags: Mapping[str, Iterable[str]]) -> None:
    """``own_flags``: each ``--dataset-name``'s own flags (dests). One of another dataset's that the command line
    set would do nothing with the chosen dataset, so it is refused."""
    owner = {dest: dataset for dataset, dests in own_flags.items() if dataset != args.dataset_name for dest in dests}
    for dest in set_flags(args, owner):
        raise ValueError(f"{flag(dest)} belongs to --dataset-name {owner[dest]}; it does nothing with "
                         f"--dataset-name {args.dataset_name}")
