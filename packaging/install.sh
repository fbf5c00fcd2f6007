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
edited=$(mktemp)
trap 'rm -f "$edited"' EXIT
# The units and the post-install script name /usr/bin/forwarder, where the
# .deb and .rpm put it.
for unit in forwarder.service forwarder-input.service; do
    sed "s|/usr/bin/forwarder|$prefix/bin/forwarder|g" "$here/systemd/$unit" > "$edited"
    put 0644 "$edited" "/etc/systemd/system/$unit"
done
sed "s|/usr/bin/forwarder|$prefix/bin/forwarder|g" "$here/qubes/50-forwarder.sh" > "$edited"
put 0755 "$edited" /etc/qubes/post-install.d/50-forwarder.sh
for f in "$here"/examples/*; do
    put 0644 "$f" "/usr/share/doc/forwarder/examples/$(basename "$f")"
done
put 0644 "$here/doc/qubes.md" /usr/share/doc/forwarder/qubes.md
put 0644 "$here/doc/changelog" /usr/share/doc/forwarder/changelog

if [ -z "$root" ] && [ "$enable" = 1 ] && command -v systemctl >/dev/null 2>&1; then
    systemctl daemon-reload
    systemctl enable forwarder.service forwarder-input.service
    echo "enabled forwarder.service and forwarder-input.service (each runs only where its"
    echo "qvm-service, forwarder or forwarder-input, is enabled)"
fi
if [ -z "$root" ] && command -v qvm-features-request >/dev/null 2>&1; then
    /etc/qubes/post-install.d/50-forwarder.sh || true
fi
echo "done. Next, in dom0 (package forwarder-dom0): qvm-forwarder expose <qube> --localsend"
