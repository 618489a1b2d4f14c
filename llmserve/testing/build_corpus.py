"""Regenerate ``corpus/corpus.txt``, the text the test tokenizers are trained on.

Run ``python -m llmserve.testing.build_corpus`` to rebuild it.  The file is
committed, so this only needs to run when the corpus should change; tokenizers
are always trained from the committed file, never from a fresh run of this
script, so checkpoints do not depend on the local Python installation.

The corpus has two parts:

* a short multilingual section written for this project (accented Latin
  letters, Greek, Cyrillic, CJK, Hangul, emoji) so that tokenizers see
  multi-byte UTF-8 characters;
* English prose taken from the docstrings of CPython's standard library
  (Copyright (c) 2001 Python Software Foundation; All Rights Reserved; used
  and redistributed under the PSF License Agreement, see
  ``corpus/LICENSE-PSF.txt``).
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
import warnings
from pathlib import Path

CORPUS_PATH = Path(__file__).resolve().parent / "corpus" / "corpus.txt"

# Target size of the docstring part, in bytes of UTF-8.
DOCSTRING_BUDGET = 560_000

# Pure-Python standard library modules with plenty of English documentation,
# in a fixed order so the output is reproducible.
MODULES = [
    "argparse", "ast", "asyncio.base_events", "asyncio.events", "asyncio.futures",
    "asyncio.locks", "asyncio.queues", "asyncio.streams", "asyncio.subprocess",
    "asyncio.tasks", "base64", "bdb", "bisect", "calendar", "cmd", "codecs",
    "collections", "concurrent.futures._base", "configparser", "contextlib", "copy",
    "csv", "dataclasses", "difflib", "doctest", "email.message", "email.parser",
    "email.utils", "enum", "fileinput", "fnmatch", "fractions", "ftplib", "functools",
    "getopt", "gettext", "glob", "gzip", "heapq", "hmac", "html.parser", "http.client",
    "http.cookiejar", "http.cookies", "http.server", "imaplib", "inspect", "ipaddress",
    "json", "json.decoder", "json.encoder", "locale", "logging", "logging.handlers",
    "mailbox", "mimetypes", "multiprocessing.pool", "multiprocessing.managers",
    "numbers", "operator", "optparse", "os", "pathlib", "pdb", "pickle", "pickletools",
    "pkgutil", "platform", "plistlib", "poplib", "pprint", "pydoc", "queue", "quopri",
    "random", "re", "sched", "selectors", "shlex", "shutil", "smtplib", "socket",
    "socketserver", "statistics", "string", "subprocess", "symtable", "tabnanny",
    "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "trace",
    "traceback", "turtle", "typing", "unittest.case", "unittest.mock", "unittest.loader",
    "unittest.result", "urllib.parse", "urllib.request", "uuid", "warnings", "wave",
    "weakref", "xml.dom.minidom", "xml.etree.ElementTree", "xml.sax.handler",
    "zipfile", "zipimport", "_pydecimal", "_pydatetime", "_pyio", "_strptime",
    "_collections_abc", "importlib.metadata", "importlib.resources.abc", "sysconfig",
    "secrets", "graphlib", "stat", "colorsys", "contextvars", "dis", "filecmp",
    "ftplib", "netrc", "nturl2path", "pstats", "cProfile", "profile", "reprlib",
    "rlcompleter", "runpy", "site", "sndhdr", "ssl", "telnetlib", "tomllib._parser",
    "types", "webbrowser", "wsgiref.handlers", "wsgiref.simple_server", "xdrlib",
    "zoneinfo._zoneinfo", "code", "codeop", "compileall", "copyreg", "dbm",
    "modulefinder", "py_compile", "pyclbr", "shelve", "signal", "string",
]

MULTILINGUAL = """\
A few words in other languages and scripts.

Français : Le café est très chaud ce matin. L'élève a répondu à la question du
professeur, puis il a ouvert la fenêtre. Où est la bibliothèque ? Ça dépend.
Noël approche ; les enfants préparent des crêpes et une bûche glacée.

