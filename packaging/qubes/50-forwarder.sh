#!/bin/sh
# Installed as /etc/qubes/post-install.d/50-forwarder.sh: Qubes runs it in
# a template after package installs (qubes.PostInstall) and tells dom0
# what the template supports. `qvm-forwarder check` reads these to say
# whether a router (forwarder) or an exposed qube (forwarder-input) has
# the package. A copy left behind after removal announces nothing.
[ -x /usr/bin/forwarder ] || exit 0
qvm-features-request supported-service.forwarder=1
qvm-features-request supported-service.forwarder-input=1
