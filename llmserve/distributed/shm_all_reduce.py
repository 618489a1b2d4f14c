"""All-reduce and all-gather through POSIX shared memory, for the CPU ranks of one group on one machine.

Gloo on one machine goes through TCP loopback: every call pays system calls, socket copies and a
rendezvous of its own. Here the ranks of a group share one segment in ``/dev/shm`` and meet on
counters in it; nothing enters the kernel on the fast path.

Set-up (:meth:`ShmCommunicator.create`, a collective over the group's gloo group): the ranks exchange
host name, boot id and pid; if all are on this machine (and on x86-64, see below) group rank 0 creates
the segment with ``posix_fallocate`` (a small ``/dev/shm``, e.g. a container's 64 MiB, then fails here
with ``ENOSPC``, and rank 0 halves the slots down to :data:`MIN_BYTES`, rather than ``SIGBUS`` mid-step),
the others open it by the name it gathers to them, and once every rank has reported back rank 0 unlinks
it: the mappings stay valid, and no segment is left in ``/dev/shm`` whatever happens to the workers
later. Any failure, on any rank, leaves the whole group on gloo.

Layout: one 64-byte line per rank holding that rank's sequence counter (its flag), one more line for the
group's abort word, padded to a page, then ``2 x world_size`` data slots of :data:`MAX_BYTES` each (less
where ``/dev/shm`` is small): ``slot[parity][rank]``. A tensor larger than a slot goes through in
slot-sized pieces of its flat storage, one collective call each.

One collective (call number ``seq``, counted from 1, the same on every rank because every rank makes
the same calls): each rank copies its tensor into ``slot[seq % 2][rank]``, stores ``seq`` in its flag,
and waits until every flag is at least ``seq``; then it reads all the ``seq % 2`` slots. One flag phase
suffices because slots alternate with the parity of ``seq``: a rank that has seen every flag at
``seq`` may run ahead and write its ``seq + 1`` data, but into the other parity's slot, which nobody
reads for ``seq``; before it writes ``seq + 2`` into this parity again it must see every flag at
``seq + 1``, and a rank stores ``seq + 1`` only after it has finished reading ``seq``'s slots. So no
rank is ever more than one call ahead, and no slot is overwritten while being read.

Ordering: the data is written (a ``memmove``) before the flag store, and read after the flag load,
each in a separate C call. x86-64 keeps stores in order with stores and loads with
loads (TSO), so a rank that sees a flag sees the data before it; weaker memory models (Arm) would need
fences Python cannot issue, so there the group stays on gloo.

Sums: every rank adds the slots itself, in rank order (``slot 0 + slot 1 + ...``), with the same torch
ops, so every rank gets bitwise the same result (the TP ranks then stay in lockstep). float32 sums in
float32; bfloat16 and float16 with two ranks sum in their own dtype (torch rounds ``a + b`` computed
in float32, which is what gloo's sum does); with more ranks they accumulate in float32 and round
once, so they can differ from gloo (whose ring order is not rank order anyway) in the last bit, and
are no less accurate. Other dtypes go to gloo.

Waiting: ``os.sched_yield()`` between checks of the flags from the first miss (:data:`SPIN_CHECKS`
pure checks first, none by default): with as many ranks as cores, or more, a rank that spins keeps a
descheduled peer, or the engine process, from running, and measured on a 2-core machine even a few
thousand pure checks before yielding cost far more on average than they save; with nothing else to
run the yield returns at once. After :data:`SLEEP_AFTER_S` of waiting, a 50 us sleep between checks
(a long wait then costs no core). A wait that outlasts :data:`TIMEOUT_S`, or whose peer process is
gone, raises ``RuntimeError``.

Aborting a step: a rank whose step fails between collectives (say, in its own LM-head shard) never makes
the calls its peers are waiting in. It stores a new generation in the abort word (:meth:`abort`); every
wait checks that word while it waits and raises :class:`CollectiveAbortedError`, so the whole group
drops the step instead of hanging. Before the next step every rank calls :meth:`recover` (a gloo barrier,
counters back to zero, the new generation taken, a second barrier), so the counters agree again however
many calls each rank had made.

Use (:class:`~llmserve.distributed.parallel_state.GroupCoordinator`): a contiguous CPU tensor (of a
summable dtype, for a reduction) goes through the segment, anything else through gloo; the choice
depends only on the tensor's dtype and layout, which every rank's call has the same, so all ranks take
the same path. :data:`MAX_BYTES`: measured with ``python -m
llmserve.benchmarks.collectives`` (2 ranks, float32, 1 KiB to 64 MiB), the shared-memory path beat gloo
at every size, by far where gloo's fixed cost per call dominates (up to a few hundred KiB) and by a
smaller factor where both are bound by memory bandwidth; so the limit is set by the segment's memory
(``2 x world_size x MAX_BYTES`` of ``/dev/shm``, committed): 8 MiB covers every decode step's all-reduce
(a batch of 512 tokens of hidden size 4096 in float32) and the LM head's all-gather of small batches
in one call, while larger tensors come from prefill chunks whose compute dwarfs the extra calls. Setting
``LLMSERVE_SHM_ALL_REDUCE=0`` keeps every group on gloo.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import mmap
import os
import platform
import secrets
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

SHM_ALL_REDUCE_ENV = "LLMSERVE_SHM_ALL_REDUCE"
SHM_DIR = Path("/dev/shm")
MAX_BYTES = 8 << 20          # per rank's tensor; also the size of one slot (see the module docstring)
MIN_BYTES = 64 << 10         # smallest slot worth a segment, where /dev/shm is short of space
SPIN_CHECKS = 0              # flag checks before the first sched_yield (see Waiting above)
SLEEP_AFTER_S = 0.01         # after this long waiting, sleep between checks
SLEEP_S = 50e-6
TIMEOUT_S = 600.0            # a wait this long means a peer is stuck
REDUCE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_LINE = 64                   # one cache line per flag: ranks never write the same line
_PAGE = 4096
_VIEW_CACHE_LIMIT = 64


class CollectiveAbortedError(RuntimeError):
    """Another rank of the group failed this step and aborted its collectives."""


def _header_bytes(world_size: int) -> int:
    """The flag lines of every rank and the abort word's line, padded to a page."""
    return -(-(world_size + 1) * _LINE // _PAGE) * _PAGE


def all_gather_json(value: object, group: object, world_size: int) -> list:
    """Every rank's ``value`` (JSON-able), as uint8 tensors: torch.distributed's ``all_gather_object``
    would pickle over the group's sockets, and nothing llmserve reads from a socket is unpickled."""
    data = torch.frombuffer(bytearray(json.dumps(value).encode()), dtype=torch.uint8)
    lengths = [torch.zeros(1, dtype=torch.int64) for _ in range(world_size)]
    dist.all_gather(lengths, torch.tensor([data.numel()]), group=group)
    longest = int(max(length.item() for length in lengths))
    padded = torch.zeros(longest, dtype=torch.uint8)
    padded[:data.numel()] = data
    gathered = [torch.empty(longest, dtype=torch.uint8) for _ in range(world_size)]
    dist.all_gather(gathered, padded, group=group)
    return [json.loads(t[:int(n.item())].numpy().tobytes()) for t, n in zip(gathered, lengths)]


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _supported_here() -> bool:
    if os.environ.get(SHM_ALL_REDUCE_ENV, "1").strip().lower() in ("0", "false", "off", "no"):
        return False
    return platform.machine().lower() in ("x86_64", "amd64") and SHM_DIR.is_dir()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ShmCommunicator:
    """The shared segment of one group, as seen by one rank (see the module docstring)."""

    def __init__(self, rank: int, world_size: int, mm: mmap.mmap, slot_bytes: int, name: str,
                 peer_pids: list[int]) -> None:
        self.rank = rank
        self.world_size = world_size
        self.name = name
        self.max_bytes = slot_bytes
        self._mm = mm
        self._header_bytes = _header_bytes(world_size)
        self._slot_bytes = slot_bytes
        self._flags_raw = memoryview(mm)
        self._flags = self._flags_raw[:self._header_bytes].cast("Q")
        self._stride = _LINE // 8
        self._own_flag = rank * self._stride
        self._peer_flags = [r * self._stride for r in range(world_size) if r != rank]
        self._abort_word = world_size * self._stride
        self._generation = 0   # the abort word's value as of the last recover()
        self._peer_pids = peer_pids
        # torch.frombuffer holds no export of the mapping: every tensor over it is ours, dropped in close()
        self._bytes = torch.frombuffer(mm, dtype=torch.uint8)
        self._base = self._bytes.data_ptr()
        self._views: dict[tuple, list[torch.Tensor]] = {}
        self._seq = 0
        self.closed = False

    # ------------------------------------------------------------------ set-up and tear-down
    @classmethod
    def create(cls, group, rank: int, world_size: int, max_bytes: int = MAX_BYTES) -> ShmCommunicator | None:
        """Collective over ``group`` (every member calls it): the communicator, or ``None`` on every rank
        where the group cannot use shared memory (not all on this machine, disabled, no space)."""
        if world_size < 2:
            return None
        me = (socket.gethostname(), _boot_id(), _supported_here(), os.getpid())
        infos = all_gather_json(me, group, world_size)
        if not all(info[2] for info in infos) or len({(info[0], info[1]) for info in infos}) != 1:
            return None
        header = _header_bytes(world_size)
        slot_bytes = -(-max_bytes // _PAGE) * _PAGE
        name, path, mm, error = "", None, None, ""
        if rank == 0:
            name = f"llmserve-allreduce-{os.getpid()}-{secrets.token_hex(6)}"
            path = SHM_DIR / name
            while True:   # a small /dev/shm (a container's): smaller slots, down to MIN_BYTES
                try:
                    mm = cls._map(path, header + 2 * world_size * slot_bytes, create=True)
                    break
                except OSError as exc:
                    if exc.errno == errno.ENOSPC and slot_bytes > MIN_BYTES:
                        slot_bytes //= 2
                        continue
                    error = f"cannot create a segment in {SHM_DIR}: {exc}"
                    name = ""
                    break
            if mm is not None and slot_bytes < max_bytes:
                logger.info("shared-memory all-reduce: %s is small, tensors up to %d KiB only",
                            SHM_DIR, slot_bytes >> 10)
        names = all_gather_json((name, slot_bytes), group, world_size)
        name, slot_bytes = names[0]
        size = header + 2 * world_size * slot_bytes
        if rank != 0 and name:
            try:
                mm = cls._map(SHM_DIR / name, size, create=False)
            except OSError as exc:
                error = f"cannot open {name} in {SHM_DIR}: {exc}"
        errors: list = []
        try:
            errors = all_gather_json(error, group, world_size)   # every rank has it open, or has failed
        finally:
            if path is not None:
                path.unlink(missing_ok=True)   # the mappings stay valid; nothing is left behind
        dist.barrier(group=group)   # on every rank, once this returns, the name is gone from SHM_DIR
        failed = [e for e in errors if e] or ([] if name else ["no segment"])
        if failed:
            if mm is not None:
                mm.close()
            if rank == 0:
                logger.warning("all-reduce stays on gloo: %s", "; ".join(failed))
            return None
        pids = [info[3] for r, info in enumerate(infos) if r != rank]
        if not all(_pid_alive(pid) for pid in pids):
            pids = []   # another pid namespace: the peers cannot be watched, only timed out
        return cls(rank, world_size, mm, slot_bytes, name, pids)

    @staticmethod
    def _map(path: Path, size: int, create: bool) -> mmap.mmap:
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.posix_fallocate(fd, 0, size)   # ENOSPC now rather than SIGBUS on first touch
            elif os.fstat(fd).st_size != size:
                raise OSError(f"{path} has {os.fstat(fd).st_size} bytes, expected {size}")
            return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            if create:
                path.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)

    def close(self) -> None:
        """Unmap the segment (its name is long gone); the communicator must not be used again."""
        if self.closed:
            return
        self.closed = True
        self._views.clear()
        self._bytes = None
        self._flags.release()
        self._flags_raw.release()
        try:
            self._mm.close()
        except BufferError:   # a view still exported somewhere; the mapping goes with the process
            logger.debug("shared all-reduce segment %s left mapped", self.name)

    # ------------------------------------------------------------------ collectives
    def can_reduce(self, tensor: torch.Tensor) -> bool:
        return (tensor.is_cpu and tensor.dtype in REDUCE_DTYPES and tensor.is_contiguous()
                and not tensor.requires_grad and not self.closed)

    def can_gather(self, tensor: torch.Tensor) -> bool:
        return tensor.is_cpu and tensor.is_contiguous() and not self.closed

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the group, in place (the caller checked :meth:`can_reduce`)."""
        if tensor.is_inference() and not torch.is_inference_mode_enabled():
            with torch.inference_mode():   # an inference tensor is written in place only in that mode
                return self.all_reduce(tensor)
        for piece in self._pieces(tensor):
            self._sum(self._exchange(piece), piece)
        return tensor

    def _pieces(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """``tensor`` whole when it fits a slot, else slot-sized pieces of its flat storage."""
        if tensor.nbytes <= self.max_bytes:
            return [tensor]
        per_piece = self.max_bytes // tensor.element_size()
        return list(tensor.view(-1).split(per_piece))

    @staticmethod
    def _sum(views: list[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        if len(views) == 2:
            torch.add(views[0], views[1], out=out)
        elif out.dtype == torch.float32:
            torch.add(views[0], views[1], out=out)
            for view in views[2:]:
                out.add_(view)
        else:
            acc = views[0].float()
            for view in views[1:]:
                acc.add_(view)
            out.copy_(acc)
        return out

    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's ``tensor`` concatenated along ``dim``, in rank order (a new tensor)."""
        pieces = self._pieces(tensor)
        if len(pieces) == 1:
            return torch.cat(self._exchange(tensor), dim=dim)
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        start = 0
        for piece in pieces:
            for part, view in zip(parts, self._exchange(piece)):
                part.view(-1)[start:start + piece.numel()].copy_(view)
            start += piece.numel()
        return torch.cat(parts, dim=dim)

    def abort(self) -> None:
        """Make every peer's current or next wait raise :class:`CollectiveAbortedError` (this step failed here)."""
        if not self.closed:
            self._flags[self._abort_word] = self._generation + 1

    def recover(self, group) -> None:
        """Collective over ``group``, after a failed step: counters back to zero and the abort cleared on
        every rank, so the next step's calls line up whatever each rank had done."""
        dist.barrier(group=group)   # nobody is inside a collective of the failed step any more
        self._generation = self._flags[self._abort_word]
        self._seq = 0
        self._flags[self._own_flag] = 0
        dist.barrier(group=group)   # nobody starts the next step before every counter is reset

    def _exchange(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Publish ``tensor`` in this call's slot, wait for every rank's; their slots, shaped like it."""
        self._seq += 1
        seq, parity = self._seq, self._seq & 1
        nbytes = tensor.nbytes
        offset = self._header_bytes + (parity * self.world_size + self.rank) * self._slot_bytes
        if nbytes:
            ctypes.memmove(self._base + offset, tensor.data_ptr(), nbytes)
        self._flags[self._own_flag] = seq
        self._wait(seq)
        return self._slot_views(tensor.dtype, tensor.shape, parity, nbytes)

    def _slot_views(self, dtype: torch.dtype, shape: torch.Size, parity: int, nbytes: int) -> list[torch.Tensor]:
        key = (dtype, shape, parity)
        views = self._views.get(key)
        if views is None:
            if len(self._views) >= _VIEW_CACHE_LIMIT:
                self._views.clear()
            views = []
            with torch.inference_mode(False):   # plain tensors, usable in and out of inference mode
                for r in range(self.world_size):
                    start = self._header_bytes + (parity * self.world_size + r) * self._slot_bytes
                    views.append(self._bytes[start:start + nbytes].view(dtype).view(shape))
            self._views[key] = views
        return views

    def _wait(self, seq: int) -> None:
        flags, peers, abort_word, generation = self._flags, self._peer_flags, self._abort_word, self._generation
        checks, started, sleeping = 0, 0.0, False
        while True:
            for index in peers:
                if flags[index] < seq:
                    break
            else:
                return
            if flags[abort_word] != generation:
                raise CollectiveAbortedError("another tensor-parallel rank failed this step")
            checks += 1
            if checks <= SPIN_CHECKS:
                continue
            if checks & 63 == 0:
                now = time.monotonic()
                started = started or now
                if now - started > SLEEP_AFTER_S:
                    sleeping = True
                    if checks & 1023 == 0:
                        self._check_peers(now - started)
            if sleeping:
                time.sleep(SLEEP_S)
            else:
                os.sched_yield()

    def _check_peers(self, waited: float) -> None:
        dead = [pid for pid in self._peer_pids if not _pid_alive(pid)]
        if dead:
            raise RuntimeError(f"shared-memory collective: peer process(es) {dead} died")
        if waited > TIMEOUT_S:
            raise RuntimeError(f"shared-memory collective: waited {waited:.0f} s for the other ranks")
