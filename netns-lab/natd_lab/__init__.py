"""natd_lab: build natd test labs from network namespaces and veth pairs (see netns-lab/README.md)."""

from __future__ import annotations

from .errors import ExecError, ExecTimeout, LabBuildError, LabError, TopologyError
from .lab import Lab
from .registry import cleanup_prefix, list_labs, new_prefix, read_state
from .topology import (
    Endpoint,
    Link,
    Node,
    Route,
    Topology,
    available_topologies,
    load_topology,
    parse_topology,
)

__all__ = [
    "Endpoint",
    "ExecError",
    "ExecTimeout",
    "Lab",
    "LabBuildError",
    "LabError",
    "Link",
    "Node",
    "Route",
    "Topology",
    "TopologyError",
    "available_topologies",
    "cleanup_prefix",
    "list_labs",
    "load_topology",
    "new_prefix",
    "parse_topology",
    "read_state",
]
