"""matplotlib for the benchmarks' ``--plot``: an optional dependency, checked before a run so that a missing one
costs nothing, and always drawn off-screen."""

from __future__ import annotations

import importlib.util
from types import ModuleType


def require_matplotlib(what: str) -> None:
    """Raise a clear error now, before measuring, if ``what`` (a flag or command) cannot draw its plot."""
    if importlib.util.find_spec("matplotlib") is None:
        raise ValueError(f"{what} draws its plot with matplotlib: pip install matplotlib "
                         "(or pip install 'llmserve[bench]')")


def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` on the Agg backend (PNG files; no display needed)."""
    require_matplotlib("--plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
