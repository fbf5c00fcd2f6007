#!/bin/sh
# Removes what install.sh installed, stopping the service first. Leaves
# /rw/config/forwarder.toml alone: it is the operator's.
#
#   ./uninstall.sh [--root DIR]
set -eu

root=""
while [ $# -gt 0 ]; do
    case "$1" in
        --root) root="${2:?--root needs a directory}"; shift 2 ;;
        *) echo "uninstall.sh: unknown option $1 (valid: --root DIR)" >&2; exit 2 ;;
    esac
done

manifest="$root/var/lib/forwarder/installed-files"
if [ ! -f "$manifest" ]; then
    echo "uninstall.sh: $manifest not found: nothing installed here" >&2
    exit 1
fi
if [ -z "$root" ] && command -v systemctl >/dev/null 2>&1; then
    # Stopping runs the daemon's clean shutdown: programs, links, pins and
    # its nftables table go with it.
    systemctl disable --now forwarder.service forwarder-input.service 2>/dev/null || true
    systemctl daemon-reload
fi
# Then what a daemon that had died could not remove itself, while the
# binary is still there.
binary=$(grep '/bin/forwarder$' "$manifest" | head -n 1)
if [ -z "$root" ] && [ -n "$binary" ] && [ -x "$binary" ]; then
    "$binary" teardown || true
    "$binary" input --remove || true
fi
while read -r path; do
    rm -f "$root$path" && echo "removed $root$path"
done < "$manifest"
rm -f "$manifest"
rmdir "$root/var/lib/forwarder" "$root/usr/share/doc/forwarder/examples" "$root/usr/share/doc/forwarder" 2>/dev/null || true
# Left when empty, as on a system that is not a Qubes template.
rmdir "$root/etc/qubes/post-install.d" "$root/etc/qubes" 2>/dev/null || true
echo "done"
