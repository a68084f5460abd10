"""ebpf/lib/abi.h against its ctypes mirror natd/maps.py.

A small C program that includes abi.h is generated from the header itself (every struct field and every
enumerator found in it), compiled with the host compiler and run; its output (sizes, offsets, field
sizes, enum values, #defines) is compared with natd.maps. A field or enumerator added on one side only,
a reordering, a type change or a renamed counter fails here instead of corrupting map reads at run time.
Needs only gcc (or $CC) and the kernel UAPI headers (Debian: linux-libc-dev).
"""

from __future__ import annotations

import ctypes
import enum
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from natd import maps

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
ABI_H = REPO / "ebpf" / "lib" / "abi.h"

# C struct -> name of its ctypes mirror in natd.maps, where it is not the CamelCase of the C name
STRUCT_NAMES = {"snat_rule": "SnatRuleValue"}
# C enum -> (Python enum, prefix the Python names drop, C enumerators that are not members)
ENUMS: dict[str, tuple[type[enum.Enum], str, tuple[str, ...]]] = {
    "natd_stat": (maps.Stat, "STAT_", ("STAT_MAX",)),
    "ct_state": (maps.CtState, "CT_", ()),
    "ct_flags": (maps.CtFlags, "CT_F_", ()),
    "nat_event_type": (maps.NatEventType, "NAT_EVENT_", ()),
    "snat_rule_flags": (maps.SnatRuleFlags, "SNAT_F_", ()),
    "nat_mapping_flags": (maps.NatMappingFlags, "NAT_MAP_F_", ()),
}
Layout = dict[str, dict[str, tuple[int, ...]]]


def mirror_name(cname: str) -> str:
    return STRUCT_NAMES.get(cname) or "".join(part.capitalize() for part in cname.split("_"))


def header_defines(text: str) -> list[str]:
    """The NATD_* constants of abi.h (not the include guard)."""
    pattern = r"^[ \t]*#[ \t]*define[ \t]+(NATD_\w+)[ \t]+\S"
    return [m.group(1) for m in re.finditer(pattern, text, flags=re.M)]


def required_define(name: str) -> bool:
    """The layout version and every capacity must have a mirror; other constants where natd.maps has one."""
    return name == "NATD_LAYOUT_VERSION" or name.startswith("NATD_MAX_")


def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", " ", text)


def header_structs(text: str) -> dict[str, list[str]]:
    """struct name -> its field names, in order, from the header text."""
    out: dict[str, list[str]] = {}
    for m in re.finditer(r"\bstruct\s+(\w+)\s*\{(.*?)\}\s*;", _strip_comments(text), flags=re.S):
        fields = []
        for decl in m.group(2).split(";"):
            decl = decl.strip()
            if decl:
                fm = re.search(r"(\w+)\s*(\[[^\]]*\])?\s*$", decl)
                assert fm, f"cannot parse field {decl!r} of struct {m.group(1)}"
                fields.append(fm.group(1))
        out[m.group(1)] = fields
    return out


def header_enums(text: str) -> dict[str, list[str]]:
    """enum name -> its enumerator names, in order."""
    out: dict[str, list[str]] = {}
    for m in re.finditer(r"\benum\s+(\w+)\s*\{(.*?)\}\s*;", _strip_comments(text), flags=re.S):
        out[m.group(1)] = [e.split("=")[0].strip() for e in m.group(2).split(",") if e.strip()]
    return out


def c_program(structs: dict[str, list[str]], enums: dict[str, list[str]], defines: list[str]) -> str:
    lines = ["#include <stdio.h>", "#include <stddef.h>", '#include "abi.h"', "", "int main(void)", "{"]
    for name, fields in structs.items():
        lines.append(f'\tprintf("size {name} %zu\\n", sizeof(struct {name}));')
        for f in fields:
            lines.append(f'\tprintf("field {name} {f} %zu %zu\\n", offsetof(struct {name}, {f}), '
                         f"sizeof(((struct {name} *)0)->{f}));")
    for name, members in enums.items():
        for e in members:
            lines.append(f'\tprintf("enum {name} {e} %lld\\n", (long long){e});')
    for d in defines:
        lines.append(f'\tprintf("define {d} %lld\\n", (long long)({d}));')
    lines += ["\treturn 0;", "}", ""]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def header_text() -> str:
    return ABI_H.read_text()


@pytest.fixture(scope="module")
def c_layout(header_text: str, tmp_path_factory: pytest.TempPathFactory) -> Layout:
    """What the C compiler says: {"size": {struct: (n,)}, "field": {"struct.f": (off, size)}, ...}."""
    cc = os.environ.get("CC", "gcc")
    if shutil.which(cc) is None:
        pytest.skip(f"no C compiler ({cc}) to compile abi.h")
    tmp = tmp_path_factory.mktemp("abi")
    src, exe = tmp / "abi_layout.c", tmp / "abi_layout"
    src.write_text(c_program(header_structs(header_text), header_enums(header_text),
                             header_defines(header_text)))
    build = subprocess.run([cc, "-std=gnu11", "-Wall", "-Werror", "-I", str(ABI_H.parent), "-o", str(exe),
                            str(src)], capture_output=True, text=True, check=False)
    assert build.returncode == 0, f"compiling abi.h failed:\n{build.stderr}"
    run = subprocess.run([str(exe)], capture_output=True, text=True, check=True)
    out: Layout = {"size": {}, "field": {}, "enum": {}, "define": {}}
    for line in run.stdout.splitlines():
        kind, *rest = line.split()
        if kind == "size":
            out["size"][rest[0]] = (int(rest[1]),)
        elif kind == "field":
            out["field"][f"{rest[0]}.{rest[1]}"] = (int(rest[2]), int(rest[3]))
        elif kind == "enum":
            out["enum"][f"{rest[0]}.{rest[1]}"] = (int(rest[2]),)
        else:
            out["define"][rest[0]] = (int(rest[1]),)
    return out


