"""Raw BPF syscalls through the system libbpf (libbpf.so.1) with ctypes.

BCC compiles and loads the program; everything after that (pinned maps, natctl, the reaper's batch
sweeps, BPF_PROG_TEST_RUN in tests) goes through this small, dependency-free layer, so natctl works
without compiling anything and while natd is down.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache

from natd.errors import BpfError, LayoutMismatchError, StateError

BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2

BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_LPM_TRIE = 11
_PERCPU_TYPES = {5, 6, 10}  # percpu hash, percpu array, lru percpu hash
BATCH_CHUNK = 8192  # entries per batch syscall (see BpfMap.lookup_batch_raw)


class _BatchOpts(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t), ("elem_flags", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


class _TestRunOpts(ctypes.Structure):
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("data_in", ctypes.c_void_p),
        ("data_out", ctypes.c_void_p),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_void_p),
        ("ctx_out", ctypes.c_void_p),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("repeat", ctypes.c_int),
        ("duration", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    ]


class _MapInfo(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
        ("pad", ctypes.c_uint8 * 64),
    ]


@cache
def _lib() -> ctypes.CDLL:
    name = ctypes.util.find_library("bpf") or "libbpf.so.1"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as exc:
        raise BpfError(f"cannot load {name}: {exc}; install Debian's libbpf1 (make setup does)") from exc
    vp, cp, u32p = ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_uint32)
    sigs: dict[str, list[object]] = {
        "bpf_obj_get": [cp],
        "bpf_obj_pin": [ctypes.c_int, cp],
        "bpf_map_lookup_elem": [ctypes.c_int, vp, vp],
        "bpf_map_update_elem": [ctypes.c_int, vp, vp, ctypes.c_uint64],
        "bpf_map_delete_elem": [ctypes.c_int, vp],
        "bpf_map_get_next_key": [ctypes.c_int, vp, vp],
        "bpf_map_lookup_batch": [ctypes.c_int, vp, vp, vp, vp, u32p, ctypes.POINTER(_BatchOpts)],
        "bpf_map_delete_batch": [ctypes.c_int, vp, u32p, ctypes.POINTER(_BatchOpts)],
        "bpf_map_update_batch": [ctypes.c_int, vp, vp, u32p, ctypes.POINTER(_BatchOpts)],
        "bpf_obj_get_info_by_fd": [ctypes.c_int, vp, u32p],
        "bpf_prog_test_run_opts": [ctypes.c_int, ctypes.POINTER(_TestRunOpts)],
        "bpf_map_create": [ctypes.c_int, cp, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32, vp],
    }
    for fname, argtypes in sigs.items():
        fn = getattr(lib, fname)
        fn.argtypes = argtypes
        fn.restype = ctypes.c_int
    return lib


def _check(rc: int, what: str) -> int:
    if rc < 0:
        err = -rc
        raise BpfError(f"{what}: {os.strerror(err)} (errno {err})")
    return rc


@cache
def possible_cpus(path: str = "/sys/devices/system/cpu/possible") -> int:
    """Per-CPU map values carry one slot per *possible* CPU ("0-1" -> 2)."""
    count = 0
    with open(path) as fh:
        for part in fh.read().strip().split(","):
            lo, _, hi = part.partition("-")
            count += (int(hi) if hi else int(lo)) - int(lo) + 1
    return count


@dataclass(frozen=True)
class MapInfo:
    type: int
    id: int
    key_size: int
    value_size: int
    max_entries: int
    name: str


class BpfMap:
    """One BPF map by file descriptor. Keys and values are bytes; callers (de)serialise with natd.maps."""

    def __init__(self, fd: int, name: str = "") -> None:
        self.fd = fd
        self.info = self._info()
        self.name = name or self.info.name
        self.percpu = self.info.type in _PERCPU_TYPES
        # per-CPU values are rounded up to 8 bytes per CPU
        self.value_bytes = (
            ((self.info.value_size + 7) // 8) * 8 * possible_cpus() if self.percpu else self.info.value_size
        )
        self._batch_hint = 0  # entries the last lookup_batch_raw() found: sizes the next one's buffers

    @classmethod
    def create(cls, map_type: int, key_size: int, value_size: int, max_entries: int,
               name: str = "") -> BpfMap:
        """A new map (BPF_MAP_CREATE without options: a preallocated hash is what BCC's BPF_TABLE makes).
        For benchmarks and tests: natd's own maps come from the datapath's source, see natd.loader."""
        fd = _lib().bpf_map_create(map_type, name.encode()[:15] or None, key_size, value_size, max_entries,
                                   None)
        if fd < 0:
            err = ctypes.get_errno() or -fd
            raise BpfError(f"creating a map ({map_type=}, {key_size=}, {value_size=}, {max_entries=}): "
                           f"{os.strerror(err)} (errno {err})")
        return cls(fd, name)

    def pin(self, path: str) -> None:
        obj_pin(self.fd, path)

    @classmethod
    def open_pinned(cls, path: str) -> BpfMap:
        fd = _lib().bpf_obj_get(os.fsencode(path))
        if fd < 0:
            err = ctypes.get_errno() or -fd
            if err == errno.ENOENT:
                raise StateError(f"no pinned map at {path}; is natd running with this instance and pin_root?")
            raise BpfError(f"opening pinned map {path}: {os.strerror(err)}")
        return cls(fd, os.path.basename(path))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> BpfMap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _info(self) -> MapInfo:
        info = _MapInfo()
        size = ctypes.c_uint32(ctypes.sizeof(info))
        _check(_lib().bpf_obj_get_info_by_fd(self.fd, ctypes.byref(info), ctypes.byref(size)), "map info")
        return MapInfo(info.type, info.id, info.key_size, info.value_size, info.max_entries,
                       info.name.decode(errors="replace"))

    def expect_layout(self, key_size: int, value_size: int, path: str) -> None:
        if (self.info.key_size, self.info.value_size) != (key_size, value_size):
            raise LayoutMismatchError(
                f"pinned map {path} has key/value sizes {self.info.key_size}/{self.info.value_size}, "
                f"this natd expects {key_size}/{value_size}; remove the old state with "
                f"'natd --detach --config FILE' (drops all flows) or run the natd version that made it")

    def lookup(self, key: bytes) -> bytes | None:
        out = ctypes.create_string_buffer(self.value_bytes)
        rc = _lib().bpf_map_lookup_elem(self.fd, key, out)
        if rc < 0:
            if ctypes.get_errno() == errno.ENOENT or rc == -errno.ENOENT:
                return None
            _check(rc, f"lookup in {self.name}")
        return out.raw

    def lookup_many_raw(self, keys: bytes, count: int | None = None) -> tuple[bytes, bytes]:
        """One BPF_MAP_LOOKUP_ELEM per key of a packed blob (there is no batch lookup by key), without
        building objects per key. Returns ``(values, found)``: values packed like the keys (zeros where
        the key is missing) and one byte per key, 1 if it was found."""
        ks, vs = self.info.key_size, self.value_bytes
        if count is None:
            count = len(keys) // ks
        if len(keys) < count * ks:
            raise ValueError(f"lookup of {count} keys needs {count * ks} bytes, got {len(keys)}")
        kbuf = (ctypes.c_char * max(len(keys), 1)).from_buffer_copy(keys or b"\0")
        values = ctypes.create_string_buffer(vs * count)
        found = ctypes.create_string_buffer(count)
        kbase, vbase, fd = ctypes.addressof(kbuf), ctypes.addressof(values), self.fd
        lookup = _lib().bpf_map_lookup_elem
        for i in range(count):
            if lookup(fd, kbase + i * ks, vbase + i * vs) == 0:
                found[i] = b"\x01"
                continue
            err = ctypes.get_errno()
            if err != errno.ENOENT:
                raise BpfError(f"lookup in {self.name}: {os.strerror(err)} (errno {err})")
        return values.raw, found.raw

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        _check(_lib().bpf_map_update_elem(self.fd, key, value, flags), f"update of {self.name}")

    def delete(self, key: bytes) -> bool:
        rc = _lib().bpf_map_delete_elem(self.fd, key)
        if rc < 0:
            if ctypes.get_errno() == errno.ENOENT or rc == -errno.ENOENT:
                return False
            _check(rc, f"delete in {self.name}")
        return True

    def keys(self) -> Iterator[bytes]:
        """Walks key by key: fine for the small rule maps, use items_batch() for conntrack."""
        prev: bytes | None = None
        nxt = ctypes.create_string_buffer(self.info.key_size)
        while True:
            rc = _lib().bpf_map_get_next_key(self.fd, prev, nxt)
            if rc < 0:
                return
            prev = nxt.raw
            yield prev

    def items(self) -> list[tuple[bytes, bytes]]:
        out = []
        for key in self.keys():
            value = self.lookup(key)
            if value is not None:
                out.append((key, value))
        return out

    def lookup_batch_raw(self, chunk: int = BATCH_CHUNK) -> tuple[memoryview, memoryview, int]:
        """The whole map with BPF_MAP_LOOKUP_BATCH as two packed blobs: ``(keys, values, count)``, entry
        ``i`` at ``keys[i * key_size:]`` and ``values[i * value_bytes:]`` (``value_bytes``: per-CPU values
        hold one 8-byte-aligned slot per possible CPU).

        ``chunk``: entries per syscall at most (0: all that fit). The kernel walks a hash map's buckets
        without rescheduling until the syscall returns: on a non-preemptible kernel (Debian's default
        ``preempt=none``/voluntary) one syscall for a million entries keeps its CPU for ~0.4 s, from other
        threads of this process and from threaded NAPI alike. ``BATCH_CHUNK`` entries (a few ms) per
        syscall costs nothing measurable and lets the scheduler in between.

        One buffer per side, sized from the previous read (the first time: ``max_entries``) and grown when
        the map holds more. The buffers are private anonymous memory (mmap): the kernel writes into them
        directly and they are handed over as read-only memoryviews, so nothing is zeroed, copied or sliced
        per entry with the GIL held (a million-entry table is 80 MB: a memset or copy of that holds the GIL
        for tens of ms). View them with ``np.frombuffer`` or ``Struct.from_buffer_copy(blob, offset)``;
        ``bytes(blob)`` copies. The syscalls themselves run without the GIL.

        Not a snapshot of one instant: entries created or deleted during the read may or may not be in it
        (each hash bucket is read atomically).
        """
        ks, vs = self.info.key_size, self.value_bytes
        # the last read's count (+1/8) or, the first time, the whole capacity; +256 so that a full map
        # needs no growth just to learn that it has ended
        cap = min(self.info.max_entries, self._batch_hint or self.info.max_entries, 1 << 26) + 256
        keys = mmap.mmap(-1, ks * cap, flags=mmap.MAP_PRIVATE)
        values = mmap.mmap(-1, vs * cap, flags=mmap.MAP_PRIVATE)
        token_in = ctypes.create_string_buffer(max(ks, 8))
        token_out = ctypes.create_string_buffer(max(ks, 8))
        opts = _BatchOpts(ctypes.sizeof(_BatchOpts), 0, 0)
        lookup = _lib().bpf_map_lookup_batch
        n = 0
        first = True
        while True:
            if cap - n < 64:
                cap = 2 * cap
                keys.resize(ks * cap)  # mremap: no copy (the mapping may move: addresses are taken below)
                values.resize(vs * cap)
            want = min(cap - n, chunk) if chunk else cap - n
            count = ctypes.c_uint32(want)
            rc = lookup(self.fd, None if first else token_in, token_out, _address(keys) + n * ks,
                        _address(values) + n * vs, ctypes.byref(count), ctypes.byref(opts))
            err = ctypes.get_errno() if rc < 0 else 0
            if rc < 0 and err == errno.ENOSPC and count.value == 0:
                # the next hash bucket holds more entries than fit: make room and ask again
                chunk = 4 * chunk
                if cap - n < 4 * want:
                    cap = n + 4 * want
                    keys.resize(ks * cap)
                    values.resize(vs * cap)
                continue
            n += count.value
            if rc < 0:
                if err == errno.ENOENT:
                    break
                _check(rc, f"batch lookup in {self.name}")
            ctypes.memmove(token_in, token_out, ctypes.sizeof(token_out))
            first = False
        self._batch_hint = n + n // 8 + 1024
        if n == 0:
            return memoryview(b""), memoryview(b""), 0
        keys.resize(ks * n)  # give back what the read did not use (shrinking never moves or copies)
        values.resize(vs * n)
        return memoryview(keys).toreadonly(), memoryview(values).toreadonly(), n

    def items_batch(self, chunk: int = BATCH_CHUNK) -> list[tuple[bytes, bytes]]:
        """The whole map with BPF_MAP_LOOKUP_BATCH as (key, value) pairs; see :meth:`lookup_batch_raw`,
        which is what to use for big maps (no per-entry objects)."""
        kview, vview, n = self.lookup_batch_raw(chunk)
        keys, values = bytes(kview), bytes(vview)
        ks, vs = self.info.key_size, self.value_bytes
        return [(keys[i * ks:(i + 1) * ks], values[i * vs:(i + 1) * vs]) for i in range(n)]

    def update_batch(self, keys: bytes, values: bytes, count: int | None = None, *, flags: int = BPF_ANY,
                     chunk: int = 65536) -> int:
        """BPF_MAP_UPDATE_BATCH of ``count`` entries packed in two blobs (as :meth:`lookup_batch_raw`
        returns them); ``flags`` (BPF_ANY, BPF_NOEXIST, BPF_EXIST) applies to every element. Raises on the
        first element that fails (E2BIG: the map is full; EEXIST with BPF_NOEXIST), after the ones before
        it were written. Returns the number written."""
        ks, vs = self.info.key_size, self.value_bytes
        if count is None:
            count = len(keys) // ks
        if len(keys) < count * ks or len(values) < count * vs:
            raise ValueError(f"update_batch of {count} entries needs {count * ks} key and {count * vs} value "
                             f"bytes, got {len(keys)} and {len(values)}")
        if count == 0:
            return 0
        kbuf = (ctypes.c_char * len(keys)).from_buffer_copy(keys)
        vbuf = (ctypes.c_char * len(values)).from_buffer_copy(values)
        opts = _BatchOpts(ctypes.sizeof(_BatchOpts), flags, 0)
        update = _lib().bpf_map_update_batch
        done = 0
        while done < count:
            n = ctypes.c_uint32(min(chunk, count - done))
            rc = update(self.fd, ctypes.byref(kbuf, done * ks), ctypes.byref(vbuf, done * vs),
                        ctypes.byref(n), ctypes.byref(opts))
            done += n.value
            if rc < 0:
                _check(rc, f"batch update of {self.name} (after {done} of {count} entries)")
        return done

    def delete_batch_raw(self, keys: bytes, count: int | None = None, chunk: int = 8192) -> list[int]:
        """BPF_MAP_DELETE_BATCH of ``count`` keys packed in one blob. Keys that are not in the map (gone
        already: the datapath or a racing delete) are skipped. Returns the indexes of those skipped keys,
        so the caller knows exactly which keys this call deleted."""
        ks = self.info.key_size
        if count is None:
            count = len(keys) // ks
        if len(keys) < count * ks:
            raise ValueError(f"delete_batch of {count} keys needs {count * ks} bytes, got {len(keys)}")
        if count == 0:
            return []
        kbuf = (ctypes.c_char * len(keys)).from_buffer_copy(keys)
        opts = _BatchOpts(ctypes.sizeof(_BatchOpts), 0, 0)
        missing: list[int] = []
        done = 0
        while done < count:
            n = ctypes.c_uint32(min(chunk, count - done))
            rc = _lib().bpf_map_delete_batch(self.fd, ctypes.byref(kbuf, done * ks), ctypes.byref(n),
                                             ctypes.byref(opts))
            done += n.value
            if rc < 0:
                err = ctypes.get_errno()
                if err != errno.ENOENT:
                    _check(rc, f"batch delete in {self.name}")
                # the key at index `done` vanished under us: skip it
                missing.append(done)
                done += 1
        return missing

    def delete_batch(self, keys: list[bytes], chunk: int = 8192) -> int:
        """Deletes with BPF_MAP_DELETE_BATCH; keys that are already gone are skipped. Returns deleted."""
        if not keys:
            return 0
        return len(keys) - len(self.delete_batch_raw(b"".join(keys), len(keys), chunk))


def _address(buffer: mmap.mmap) -> int:
    """Where a writable buffer's memory is now (the temporary export ends at once: it may be resized)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


def obj_pin(fd: int, path: str) -> None:
    _check(_lib().bpf_obj_pin(fd, os.fsencode(path)), f"pin {path}")


def obj_get(path: str) -> int:
    fd = _lib().bpf_obj_get(os.fsencode(path))
    if fd < 0:
        raise StateError(f"nothing pinned at {path}: {os.strerror(ctypes.get_errno())}")
    return int(fd)


@dataclass(frozen=True)
class TestRunResult:
    retval: int
    data: bytes
    duration_ns: int


BPF_F_TEST_XDP_LIVE_FRAMES = 1 << 1


def prog_test_run(prog_fd: int, data: bytes, repeat: int = 1, ingress_ifindex: int = 0,
                  flags: int = 0) -> TestRunResult:
    """BPF_PROG_TEST_RUN on one frame. ingress_ifindex lets FIB lookups see a real interface (the calling
    thread must be in its network namespace). flags=BPF_F_TEST_XDP_LIVE_FRAMES really transmits what the
    program redirects (a traffic generator); no output frame then."""
    live = bool(flags & BPF_F_TEST_XDP_LIVE_FRAMES)
    data_out = ctypes.create_string_buffer(len(data) + 256)
    opts = _TestRunOpts()
    opts.sz = ctypes.sizeof(_TestRunOpts)
    inbuf = ctypes.create_string_buffer(data, len(data))
    opts.data_in = ctypes.cast(inbuf, ctypes.c_void_p)
    opts.data_size_in = len(data)
    if not live:
        opts.data_out = ctypes.cast(data_out, ctypes.c_void_p)
        opts.data_size_out = len(data_out)
    opts.repeat = repeat
    opts.flags = flags
    ctx = None
    if ingress_ifindex:
        # struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex
        ctx = (ctypes.c_uint32 * 6)(0, len(data), 0, ingress_ifindex, 0, 0)
        opts.ctx_in = ctypes.cast(ctx, ctypes.c_void_p)
        opts.ctx_size_in = ctypes.sizeof(ctx)
    _check(_lib().bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts)), "BPF_PROG_TEST_RUN")
    return TestRunResult(int(opts.retval), b"" if live else data_out.raw[:opts.data_size_out],
                         int(opts.duration))


