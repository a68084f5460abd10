"""`make demo`: the default lab, natd on its gateway, real traffic, and what each side saw.

Builds the default lab (unique prefix), starts natd on gw with a default config, runs a TCP server on
srv1 that answers every connection with the address it saw the client come from, then connects from
both private hosts, pings srv2 and sends a UDP request; prints natctl's conntrack table and natd's
metrics, and tears everything down (also on errors and Ctrl-C).
"""

from __future__ import annotations

import sys
import time

from .apps import start_peer_echo, tcp_ask, udp_ask
from .lab import Lab
from .natd import NatdInLab
from .topology import load_topology


def banner(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def run() -> int:
    lab = Lab(load_topology("default"))
    natd: NatdInLab | None = None
    try:
        banner(f"building the default lab (prefix {lab.prefix})")
        lab.up()
        srv1 = lab.addr("srv1")
        srv2 = lab.addr("srv2")
        print(f"private: host1 {lab.addr('host1')}, host2 {lab.addr('host2')}; gateway outside "
              f"{lab.addr('gw', 'out0')}; servers: srv1 {srv1}, srv2 {srv2}")

        banner("starting natd on gw (XDP on in1, in2 and out0)")
        natd = NatdInLab(lab, {
            "inside": ["in1", "in2"],
            "outside": "out0",
            "snat": [{"from": "10.0.0.0/16"}],
        })
        t0 = time.monotonic()
        natd.start()
        print(f"natd is READY after {time.monotonic() - t0:.1f} s; config:\n{natd.config_path.read_text()}")

        start_peer_echo(lab, "srv1", 8080, 5353)

        banner(f"TCP from the private hosts to srv1 {srv1}:8080 (srv1 answers with the client it sees)")
        for host in ("host1", "host2"):
            print(f"{host} ({lab.addr(host)}) -> srv1 saw it come from {tcp_ask(lab, host, srv1, 8080)}")
        banner(f"UDP from host1 to srv1 {srv1}:5353")
        print(f"host1 -> srv1 saw it come from {udp_ask(lab, 'host1', srv1, 5353)}")
        banner(f"ping from host2 to srv2 {srv2}")
        print(lab.exec("host2", ["ping", "-c", "3", "-i", "0.2", srv2], timeout=15).stdout.strip())

        banner("natctl -L (the conntrack table, as conntrack -L shows it)")
        res = natd.natctl("-L")
        print(res.stdout.rstrip())
        print(res.stderr.rstrip())
        banner("natctl -M (NAT mappings: an inside endpoint keeps its external ip:port towards every remote)")
        res = natd.natctl("-M")
        print(res.stdout.rstrip())
        print(res.stderr.rstrip())
        banner("natd's metrics (selected; entry counts come from the reaper's sweeps)")
        deadline = time.monotonic() + 10
        while (natd.metric("natd_conntrack_entries") or 0) < 1 and time.monotonic() < deadline:
            time.sleep(0.5)  # a sweep after the flows above (the first one ran before them)
        for line in natd.metrics().splitlines():
            if line.startswith(("natd_conntrack_entries", "natd_mappings ", "natd_connection",
                                "natd_xdp_verdicts", "natd_packets_total",
                                "natd_packets_dropped_total{reason=\"no_mapping")):
                print(line)
        banner("kernel forwarding counter on gw (translated packets bypass it: XDP redirects them)")
        nstat = lab.exec("gw", ["nstat", "-az", "IpForwDatagrams"]).stdout
        print("\n".join(line for line in nstat.splitlines() if line.startswith("Ip")))
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        if natd is not None:
            print(natd.log_tail(), file=sys.stderr)
        return 1
    finally:
        banner("tearing down")
        if natd is not None:
            natd.close()
        lab.down()
        print("done: natd stopped and uninstalled, lab removed")


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
