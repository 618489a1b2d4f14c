"""Builds the hand-written CPU kernels (``layers/csrc/*.c``) for this machine.

The C sources are compiled with the system C compiler (``$CC``, else ``cc``/``gcc``) as
``-O3 -march=native -fopenmp`` into ``cache_dir()/kernels/<hash>/`` (the hash covers the sources,
the flags, the compiler and the CPU), once per machine; later processes load the cached library. The
OpenMP runtime is the one PyTorch already loaded (same ``libgomp.so.1``), so the kernels share its
threads.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from llmserve.config import cache_dir

logger = logging.getLogger(__name__)

SOURCES = ("cpu_linear.c", "cpu_bf16_linear.c", "cpu_bf16_amx.c", "cpu_quant_linear.c", "cpu_w8a8_linear.c", "cpu_group_int8_linear.c",
           "cpu_group_int8_quantize.c", "cpu_attention.c", "cpu_layer_ops.c", "cpu_sampling.c", "cpu_lora.c", "cpu_grouped_linear.c",
           "cpu_moe_rows.c", "cpu_decode_layers.c")
HEADERS = ("cpu_vec.h", "cpu_group_int8.h", "cpu_group_int8_vnni.h", "cpu_group_int8_avx2.h", "cpu_sampling.h")
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11")
_SRC_DIR = Path(__file__).parent / "csrc"


class CPUKernelsUnavailable(RuntimeError):
    """The kernels could not be built or loaded here (the message says why)."""


def _compiler() -> str:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    raise CPUKernelsUnavailable("no C compiler found (set CC, or install gcc)")


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU model and its feature flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    keys = ("model name", "flags", "Features", "CPU part")
    return "\n".join(sorted({line.strip() for line in info.splitlines() if line.split(":")[0].strip() in keys}))


def build_library(extra_cflags: tuple[str, ...] = ()) -> Path:
    """Compile the sources (unless a build for this exact input is cached) and return the library.
    ``extra_cflags`` follow ``-march=native`` (``-mno-avx512bf16`` builds the paths of CPUs without it)."""
    cc = _compiler()
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise CPUKernelsUnavailable(f"cannot run the C compiler {cc!r}: {exc}") from exc
    digest = hashlib.sha256()
    for part in (version, " ".join(CFLAGS + extra_cflags), platform.machine(), _cpu_signature(),
                 *((_SRC_DIR / name).read_text() for name in SOURCES + HEADERS)):
        digest.update(part.encode())
        digest.update(b"\0")
    out_dir = cache_dir() / "kernels" / digest.hexdigest()[:16]
    library = out_dir / "libllmserve_cpu.so"
    if library.exists():
        return library
    out_dir.mkdir(parents=True, exist_ok=True)
    # One builder at a time (ranks of one server, test workers): the others wait and load its library rather than
    # each running a compiler per source on the same cores.
    with open(out_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if library.exists():
            return library
        fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=out_dir)
        os.close(fd)
        try:
            compile_library(cc, CFLAGS + extra_cflags, Path(tmp))
            os.replace(tmp, library)   # atomic: a reader never sees a partial file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    logger.info("Compiled the CPU kernels into %s", library)
    return library


def compile_library(cc: str, cflags: tuple[str, ...], output: Path) -> None:
    """Compile every source to an object file, all at once (one compiler per core: a first start on a
    machine waits for the slowest file, not the sum), then link them into ``output``."""
    compile_flags = tuple(f for f in cflags if f != "-shared")
    with tempfile.TemporaryDirectory(prefix="llmserve-kernels-") as objects:
        commands = [[cc, *compile_flags, "-c", str(_SRC_DIR / name), "-o", str(Path(objects) / f"{name}.o")]
                    for name in SOURCES]
        running: list[tuple[list[str], subprocess.Popen]] = []
        failures: list[str] = []
        for command in commands:
            while len(running) >= (os.cpu_count() or 1):
                failures += _finish(*running.pop(0))
            running.append((command, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                      text=True)))
        for command, process in running:
            failures += _finish(command, process)
        if failures:
            raise CPUKernelsUnavailable("compiling the CPU kernels failed:\n" + "\n".join(failures))
        link = [cc, *cflags, *(command[-1] for command in commands), "-o", str(output), "-lm"]
        done = subprocess.run(link, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise CPUKernelsUnavailable(f"linking the CPU kernels failed ({' '.join(link)}):\n{done.stderr}")


def _finish(command: list[str], process: subprocess.Popen) -> list[str]:
    """Wait for one compiler; its failure as text (none: an empty list)."""
    try:
        _, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        return [f"{' '.join(command)}: timed out"]
    return [f"{' '.join(command)}:\n{stderr}"] if process.returncode != 0 else []
