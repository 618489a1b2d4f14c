"""Read a safetensors file tensor by tensor through ranged reads, without the file on local disk.

A safetensors file is an 8-byte little-endian header length, a JSON header (each tensor's dtype, shape and
``[begin, end)`` byte offsets into the data section) and the data section. Reading the header takes two small
reads; the tensors are then fetched as a few coalesced byte ranges (at most ``max_range_bytes`` each, a lone
larger tensor alone) and each range is consumed as a stream, one tensor at a time, so memory holds one tensor
whatever the file's size.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

import torch

# Byte range [start, stop) of the file -> a readable stream of exactly those bytes.
RangeReader = Callable[[int, int], BinaryIO]

DEFAULT_MAX_RANGE_BYTES = 64 * 2**20
_MAX_HEADER_BYTES = 100 * 2**20   # safetensors' own limit

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int   # absolute offsets in the file
    stop: int


def read_header(read_range: RangeReader, name: str) -> list[TensorEntry]:
    """The file's tensors in data order; ``name`` (the file's URL) is only for error messages."""
    (length,) = struct.unpack("<Q", _read_exactly(read_range(0, 8), 8, name))
    if length > _MAX_HEADER_BYTES:
        raise ValueError(f"{name} is not a safetensors file: its header claims {length} bytes")
    header = json.loads(_read_exactly(read_range(8, 8 + length), length, name))
    data_start = 8 + length
    entries = []
    for tensor_name, info in header.items():
        if tensor_name == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{name}: tensor {tensor_name} has dtype {info['dtype']}, which is not supported")
        begin, end = info["data_offsets"]
        entries.append(TensorEntry(tensor_name, _DTYPES[info["dtype"]], tuple(info["shape"]),
                                   data_start + begin, data_start + end))
    return sorted(entries, key=lambda e: e.start)


def coalesce(entries: list[TensorEntry], max_range_bytes: int) -> list[list[TensorEntry]]:
    """Group adjacent tensors into ranges of at most ``max_range_bytes`` (a larger tensor is a range alone)."""
    groups: list[list[TensorEntry]] = []
    for entry in entries:
        last = groups[-1] if groups else None
        if last and last[-1].stop == entry.start and entry.stop - last[0].start <= max_range_bytes:
            last.append(entry)
        else:
            groups.append([entry])
    return groups


def iterate_tensors(read_range: RangeReader, name: str,
                    max_range_bytes: int = DEFAULT_MAX_RANGE_BYTES) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every tensor of the file, one ranged read per coalesced group."""
    for group in coalesce(read_header(read_range, name), max_range_bytes):
        stream = read_range(group[0].start, group[-1].stop)
        try:
            for entry in group:
                data = _read_exactly(stream, entry.stop - entry.start, name)
                if not data:
                    yield entry.name, torch.empty(entry.shape, dtype=entry.dtype)
                    continue
                yield entry.name, torch.frombuffer(data, dtype=entry.dtype).reshape(entry.shape)
        finally:
            stream.close()


def _read_exactly(stream: BinaryIO, size: int, name: str) -> bytearray:
    """``size`` bytes of ``stream`` (a network stream may return fewer per read)."""
    buffer = bytearray(size)
    view = memoryview(buffer)
    filled = 0
    while filled < size:
        n = stream.readinto(view[filled:])
        if not n:
            raise ValueError(f"{name} ended early: expected {size} bytes, got {filled} (truncated file?)")
        filled += n
    return buffer
