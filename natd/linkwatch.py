"""Follow the configured interfaces with netlink link events (pyroute2), so natd notices an interface
going down, disappearing or coming back, re-attaches its program when needed, and says so.

An XDP program belongs to one ifindex: deleting the interface takes the program with it, and an
interface re-created under the same name has a new ifindex (and no program). The watcher reports each
change to a callback; the daemon decides what to do (re-attach, rewrite outside_ifaces).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("natd.links")

RTM_NEWLINK = "RTM_NEWLINK"
RTM_DELLINK = "RTM_DELLINK"
IFF_UP = 0x1
RTMGRP_LINK = 0x1


@dataclass(frozen=True)
class LinkState:
    name: str
    ifindex: int | None  # None: the interface does not exist (deleted)
    up: bool
    xdp_attached: bool


def link_state(msg: Any) -> LinkState:
    """A LinkState from a pyroute2 ifinfmsg (an RTM_NEWLINK/RTM_DELLINK event or a get_links() entry)."""
    name = str(msg.get_attr("IFLA_IFNAME"))
    if msg.get("event") == RTM_DELLINK:
        return LinkState(name, None, False, False)
    xdp = msg.get_attr("IFLA_XDP")
    attached = bool(xdp and xdp.get_attr("IFLA_XDP_ATTACHED"))
    return LinkState(name, int(msg["index"]), bool(msg["flags"] & IFF_UP), attached)


class LinkWatcher(threading.Thread):
    """Calls ``on_change(state)`` whenever one of ``names`` changes (appears, disappears, goes up or
    down, or loses its XDP program)."""

    def __init__(self, names: set[str], on_change: Callable[[LinkState], None], *, ipr: Any = None) -> None:
        super().__init__(name="natd-links", daemon=True)
        self.names = set(names)
        self.on_change = on_change
        self._ipr = ipr
        self._stop_event = threading.Event()
        self._last: dict[str, LinkState] = {}

    def stop(self) -> None:
        """Ends the watch: closing the socket wakes the blocking get()."""
        self._stop_event.set()
        if self._ipr is not None:
            try:
                self._ipr.close()
            except Exception as exc:  # already closed by run()
                log.debug("closing the link watcher's socket: %s", exc)

    def _open(self) -> Any:
        if self._ipr is None:
            from pyroute2 import IPRoute

            self._ipr = IPRoute()
            # link events only: route/address/neighbour chatter would just be parsed and dropped
            self._ipr.bind(groups=RTMGRP_LINK)
        return self._ipr

    def snapshot(self) -> dict[str, LinkState]:
        return dict(self._last)

    def handle(self, msg: Any) -> None:
        log.debug("netlink event %s %s", msg.get("event"), msg.get_attr("IFLA_IFNAME"))
        if msg.get("event") not in (RTM_NEWLINK, RTM_DELLINK):
            return
        state = link_state(msg)
        if state.name not in self.names or self._last.get(state.name) == state:
            return
        self._last[state.name] = state
        try:
            self.on_change(state)
        except Exception:  # a failing handler must not end the watch
            log.exception("handling a change of interface %s failed", state.name)

    def run(self) -> None:
        # pyroute2 reads ahead into its own queue, so select() on the socket can miss queued events:
        # block in get() instead, and let stop() close the socket to end it.
        ipr = self._open()
        try:
            for link in ipr.get_links():
                state = link_state(link)
                if state.name in self.names:
                    self._last[state.name] = state
            while not self._stop_event.is_set():
                for msg in ipr.get():
                    self.handle(msg)
        except Exception:
            if not self._stop_event.is_set():
                log.exception("the link watcher stopped; interface changes are no longer followed")
        finally:
            try:
                ipr.close()
            except Exception as exc:
                log.debug("closing the link watcher's socket: %s", exc)