# struct bpf_prog_info (uapi/linux/bpf.h): verified_insns, since Linux 5.16, at this offset
_PROG_INFO_SIZE = 256
_PROG_INFO_VERIFIED_INSNS = 216


def prog_verified_insns(prog_fd: int) -> int:
    """How many instructions the verifier processed to load this program (its complexity limit is 1M):
    what every added branch of the datapath costs at load time."""
    info = ctypes.create_string_buffer(_PROG_INFO_SIZE)
    size = ctypes.c_uint32(_PROG_INFO_SIZE)
    _check(_lib().bpf_obj_get_info_by_fd(prog_fd, info, ctypes.byref(size)), "program info")
    if size.value < _PROG_INFO_VERIFIED_INSNS + 4:
        raise BpfError(f"the kernel's bpf_prog_info has {size.value} bytes, too old to report verified_insns")
    return int(struct.unpack_from("<I", info.raw, _PROG_INFO_VERIFIED_INSNS)[0])


def prog_fd_by_id(prog_id: int) -> int:
    """A file descriptor of the loaded program with this id (e.g. what is attached to an interface)."""
    lib = _lib()
    lib.bpf_prog_get_fd_by_id.argtypes = [ctypes.c_uint32]
    lib.bpf_prog_get_fd_by_id.restype = ctypes.c_int
    fd = lib.bpf_prog_get_fd_by_id(prog_id)
    if fd < 0:
        raise BpfError(f"no BPF program with id {prog_id}: {os.strerror(ctypes.get_errno() or -fd)}")
    return int(fd)
