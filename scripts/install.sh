#!/usr/bin/env bash
# Install natd on this host (the Makefile's `install` target): idempotent, run as root.
#
#   /opt/natd                          venv with natd (--system-site-packages: Debian's bcc module lives there)
#   /usr/local/bin/natd, natctl        symlinks into the venv: the paths systemd/natd.service runs
#   /usr/local/share/natd/ebpf         the C datapath BCC compiles at every start (NATD_EBPF_DIR in the unit)
#   /usr/local/lib/systemd/system/natd.service
#                                      systemd's search path for locally installed units; /etc/systemd/system
#                                      stays the admin's (systemctl edit natd)
#   /etc/natd/natd.yaml                from contrib/natd.yaml, only if there is none
#
# Why a venv and not `pip install` into the system: Debian's Python is "externally managed" (PEP 668), and
# a plain `pip install --break-system-packages` would put the scripts in /usr/local/bin anyway, mixed with
# Debian's site-packages. The symlinks keep the unit's paths independent of where the venv is.
set -euo pipefail
cd "$(dirname "$0")/.."

# Overridable for tests; the unit's paths assume the defaults.
VENV=${VENV:-/opt/natd}
BIN=${BIN:-/usr/local/bin}
SHARE=${SHARE:-/usr/local/share/natd}
UNITDIR=${UNITDIR:-/usr/local/lib/systemd/system}
CONFDIR=${CONFDIR:-/etc/natd}

die() { echo "install: error: $*" >&2; exit 1; }
say() { echo "install: $*"; }

[ "$(id -u)" = 0 ] || die "run as root: sudo make install"
/usr/bin/python3 -c 'import bcc' 2>/dev/null || die "python3 cannot import bcc; run 'make setup' first (installs python3-bpfcc)"

if [ ! -x "$VENV/bin/python" ]; then
  /usr/bin/python3 -m venv --system-site-packages "$VENV"
  say "created venv $VENV"
fi
# Build from a scratch copy: setuptools would leave build/ behind in the source tree.
src=$(mktemp -d "${TMPDIR:-/tmp}/natd-install.XXXXXX")
trap 'rm -rf "$src"' EXIT
cp -r pyproject.toml README.md natd netns-lab "$src/"
"$VENV/bin/pip" install -q --disable-pip-version-check --upgrade "$src"
for cmd in natd natctl; do
  ln -sfn "$VENV/bin/$cmd" "$BIN/$cmd"
done
version=$("$BIN/natd" --version) || die "the installed $BIN/natd does not run (above)"
say "installed $version into $VENV; commands in $BIN"

rm -rf "$SHARE/ebpf.new"
mkdir -p "$SHARE"
cp -r ebpf "$SHARE/ebpf.new"
chmod -R u=rwX,go=rX "$SHARE/ebpf.new"
rm -rf "$SHARE/ebpf"
mv "$SHARE/ebpf.new" "$SHARE/ebpf"
say "C datapath in $SHARE/ebpf"

install -D -m 0644 systemd/natd.service "$UNITDIR/natd.service"
say "unit in $UNITDIR/natd.service"

install -d -m 0755 "$CONFDIR"
if [ ! -e "$CONFDIR/natd.yaml" ]; then
  install -m 0640 contrib/natd.yaml "$CONFDIR/natd.yaml"
  say "example config in $CONFDIR/natd.yaml: set inside, outside and snat for this host"
else
  say "kept the existing $CONFDIR/natd.yaml"
fi
"$BIN/natd" --check-config "$CONFDIR/natd.yaml" >/dev/null || say "warning: $CONFDIR/natd.yaml does not validate (above)"

if [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  say "next: systemctl enable --now natd   (reload: systemctl reload natd; logs: journalctl -u natd)"
else
  say "systemd is not running here; the unit is installed for when it is"
fi
