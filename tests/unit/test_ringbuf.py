"""natd.ringbuf.RingBuffer on a regular file laid out like a BPF ring buffer's mappings.

The kernel maps the data pages twice in a row; a file cannot, so the tests write the second copy
themselves (what a record that wraps around the end looks like to the reader).
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from natd.ringbuf import RingBuffer

pytestmark = pytest.mark.unit

PAGE = mmap.PAGESIZE
SIZE = 2 * PAGE
BUSY, DISCARD = 1 << 31, 1 << 30


class FakeRing:
    """The file behind a RingBuffer: consumer page, producer page, data, data again."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.write_bytes(bytes(2 * PAGE + 2 * SIZE))
        self.prod = 0

    def _write(self, offset: int, data: bytes) -> None:
        with open(self.path, "r+b") as fh:
            fh.seek(offset)
            fh.write(data)

    def put(self, payload: bytes, flags: int = 0) -> int:
        """Append a record at the producer position (and its mirror); returns where it starts."""
        at = self.prod
        record = struct.pack("<II", len(payload) | flags, 0) + payload
        record += bytes(-len(record) % 8)
        for base in (2 * PAGE, 2 * PAGE + SIZE):  # data, then the second mapping of it
            start = at % SIZE
            first = record[:SIZE - start]
            self._write(base + start, first)
            if len(first) < len(record):  # wraps: the rest goes to the start of the data pages
                self._write(base, record[len(first):])
                self._write(2 * PAGE + SIZE, record[len(first):])
        self.prod += len(record)
        self._write(PAGE, struct.pack("<Q", self.prod))
        return at

    def set_header(self, at: int, header: int) -> None:
        for base in (2 * PAGE, 2 * PAGE + SIZE):
            self._write(base + at % SIZE, struct.pack("<I", header))

    def consumer(self) -> int:
        return int(struct.unpack("<Q", self.path.read_bytes()[:8])[0])

    def set_consumer(self, pos: int) -> None:
        self._write(0, struct.pack("<Q", pos))


@pytest.fixture
def fake(tmp_path: Path) -> FakeRing:
    return FakeRing(tmp_path / "ring")


@pytest.fixture
def ring(fake: FakeRing) -> Iterator[RingBuffer]:
    fd = os.open(fake.path, os.O_RDWR)
    rb = RingBuffer(fd, SIZE, "test ring")
    yield rb
    rb.close()


def test_reads_committed_records_in_order_and_moves_the_consumer(fake: FakeRing, ring: RingBuffer) -> None:
    fake.put(b"one")
    fake.put(b"second record")
    assert ring.pending_bytes() == 16 + 24
    assert ring.read() == [b"one", b"second record"]
    assert fake.consumer() == ring.consumer_pos == 40
    assert ring.read() == []


def test_limit_leaves_the_rest_for_the_next_read(fake: FakeRing, ring: RingBuffer) -> None:
    for i in range(5):
        fake.put(bytes([i]) * 8)
    assert ring.read(limit=2) == [b"\0" * 8, b"\1" * 8]
    assert ring.read() == [bytes([i]) * 8 for i in (2, 3, 4)]


def test_stops_at_a_record_being_written_and_skips_discarded_ones(fake: FakeRing, ring: RingBuffer) -> None:
    fake.put(b"a")
    fake.put(b"gone", DISCARD)
    busy = fake.put(b"busy")
    fake.put(b"after")
    fake.set_header(busy, 4 | BUSY)
    assert ring.read() == [b"a"]
    assert ring.consumer_pos == busy
    fake.set_header(busy, 4)  # committed now
    assert ring.read() == [b"busy", b"after"]


def test_a_record_that_wraps_reads_whole(fake: FakeRing, ring: RingBuffer) -> None:
    fake.prod = SIZE - 16
    fake.set_consumer(SIZE - 16)
    fake._write(PAGE, struct.pack("<Q", fake.prod))
    payload = bytes(range(32))
    fake.put(payload)
    assert ring.read() == [payload]
    assert ring.consumer_pos == SIZE - 16 + 40


def test_skip_consumes_without_copying(fake: FakeRing, ring: RingBuffer) -> None:
    fake.put(b"x" * 32)
    fake.put(b"y" * 32)
    assert ring.skip() == 80
    assert ring.pending_bytes() == 0
    assert fake.consumer() == 80


def test_size_must_be_a_power_of_two_pages(fake: FakeRing) -> None:
    fd = os.open(fake.path, os.O_RDWR)
    try:
        with pytest.raises(ValueError, match="power of 2 and a multiple of the page size"):
            RingBuffer(fd, 3 * PAGE)
    finally:
        os.close(fd)


def test_close_twice(fake: FakeRing) -> None:
    rb = RingBuffer(os.open(fake.path, os.O_RDWR), SIZE)
    rb.close()
    rb.close()
