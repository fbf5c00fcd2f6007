#!/bin/sh
# Installs the forwarder from this package.
#
#   ./install.sh [--root DIR] [--prefix DIR] [--no-enable]
#
# --root    install below DIR instead of / (for images and tests)
# --prefix  where the binary goes: PREFIX/bin/forwarder (default /usr, which
#           in a Qubes template reaches every VM based on it)
# --no-enable  install the systemd unit without enabling it
#
# Every installed file is listed in ROOT/var/lib/forwarder/installed-files,
# which uninstall.sh reads.
set -eu

root=""
prefix="/usr"
enable=1
while [ $# -gt 0 ]; do
    case "$1" in
        --root) root="${2:?--root needs a directory}"; shift 2 ;;
        --prefix) prefix="${2:?--prefix needs a directory}"; shift 2 ;;
        --no-enable) enable=0; shift ;;
        *) echo "install.sh: unknown option $1 (valid: --root DIR, --prefix DIR, --no-enable)" >&2; exit 2 ;;
    esac
done

here=$(cd "$(dirname "$0")" && pwd)
manifest_dir="$root/var/lib/forwarder"
manifest="$manifest_dir/installed-files"
mkdir -p "$manifest_dir"
: > "$manifest"

put() { # mode source destination
    mkdir -p "$(dirname "$root$3")"
    install -m "$1" "$2" "$root$3"
    echo "$3" >> "$manifest"
    echo "installed $root$3"
}

put 0755 "$here/bin/forwarder" "$prefix/bin/forwarder"
unit=$(mktemp)
trap 'rm -f "$unit"' EXIT
# The unit names /usr/bin/forwarder, where the .deb and .rpm put it.
sed "s|/usr/bin/forwarder|$prefix/bin/forwarder|g" "$here/systemd/forwarder.service" > "$unit"
put 0644 "$unit" /etc/systemd/system/forwarder.service
for f in "$here"/examples/*; do
    put 0644 "$f" "/usr/share/doc/forwarder/examples/$(basename "$f")"
done
put 0644 "$here/doc/qubes.md" /usr/share/doc/forwarder/qubes.md
put 0644 "$here/doc/changelog" /usr/share/doc/forwarder/changelog

if [ -z "$root" ] && [ "$enable" = 1 ] && command -v systemctl >/dev/null 2>&1; then
    systemctl daemon-reload
    systemctl enable forwarder.service
    echo "enabled forwarder.service (it runs only where the forwarder qvm-service is enabled"
    echo "and /rw/config/forwarder.toml exists)"
fi
echo "done. Next: write /rw/config/forwarder.toml (examples in /usr/share/doc/forwarder/examples),"
echo "then in dom0: qvm-service --enable <router-vm> forwarder"
