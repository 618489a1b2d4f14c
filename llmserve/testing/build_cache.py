"""Build a generated model folder once and reuse it: a stamp file names what was built (family, size, seed,
format version...), so a later call with the same stamp returns the folder at once and another stamp
rebuilds it."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable

STAMP_FILE = ".llmserve-checkpoint.json"


def write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _read_stamp(path: Path) -> dict | None:
    try:
        return json.loads((path / STAMP_FILE).read_text())
    except (OSError, ValueError):
        return None


def build_once(final: Path, stamp: dict, build: Callable[[Path], object]) -> Path:
    """``final``, built by ``build(folder)`` unless it already holds a checkpoint stamped ``stamp``.

    The checkpoint is built in a temporary folder next to ``final``, stamped last and renamed into place, so
    an interrupted build never leaves a half-written checkpoint that looks finished. A folder with another
    stamp (an older format version, other arguments) is replaced.
    """
    if _read_stamp(final) == stamp:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        build(tmp)
        write_json(tmp / STAMP_FILE, stamp)
        if final.exists():
            if _read_stamp(final) == stamp:  # another process won the race
                shutil.rmtree(tmp)
                return final
            old = final.parent / f".old-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if _read_stamp(final) != stamp:
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process won the race
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
