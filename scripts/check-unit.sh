#!/usr/bin/env bash
# Check systemd/natd.service: `systemd-analyze verify` must print nothing at all (any warning fails),
# and record `systemd-analyze security --offline=yes` in REPORT for review (without REPORT, only its
# overall exposure line is printed).
#
# usage: scripts/check-unit.sh [REPORT [UNIT]]      (UNIT defaults to systemd/natd.service)
#
# verify checks that every Exec*= binary exists, but /usr/local/bin/natd only exists once
# scripts/install.sh ran. So verify runs with --root on a throw-away tree: this host's unit directory (for
# the dependencies: network-online.target...), the unit, a stand-in for /usr/local/bin/natd and a copy of
# every other Exec*= binary from this host (a missing one, say a typo in /bin/kill, still fails).
# Needs no root and no running systemd.
set -euo pipefail

die() { echo "check-unit: $*" >&2; exit 1; }

[ $# -le 2 ] || die "usage: $0 [REPORT [UNIT]]"
report=${1:+$(realpath -m "$1")}   # relative to the caller's directory, not the repository's
unit=${2:+$(realpath -m "$2")}
cd "$(dirname "$0")/.."
unit=${unit:-systemd/natd.service}
name=$(basename "$unit")
installed_bin=/usr/local/bin/natd   # what scripts/install.sh creates

command -v systemd-analyze >/dev/null || die "systemd-analyze not found (Debian: apt-get install systemd)"
[ -f "$unit" ] || die "$unit not found"
units_dir=$(readlink -f /lib/systemd/system 2>/dev/null || true)
[ -d "$units_dir" ] || die "no systemd unit directory at /lib/systemd/system to resolve dependencies"

root=$(mktemp -d "${TMPDIR:-/tmp}/natd-unit.XXXXXX")
trap 'rm -rf "$root"' EXIT
[ -n "$report" ] || report=$root/security.txt

# merged-/usr layout, so /bin/x and /usr/bin/x both resolve inside the tree
mkdir -p "$root/usr/bin" "$root/usr/sbin" "$root/usr/lib/systemd" "$root/etc/systemd/system"
ln -s usr/bin "$root/bin"
ln -s usr/sbin "$root/sbin"
ln -s usr/lib "$root/lib"
cp -a "$units_dir" "$root/usr/lib/systemd/system"
cp "$unit" "$root/etc/systemd/system/$name"

# Exec*= lines: drop the special prefixes (@ - : + !), keep the binary
sed -n -E 's/^Exec[A-Za-z]*=[-@:+!]*([^ ]+).*/\1/p' "$unit" | sort -u | while read -r bin; do
  mkdir -p "$root$(dirname "$bin")"
  if [ "$bin" = "$installed_bin" ]; then
    printf '#!/bin/sh\nexit 0\n' > "$root$bin"
    chmod 755 "$root$bin"
  elif [ -x "$bin" ]; then
    cp -L "$bin" "$root$bin"
  else
    die "$unit runs $bin, which is not an executable on this host"
  fi
done

set +e
out=$(systemd-analyze verify --root="$root" "$name" 2>&1)
rc=$?
set -e
if [ $rc -ne 0 ] || [ -n "$out" ]; then
  echo "$out" >&2
  die "systemd-analyze verify $unit: exit $rc, output above (it must print nothing)"
fi

systemd-analyze security --offline=yes "$unit" > "$report" 2>&1 || true
grep -q "Overall exposure level" "$report" || { cat "$report" >&2; die "systemd-analyze security failed"; }
exposure=$(grep -o 'Overall exposure level.*' "$report")
if [ "$report" = "$root/security.txt" ]; then
  echo "$unit: verify clean; $exposure"
else
  echo "$unit: verify clean; $exposure; security review in $report"
fi