_HEADER = ABI_H.read_text()
C_STRUCTS = sorted(header_structs(_HEADER))
C_DEFINES = header_defines(_HEADER)


def test_header_parser_sees_everything(header_text: str) -> None:
    """The generated program covers the structs, enums and constants of abi.h; every enum has a mirror."""
    structs, enums = header_structs(header_text), header_enums(header_text)
    assert structs["ct_key"] == ["saddr", "daddr", "sport", "dport", "proto", "pad"]
    assert {"ct_key", "ct_entry", "ct_reply_value", "snat_rule", "stat_counter"} <= set(structs)
    assert set(enums) == set(ENUMS), "an enum of abi.h has no mirror listed in ENUMS (or it is gone)"
    assert enums["natd_stat"][-1] == "STAT_MAX", "STAT_MAX must stay the last enumerator"
    assert {"NATD_LAYOUT_VERSION", "NATD_MAX_POOL", "NATD_MAX_RULES", "NATD_MAX_IFACES"} <= set(
        header_defines(header_text))


@pytest.mark.parametrize("cname", C_STRUCTS)
def test_struct_layout(cname: str, header_text: str, c_layout: Layout) -> None:
    py = getattr(maps, mirror_name(cname), None)
    assert py is not None, f"struct {cname} of abi.h has no ctypes mirror natd.maps.{mirror_name(cname)}"
    c_fields = header_structs(header_text)[cname]
    py_fields = [f[0] for f in py._fields_]
    assert py_fields == c_fields, f"struct {cname}: field names/order differ"
    assert ctypes.sizeof(py) == c_layout["size"][cname][0], f"sizeof(struct {cname})"
    for name in c_fields:
        off, size = c_layout["field"][f"{cname}.{name}"]
        descr = getattr(py, name)
        assert (descr.offset, descr.size) == (off, size), f"struct {cname}.{name}: (offset, size)"


def test_map_types_use_mirrors(c_layout: Layout) -> None:
    """MAP_TYPES names the mirrors the control plane decodes pinned maps with: all of them are checked."""
    mirrors = {mirror_name(c) for c in C_STRUCTS}
    for key_t, val_t in maps.MAP_TYPES.values():
        for t in (key_t, val_t):
            if t is not None:
                assert t.__name__ in mirrors, f"{t.__name__} mirrors no struct of abi.h"


@pytest.mark.parametrize("cenum", sorted(ENUMS))
def test_enum_values(cenum: str, header_text: str, c_layout: Layout) -> None:
    py_enum, prefix, extra = ENUMS[cenum]
    c_members = [m for m in header_enums(header_text)[cenum] if m not in extra]
    for m in c_members:
        assert m.startswith(prefix), f"enum {cenum}: {m} lacks the prefix {prefix}"
    c_values = {m.removeprefix(prefix): c_layout["enum"][f"{cenum}.{m}"][0] for m in c_members}
    py_values = {m.name: int(m.value) for m in py_enum}  # type: ignore[attr-defined]
    assert py_values == c_values, f"enum {cenum} and {py_enum.__name__} differ"
    # same order too (Stat is documented as "in order")
    assert [m.name for m in py_enum] == [m.removeprefix(prefix) for m in c_members]  # type: ignore[attr-defined]


def test_stat_max(c_layout: Layout) -> None:
    assert c_layout["enum"]["natd_stat.STAT_MAX"][0] == maps.STAT_MAX == len(maps.Stat)
    assert [int(s) for s in maps.Stat] == list(range(maps.STAT_MAX)), "Stat must be dense from 0"


def test_stat_verdict_slots_are_xdp_actions() -> None:
    """count_action() indexes stats by the XDP verdict value."""
    assert [maps.Stat.XDP_ABORTED, maps.Stat.XDP_DROP, maps.Stat.XDP_PASS, maps.Stat.XDP_TX,
            maps.Stat.XDP_REDIRECT] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("define", C_DEFINES)
def test_defines(define: str, c_layout: Layout) -> None:
    name = define.removeprefix("NATD_")
    if not hasattr(maps, name):
        assert not required_define(define), f"{define} of abi.h has no mirror natd.maps.{name}"
        pytest.skip(f"natd.maps has no {name}")
    assert c_layout["define"][define][0] == getattr(maps, name)


def test_config_capacities_match_abi(c_layout: Layout) -> None:
    """natd.config validates against its own copy of the map capacities."""
    from natd import config

    ours = {f"NATD_{name}": getattr(config, name) for name in dir(config) if name.startswith("MAX_")}
    assert {"NATD_MAX_POOL", "NATD_MAX_RULES", "NATD_MAX_IFACES"} <= set(ours)
    assert ours == {name: c_layout["define"][name][0] for name in ours}
