"""``freeze_startup_heap``: what is garbage when it is called is collected, and everything alive then is out of
every later collection (the permanent generation), so per-token collections no longer walk the startup heap."""

from __future__ import annotations

import gc
import weakref

from llmserve.gc_heap import freeze_startup_heap


class Node:
    """A container object the collector tracks."""


def test_garbage_is_collected_and_what_lives_is_frozen():
    cycle = Node()
    cycle.self = cycle            # unreachable once deleted, but only the cyclic collector can free it
    gone = weakref.ref(cycle)
    del cycle
    kept = Node()
    try:
        freeze_startup_heap()
        assert gone() is None                                  # collected, not frozen with the rest
        assert gc.get_freeze_count() > 0
        assert not any(obj is kept for obj in gc.get_objects())   # frozen: in no generation a collection visits
        later = Node()
        assert any(obj is later for obj in gc.get_objects())    # what comes after is collected as before
    finally:
        gc.unfreeze()             # the rest of the test session keeps its usual collector