Deutsch: Die Straße ist schmal und die Bäume sind grün. Über den Flüssen
fliegen Vögel. Schöne Grüße aus München! Größe, Maß und Gewicht sind wichtig.

Español: El niño comió una manzana y bebió un zumo de piña. ¿Dónde está la
estación? ¡Qué día tan bonito! La canción habla del corazón y de la montaña.

Português: A informação está disponível na página seguinte. Não há razão para
preocupação. O avião decolou às três horas da manhã.

Italiano: Perché il caffè è così forte? Città, università e libertà.

Türkçe: Işık, güneş ve çiçek. Dağın üstünde küçük bir göl var.

Polski: Zażółć gęślą jaźń. Łódź jest dużym miastem w Polsce.

Tiếng Việt: Xin chào, tôi đang học tiếng Việt. Cảm ơn bạn rất nhiều.

Ελληνικά: Καλημέρα, τι κάνεις; Η θάλασσα είναι γαλάζια και ο ήλιος λάμπει.

Русский: Привет, как дела? Сегодня хорошая погода, и мы идём в парк.

Українська: Доброго ранку! Їжак їсть яблуко біля ґанку.

日本語: 今日はいい天気ですね。私は毎朝コーヒーを飲みます。東京の桜はとても美しいです。
ひらがな、カタカナ、そして漢字を使います。

中文：你好，世界！今天天气很好，我们去公园散步吧。学习编程需要耐心和练习。
计算机可以帮助我们解决很多问题。

한국어: 안녕하세요! 오늘은 날씨가 좋네요. 저는 한국 음식을 좋아합니다.

עברית: שלום עולם. العربية: مرحبا بالعالم. हिन्दी: नमस्ते दुनिया।

Symbols and emoji: café ☕, pizza 🍕, rocket 🚀, heart ❤️, thumbs up 👍🏽,
family 👨‍👩‍👧, flag 🇫🇷, star ⭐, snowman ☃, check ✓, arrows → ← ↑ ↓,
math ∑ ∫ √ ∞ ≤ ≥ ≠ ±, currency € £ ¥ ₹ ₩, degrees 25°C, fractions ½ ¾,
quotes “double” ‘single’ «guillemets», dashes – — and ellipsis …

"""

_DOCTEST_LINE = re.compile(r"^\s*(>>>|\.\.\.)")


def _clean(doc: str) -> str:
    text = inspect.cleandoc(doc)
    lines = [line.rstrip() for line in text.splitlines() if not _DOCTEST_LINE.match(line)]
    text = "\n".join(lines).strip()
    # Collapse runs of blank lines.
    return re.sub(r"\n{3,}", "\n\n", text)


def _docstrings(module) -> list[str]:
    out = []
    if module.__doc__:
        out.append(module.__doc__)
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj):
            if obj.__doc__:
                out.append(obj.__doc__)
            for mname, member in sorted(vars(obj).items()):
                if mname.startswith("_") and mname != "__init__":
                    continue
                member = getattr(member, "__func__", member)
                if inspect.isfunction(member) and member.__doc__:
                    out.append(member.__doc__)
        elif inspect.isfunction(obj) and obj.__doc__:
            out.append(obj.__doc__)
    return out


def build() -> str:
    seen: set[str] = set()
    parts: list[str] = []
    size = 0
    for name in dict.fromkeys(MODULES):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
        except Exception:
            continue
        for doc in _docstrings(module):
            text = _clean(doc)
            if len(text) < 80 or text in seen:
                continue
            seen.add(text)
            parts.append(text)
            size += len(text.encode("utf-8")) + 2
            if size >= DOCSTRING_BUDGET:
                break
        if size >= DOCSTRING_BUDGET:
            break
    return MULTILINGUAL + "\n\n".join(parts) + "\n"


def main() -> None:
    text = build()
    CORPUS_PATH.parent.mkdir(parents=True, exist_ok=True)
    CORPUS_PATH.write_text(text, encoding="utf-8")
    print(f"wrote {CORPUS_PATH} ({len(text.encode('utf-8'))} bytes, Python {sys.version.split()[0]})")


if __name__ == "__main__":
    main()
