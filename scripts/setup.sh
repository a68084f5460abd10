#!/usr/bin/env bash
# Idempotent set-up of a natd gateway/dev box: Debian packages, kernel headers for BCC, bpffs, venv.
# Quick on re-run: every step checks before it acts.
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "setup: error: $*" >&2; exit 1; }
say() { echo "setup: $*"; }

[ "$(id -u)" = 0 ] || die "natd needs root (bpf(), XDP attach, network namespaces); run: sudo make setup"
[ -e /proc/sys/net/core/bpf_jit_enable ] || die "this kernel has no BPF JIT (/proc/sys/net/core/bpf_jit_enable missing); natd needs CONFIG_BPF_SYSCALL and CONFIG_BPF_JIT"
[ -e /sys/kernel/btf/vmlinux ] || say "warning: /sys/kernel/btf/vmlinux missing (no BTF); BCC still works, bpftool output will be poorer"

# Debian packages: what the daemon, the lab, the tests and the benchmarks use. prometheus: the lab test
# runs the binary itself and the unit tests run promtool on contrib/prometheus; its system service is
# neither started nor enabled (below).
PKGS=(python3-bpfcc python3-venv linux-headers-amd64 libbpf1 bpftool iproute2 ethtool iputils-ping
      nftables conntrack iperf3 tcpdump socat traceroute nmap curl systemd gcc libc6-dev prometheus)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # Packaged services must not start during the install: policy-rc.d exiting 101 makes invoke-rc.d and
  # deb-systemd-invoke skip every start (Docker images ship one already; then it is left alone).
  own_policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT  # also when apt-get fails (set -e)
    own_policy=yes
  fi
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  if [ -n "$own_policy" ]; then
    rm -f /usr/sbin/policy-rc.d
    trap - EXIT
  fi
  # ... nor run at boot: natd's tests start their own prometheus (in a lab namespace, on a temp TSDB)
  if [[ " ${missing[*]} " == *" prometheus "* ]] && [ -d /run/systemd/system ]; then
    systemctl disable --now prometheus.service >/dev/null 2>&1 || true
    say "disabled the packaged prometheus.service (natd's tests run prometheus themselves)"
  fi
fi

# BCC compiles against /lib/modules/$(uname -r)/build; this kernel has no headers package of its own,
# so link Debian's newest linux-headers-*-amd64 (build) and -common (source).
kver=$(uname -r)
moddir=/lib/modules/$kver
if [ ! -e "$moddir/build/include" ]; then
  amd64=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n1)
  [ -n "$amd64" ] || die "no /usr/src/linux-headers-*-amd64 found; install linux-headers-amd64"
  common=${amd64%-amd64}-common
  [ -d "$common" ] || die "$common missing; install linux-headers-amd64 again"
  mkdir -p "$moddir"
  ln -sfn "$amd64" "$moddir/build"
  ln -sfn "$common" "$moddir/source"
  say "linked $moddir/build -> $amd64 and source -> $common (kernel $kver has no headers package; BCC needs them)"
fi

# bpffs for pinned maps (natd state that outlives the daemon). natd pins under /run/natd/bpf by default:
# `ip netns exec` remounts /sys (hiding /sys/fs/bpf) but leaves /run alone.
for d in /sys/fs/bpf /run/natd/bpf; do
  if ! mountpoint -q "$d"; then
    mkdir -p "$d"
    mount -t bpf bpf "$d"
    say "mounted bpffs at $d"
  fi
done

# venv with the system site-packages: that is where Debian's bcc module lives.
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  /usr/bin/python3 -m venv --system-site-packages "$VENV"
  say "created venv $VENV"
fi
stamp="$VENV/.natd-installed"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  "$VENV/bin/pip" install -q --disable-pip-version-check -e '.[test]'
  echo "$want" > "$stamp"
  say "installed natd into $VENV"
fi
"$VENV/bin/python" -c 'import bcc' 2>/dev/null || die "import bcc fails in $VENV; is python3-bpfcc installed and the venv made with --system-site-packages?"
