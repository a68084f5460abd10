"""The consumer side of a BPF ring buffer (BPF_MAP_TYPE_RINGBUF), read through mmap.

The kernel lays a ring buffer out as three mappings of the map's fd: the consumer page (offset 0, the
reader's position, writable), the producer page (offset one page, the writer's position) and the data
pages, mapped twice in a row so a record that wraps around the end reads as one contiguous slice. Each
record is an 8-byte header (u32 length with a BUSY bit while the producer is still writing it and a
DISCARD bit, u32 page offset) followed by the payload, padded to 8 bytes. Reading is: load the producer
position, walk the committed records from the consumer position, store the new consumer position.

Why not libbpf's ring_buffer__poll() or BCC's ring_buffer_poll(): both deliver records through a C
callback, and a ctypes callback needs a writable+executable trampoline, which natd.service forbids
(MemoryDenyWriteExecute=yes). This reader needs no callback and no wake-ups: natd's datapath submits with
BPF_RB_NO_WAKEUP and natd drains the ring on a timer (natd.events), so :meth:`RingBuffer.read` never
blocks and there is nothing to poll.

One consumer at a time: the consumer position lives in the map, so two readers would each see part of the
records. natd is the only reader of nat_events; natctl -E gets events from natd (natd.events).

Memory ordering: positions are read and written as single aligned 8-byte loads and stores (ctypes), and a
record is read only after its header shows it committed (the kernel clears BUSY with a release store).
x86-64 keeps loads in order; on weakly ordered CPUs the Python code between the header load and the
payload copy is the only barrier (libbpf uses an acquire load there).
"""

from __future__ import annotations

import ctypes
import mmap
import os

import numpy as np

from natd import bpfsys
from natd.errors import StateError

__all__ = ["BPF_MAP_TYPE_RINGBUF", "RingBuffer"]

BPF_MAP_TYPE_RINGBUF = 27
_BUSY = 1 << 31
_DISCARD = 1 << 30
_HDR = 8


class RingBuffer:
    """A BPF ring buffer map's fd, mapped for reading. :meth:`read` returns committed records' payloads."""

    def __init__(self, fd: int, size: int, name: str = "ring buffer") -> None:
        if size <= 0 or size & (size - 1) or size % mmap.PAGESIZE:
            raise ValueError(f"{name}: a ring buffer's size is a power of 2 and a multiple of the page size "
                             f"({mmap.PAGESIZE}), got {size}")
        self.name = name
        self.size = size
        self._fd = fd
        page = mmap.PAGESIZE
        self._consumer_map = mmap.mmap(fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._data_map = mmap.mmap(fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        # Positions are aligned u64s, loaded and stored in one access through ctypes (struct would copy
        # them byte by byte). The producer page is mapped read-only, which ctypes.from_buffer() refuses:
        # the numpy view holds the mapping's buffer (mmap.close() raises while it lives), ctypes reads
        # through its address.
        self._consumer = ctypes.c_uint64.from_buffer(self._consumer_map)
        self._producer_view = np.frombuffer(self._data_map, dtype=np.uint64, count=1)
        self._producer = ctypes.c_uint64.from_address(self._producer_view.ctypes.data)
        self._data = memoryview(self._data_map)
        self._base = page  # the data pages start after the producer page
        self._mask = size - 1

    @classmethod
    def open_pinned(cls, path: str) -> RingBuffer:
        """The ring buffer pinned at path (StateError when there is none, or it is another kind of map)."""
        fd = bpfsys.obj_get(path)
        try:
            info = bpfsys.BpfMap(fd, os.path.basename(path)).info
            if info.type != BPF_MAP_TYPE_RINGBUF:
                raise StateError(f"{path} is a BPF map of type {info.type}, not a ring buffer "
                                 f"({BPF_MAP_TYPE_RINGBUF}); remove the stale pin or restart natd")
            return cls(fd, info.max_entries, path)
        except BaseException:
            os.close(fd)
            raise

    @property
    def consumer_pos(self) -> int:
        return int(self._consumer.value)

    @property
    def producer_pos(self) -> int:
        return int(self._producer.value)

    def pending_bytes(self) -> int:
        """Bytes of records (committed or still being written) the reader has not consumed."""
        return self.producer_pos - self.consumer_pos

    def read(self, limit: int = 4096) -> list[bytes]:
        """Up to ``limit`` committed records' payloads, oldest first (discarded ones are skipped), and
        consumes them. Stops early at a record the producer is still writing."""
        out: list[bytes] = []
        cons = self.consumer_pos
        prod = self.producer_pos
        data, base, mask = self._data, self._base, self._mask
        start = cons
        while cons < prod and len(out) < limit:
            at = base + (cons & mask)
            header = int.from_bytes(data[at:at + 4], "little")
            if header & _BUSY:
                break
            length = header & ~(_BUSY | _DISCARD)
            if not header & _DISCARD:
                out.append(bytes(data[at + _HDR:at + _HDR + length]))
            cons += (length + _HDR + 7) & ~7
        if cons != start:
            self._consumer.value = cons
        return out

    def skip(self) -> int:
        """Consume every committed record without copying it; returns how many bytes were skipped."""
        cons = start = self.consumer_pos
        prod = self.producer_pos
        data, base, mask = self._data, self._base, self._mask
        while cons < prod:
            at = base + (cons & mask)
            header = int.from_bytes(data[at:at + 4], "little")
            if header & _BUSY:
                break
            cons += ((header & ~(_BUSY | _DISCARD)) + _HDR + 7) & ~7
        if cons != start:
            self._consumer.value = cons
        return cons - start

    def close(self) -> None:
        """Unmap and close the fd. Safe to call twice."""
        if self._fd < 0:
            return
        del self._consumer, self._producer, self._producer_view
        self._data.release()
        self._consumer_map.close()
        self._data_map.close()
        os.close(self._fd)
        self._fd = -1

    def __enter__(self) -> RingBuffer:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
