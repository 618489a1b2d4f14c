"""Nothing the server reads from a socket or a pipe is unpickled, and no checkpoint is unpickled.

Unpickling runs code chosen by whoever wrote the bytes, so every boundary carries plain values: msgpack
structs between the front end, the engine core and the workers (``send_bytes`` / ``recv_bytes``),
tensors through torch.distributed into preallocated buffers, safetensors or GGUF for weights. This scans
the package's source for the ways pickle gets in:

* importing pickle or a relative (``cloudpickle``, ``dill``, ``marshal``, ``shelve``, ``joblib``);
* ``Connection.send(obj)`` / ``Connection.recv()`` (multiprocessing pickles them) — one argument to
  ``send``, none to ``recv``; the tensor transfers take a tensor and a rank;
* torch.distributed's ``*_object*`` collectives, ``multiprocessing`` queues and managers;
* ``torch.load`` without ``weights_only=True``, ``numpy.load`` with ``allow_pickle=True``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import llmserve

PICKLING_MODULES = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "marshal", "shelve", "joblib"}
OBJECT_COLLECTIVES = {"send_object_list", "recv_object_list", "broadcast_object_list", "all_gather_object",
                      "gather_object", "scatter_object_list"}
PICKLING_FACTORIES = {"Queue", "JoinableQueue", "Manager", "SimpleQueue"}   # on multiprocessing / a context


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _offences(tree: ast.AST) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, f"import {a.name}") for a in node.names if a.name.split(".")[0] in PICKLING_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLING_MODULES:
            found.append((node.lineno, f"from {node.module} import ..."))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            attr, owner = node.func.attr, node.func.value
            owner_name = owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", "")
            positional = len(node.args) + len([k for k in node.keywords if k.arg is None])
            if attr == "recv" and positional == 0 and not node.keywords:
                found.append((node.lineno, "Connection.recv() unpickles"))
            elif attr == "send" and positional == 1 and not node.keywords:
                found.append((node.lineno, "Connection.send(obj) pickles"))
            elif attr in OBJECT_COLLECTIVES:
                found.append((node.lineno, f"{attr} pickles"))
            elif attr in PICKLING_FACTORIES and owner_name in ("multiprocessing", "mp", "ctx", "context"):
                found.append((node.lineno, f"multiprocessing {attr} pickles"))
            elif attr == "load" and owner_name == "torch":
                weights_only = _keyword(node, "weights_only")
                if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                    found.append((node.lineno, "torch.load without weights_only=True"))
            elif attr == "load" and owner_name in ("np", "numpy"):
                allow = _keyword(node, "allow_pickle")
                if isinstance(allow, ast.Constant) and allow.value is True:
                    found.append((node.lineno, "numpy.load(allow_pickle=True)"))
    return found


def test_the_package_never_unpickles():
    root = Path(llmserve.__file__).parent
    offences = [f"{path.relative_to(root.parent)}:{line}: {what}"
                for path in sorted(root.rglob("*.py"))
                for line, what in _offences(ast.parse(path.read_text(), str(path)))]
    assert offences == []


def test_the_scan_finds_each_way_in():
    source = """
import pickle
from cloudpickle import dumps
conn.recv()
conn.send({"a": 1})
dist.broadcast_object_list(objs, src=0)
q = ctx.Queue()
torch.load(path)
np.load(path, allow_pickle=True)
pp.recv(tensor, 0)
pp.send(tensor, 1)
torch.load(path, weights_only=True)
conn.send_bytes(payload)
"""
    assert [line for line, _ in _offences(ast.parse(source))] == [2, 3, 4, 5, 6, 7, 8, 9]
