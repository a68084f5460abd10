"""Small system helpers of the benchmarks: setns for one thread, NAPI threads from netdev netlink, CPU time.

Everything acts on the bench's own lab namespaces and on processes/threads the bench made or that serve
its own interfaces (the NAPI kernel threads of the lab's veths).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import socket
import struct
import time
from collections.abc import Iterator

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
USER_HZ = os.sysconf("SC_CLK_TCK")


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns(CLONE_NEWNET): {os.strerror(err)}")


@contextlib.contextmanager
def in_netns(ns_path: str) -> Iterator[None]:
    """Run the block with this thread in the network namespace at ns_path; always switch back."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(ns_path, os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(target)
        os.close(own)


# ------------------------------------------------------------------------------------ netdev netlink

NETLINK_GENERIC = 16
GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID = 1
CTRL_ATTR_FAMILY_NAME = 2
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x4, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
NETDEV_CMD_NAPI_GET = 11
NETDEV_A_NAPI_IFINDEX, NETDEV_A_NAPI_ID, NETDEV_A_NAPI_IRQ, NETDEV_A_NAPI_PID = 1, 2, 3, 4


def _attr(kind: int, payload: bytes) -> bytes:
    raw = struct.pack("HH", 4 + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def _attrs(data: bytes) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    pos = 0
    while pos + 4 <= len(data):
        length, kind = struct.unpack_from("HH", data, pos)
        if length < 4:
            break
        out[kind & 0x3FFF] = data[pos + 4:pos + length]
        pos += (length + 3) & ~3
    return out


def _genl_request(sock: socket.socket, family: int, cmd: int, attrs: bytes,
                  flags: int) -> list[dict[int, bytes]]:
    seq = int(time.monotonic_ns() & 0x7FFFFFFF)
    body = struct.pack("BBH", cmd, 1, 0) + attrs
    sock.send(struct.pack("IHHII", 16 + len(body), family, NLM_F_REQUEST | flags, seq, 0) + body)
    replies: list[dict[int, bytes]] = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        data = sock.recv(1 << 16)
        pos = 0
        while pos + 16 <= len(data):
            length, kind, _f, rseq, _pid = struct.unpack_from("IHHII", data, pos)
            if length < 16:
                return replies
            payload = data[pos + 16:pos + length]
            pos += (length + 3) & ~3
            if rseq != seq:
                continue
            if kind == NLMSG_DONE:
                return replies
            if kind == NLMSG_ERROR:
                err = -struct.unpack_from("i", payload)[0]
                if err:
                    raise OSError(err, f"netlink: {os.strerror(err)}")
                return replies
            replies.append(_attrs(payload[4:]))
            if not flags & NLM_F_DUMP:
                return replies
    raise TimeoutError("netlink: no answer within 5 s")


@dataclasses.dataclass(frozen=True)
class Napi:
    ifindex: int
    napi_id: int
    pid: int  # 0 when the NAPI is not threaded


def napi_threads(ns_path: str, ifindex: int) -> list[Napi]:
    """The NAPI instances of ifindex in that namespace, with their kernel thread's PID (netdev netlink)."""
    with in_netns(ns_path):
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC)
    try:
        sock.settimeout(5)
        fam = _genl_request(sock, GENL_ID_CTRL, CTRL_CMD_GETFAMILY,
                            _attr(CTRL_ATTR_FAMILY_NAME, b"netdev\0"), NLM_F_ACK)
        family = struct.unpack("H", fam[0][CTRL_ATTR_FAMILY_ID][:2])[0]
        rows = _genl_request(sock, family, NETDEV_CMD_NAPI_GET,
                             _attr(NETDEV_A_NAPI_IFINDEX, struct.pack("I", ifindex)), NLM_F_DUMP)
    finally:
        sock.close()
    out = []
    for row in rows:
        pid = struct.unpack("I", row[NETDEV_A_NAPI_PID][:4])[0] if NETDEV_A_NAPI_PID in row else 0
        out.append(Napi(struct.unpack("I", row[NETDEV_A_NAPI_IFINDEX][:4])[0],
                        struct.unpack("I", row[NETDEV_A_NAPI_ID][:4])[0], pid))
    return out


# ------------------------------------------------------------------------------------ CPU time


def cpu_ticks(cpu: int) -> tuple[int, int]:
    """(busy, total) jiffies of one CPU from /proc/stat; busy excludes idle, iowait and steal."""
    with open("/proc/stat") as fh:
        for line in fh:
            if line.startswith(f"cpu{cpu} "):
                v = [int(x) for x in line.split()[1:]]
                user, nice, system, idle, iowait, irq, softirq = v[:7]
                steal = v[7] if len(v) > 7 else 0
                busy = user + nice + system + irq + softirq
                return busy, busy + idle + iowait + steal
    raise LookupError(f"cpu{cpu} not in /proc/stat")


def thread_runtime_ns(pid: int) -> int:
    """Time on CPU of one task in ns (/proc/PID/schedstat); 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/schedstat") as fh:
            return int(fh.read().split()[0])
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return 0


def process_cpu_ns(pid: int) -> int:
    """utime + stime of a whole process (all threads) in ns; 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) * 1_000_000_000 // USER_HZ
    except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
        return 0


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except FileNotFoundError:
        pass
    return 0


@dataclasses.dataclass
class CpuSample:
    t: float
    busy: int
    total: int
    threads: dict[int, int]


def cpu_sample(cpu: int, pids: list[int]) -> CpuSample:
    busy, total = cpu_ticks(cpu)
    return CpuSample(time.monotonic(), busy, total, {p: thread_runtime_ns(p) for p in pids})


@dataclasses.dataclass(frozen=True)
class CpuDelta:
    seconds: float       # wall time
    busy_s: float        # busy time of the core (from /proc/stat)
    busy_frac: float     # busy / total of the core
    threads_s: float     # CPU time of the watched threads

    @staticmethod
    def between(a: CpuSample, b: CpuSample) -> CpuDelta:
        total = max(1, b.total - a.total)
        busy = b.busy - a.busy
        threads = sum(max(0, b.threads.get(p, 0) - a.threads[p]) for p in a.threads) / 1e9
        return CpuDelta(b.t - a.t, busy / USER_HZ, busy / total, threads)
