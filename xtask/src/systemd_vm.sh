#!/bin/bash
# Runs inside the Debian 12 VM of `cargo xtask systemd-test` as the oneshot
# unit forwarder-vm-test.service, with systemd as PID 1. It installs the
# .deb from the 9p share, drives forwarder.service with systemctl, and
# writes one line per check to $share/results.tsv:
#     NAME <TAB> PASS|FAIL <TAB> what was measured
# then "END" when it got to the end. The VM powers off when it exits.
#
# The VM's root namespace is the router (uplink0 towards the LAN, vif1.0
# towards the app VM, as Qubes names it); the LAN peer and the app VM are
# network namespaces. Everything waits on a condition with a deadline.
# Everything runs ~10x slower than native under TCG: shell and small tools.

set -u
share=/mnt/share
results=$share/results.tsv
: > "$results"
export DEBIAN_FRONTEND=noninteractive
deb=$(cd "$share" && ls forwarder_*.deb)

LAN_PEER=192.168.1.2
UPLINK_ADDR=192.168.1.1
APP=10.137.0.17
GROUP=224.0.0.167
PORT=53317
CONFIG=/rw/config/forwarder.toml

us() { echo "${EPOCHREALTIME/./}"; }
# seconds since a us timestamp, one decimal
since() { local ms=$((($(us) - $1) / 1000)); printf '%d.%d s' $((ms / 1000)) $((ms % 1000 / 100)); }

record() { # NAME PASS|FAIL DETAIL
    printf '%s\t%s\t%s\n' "$1" "$2" "$3" >> "$results"
    echo "forwarder-vm-test: $2 $1: $3"
}
pass() { record "$1" PASS "$2"; }
fail() { record "$1" FAIL "$2"; }

# wait_until SECONDS CMD...: CMD every 0.2 s until it succeeds, for at most SECONDS.
wait_until() {
    local deadline=$(($(us) + $1 * 1000000))
    shift
    until "$@"; do
        [ "$(us)" -lt "$deadline" ] || return 1
        sleep 0.2
    done
}

prop() { systemctl show -p "$1" --value forwarder.service; }

# Every path on the root filesystem but logs, caches, apt's and dpkg's own
# bookkeeping and temporary files: what a package may leave behind.
snapshot() {
    find / -xdev \( -path /var/log -o -path /var/cache -o -path /var/lib/apt \
        -o -path '/var/lib/dpkg/*-old' -o -path /tmp -o -path /var/tmp \) -prune -o -print | sort
}

topology() {
    ip netns add lan && ip netns add app &&
        ip link add uplink0 type veth peer name eth0 netns lan &&
        ip link add vif1.0 type veth peer name eth0 netns app &&
        ip addr add "$UPLINK_ADDR/24" dev uplink0 && ip link set uplink0 up &&
        ip addr add 10.137.0.1/32 dev vif1.0 && ip link set vif1.0 up &&
        ip route add "$APP/32" dev vif1.0 &&
        ip -n lan link set lo up && ip -n lan addr add "$LAN_PEER/24" dev eth0 &&
        ip -n lan link set eth0 up && ip -n lan route add default via "$UPLINK_ADDR" &&
        ip -n app link set lo up && ip -n app addr add "$APP/32" dev eth0 &&
        ip -n app link set eth0 up && ip -n app route add 10.137.0.1/32 dev eth0 &&
        ip -n app route add default via 10.137.0.1 dev eth0 &&
        sysctl -qw net.ipv4.ip_forward=1
}

# socat runs one of these per connection or datagram: the line it got, and
# the addresses it came from and was sent to, as the receiver saw them.
# (Through sh: /run is mounted noexec.)
cat > /run/tcp-note <<'EOF'
#!/bin/sh
read -r line
echo "$line seen-from $SOCAT_PEERADDR"
EOF
cat > /run/udp-note <<'EOF'
#!/bin/sh
printf '%s from %s to %s\n' "$(cat)" "$SOCAT_PEERADDR" "$SOCAT_IP_DSTADDR" >> "$1"
EOF

servers() {
    ip netns exec app socat TCP-LISTEN:$PORT,reuseaddr,fork EXEC:"/bin/sh /run/tcp-note" &
    for ns in app lan; do
        : > /run/$ns-udp.log
        ip netns exec $ns socat -u \
            UDP-RECVFROM:$PORT,reuseaddr,fork,ip-pktinfo,ip-add-membership=$GROUP:eth0 \
            EXEC:"/bin/sh /run/udp-note /run/$ns-udp.log" &
    done
}

tcp_echo() { # TOKEN: the app's reply through the router's uplink address
    echo "$1" | ip netns exec lan timeout 10 socat -T 3 - TCP:$UPLINK_ADDR:$PORT,connect-timeout=3 2>/dev/null
}

# tcp_check NAME TOKEN: a LAN peer's connection to the uplink's port reaches
# the app, which sees the peer's own address.
tcp_check() {
    local t0 reply
    t0=$(us)
    reply=""
    tcp_reply() { reply=$(tcp_echo "$1") && [ "$reply" = "$1 seen-from $LAN_PEER" ]; }
    if wait_until 20 tcp_reply "$2"; then
        pass "$1" "LAN $LAN_PEER -> $UPLINK_ADDR:$PORT reached the app as \"$reply\" within $(since "$t0")"
    else
        fail "$1" "no echo through $UPLINK_ADDR:$PORT in 20 s (last reply: \"$reply\")"
    fi
}

# udp_check NAME SENDER_NS DESTINATION LOG EXPECTED: datagrams from
# SENDER_NS to DESTINATION, once per 0.5 s, until LOG has the EXPECTED line.
udp_check() {
    local name=$1 ns=$2 dst=$3 log=$4 expected=$5 t0 n=0
    t0=$(us)
    sent_and_seen() {
        n=$((n + 1))
        echo "${expected%% *}" | ip netns exec "$ns" socat -u - UDP-DATAGRAM:"$dst":$PORT,ip-multicast-ttl=1 2>/dev/null
        for _ in 1 2 3; do
            grep -qxF "$expected" "$log" && return 0
            sleep 0.2
        done
        return 1
    }
    if wait_until 20 sent_and_seen; then
        pass "$name" "\"$expected\" after $n datagram(s), $(since "$t0")"
    else
        fail "$name" "no \"$expected\" in 20 s after $n datagrams; got: $(tr '\n' ';' < "$log")"
    fi
}

leftovers() { # what a stopped forwarder must not leave: pins, programs, tc hooks, nft table
    local out=""
    [ -e /sys/fs/bpf/forwarder ] && out+="pins: $(find /sys/fs/bpf/forwarder | tr '\n' ' '); "
    local progs
    progs=$(bpftool prog show 2>/dev/null | grep -E 'uplink_ingress|downstream_ingr')
    [ -n "$progs" ] && out+="programs: $(echo "$progs" | tr '\n' ' '); "
    local hooks
    hooks=$(bpftool net show 2>/dev/null | grep -E 'uplink_ingress|downstream_ingr')
    [ -n "$hooks" ] && out+="tc/tcx hooks: $(echo "$hooks" | tr '\n' ' '); "
    nft list table ip forwarder >/dev/null 2>&1 && out+="nft table ip forwarder; "
    pgrep -x forwarder >/dev/null && out+="forwarder process $(pgrep -x forwarder); "
    echo "$out"
}

echo "forwarder-vm-test: kernel $(uname -r), $(systemctl --version | head -1)"

# The user's config lives in /rw/config before the package arrives, as in
# a Qubes router VM, and must outlive its removal.
mkdir -p /rw/config
cat > "$CONFIG" <<EOF
# the VM's root namespace is the router: LAN on uplink0, the app VM behind vif1.0
uplink = "uplink0"
localsend = "$APP"
EOF
config_sum=$(sha256sum "$CONFIG")
snapshot > /run/before

cp "$share/$deb" /tmp/
t0=$(us)
if timeout 300 apt-get install -y "/tmp/$deb" > "$share/apt-install.log" 2>&1; then
    pass "apt install the .deb" "apt-get install /tmp/$deb: $(dpkg-query -W -f '${Version}' forwarder) in $(since "$t0")"
else
    fail "apt install the .deb" "apt-get install /tmp/$deb: exit $?: $(tail -3 "$share/apt-install.log" | tr '\n' ' ')"
fi
rm -f "/tmp/$deb"

enabled=$(systemctl is-enabled forwarder.service 2>&1)
if [ "$enabled" = enabled ] && [ -L /etc/systemd/system/multi-user.target.wants/forwarder.service ]; then
    pass "enabled on install" "is-enabled: $enabled (multi-user.target.wants)"
else
    fail "enabled on install" "is-enabled: $enabled"
fi

# The postinst already tried to start it; try again: the condition holds it.
systemctl start forwarder.service
if [ "$(prop ActiveState)" = inactive ] && [ "$(prop ConditionResult)" = no ] && ! pgrep -x forwarder >/dev/null; then
    pass "no gate, no start" "without /run/qubes-service/forwarder: inactive, ConditionResult=no, no process"
else
    fail "no gate, no start" "ActiveState=$(prop ActiveState) ConditionResult=$(prop ConditionResult)"
fi

topology || fail "topology" "could not build the namespaces"
servers

mkdir -p /run/qubes-service && touch /run/qubes-service/forwarder
t0=$(us)
systemctl start --no-block forwarder.service
active() { [ "$(prop ActiveState)" = active ]; }
if wait_until 120 active; then
    pass "start with the gate" "active (READY=1) $(since "$t0") after systemctl start, MainPID $(prop MainPID)"
else
    fail "start with the gate" "ActiveState=$(prop ActiveState) SubState=$(prop SubState) after 120 s: no READY=1"
fi

attached() {
    journalctl -b -u forwarder.service -o cat --no-pager > /run/journal.txt
    grep -q "program to uplink0" /run/journal.txt && grep -q "program to vif1.0" /run/journal.txt
}
if wait_until 30 attached; then
    pass "journal shows the attach" "$(grep -oE '(attached|adopted) .* program to (uplink0|vif1.0)' /run/journal.txt | paste -sd ';')"
else
    fail "journal shows the attach" "journalctl -u forwarder: $(tail -5 /run/journal.txt | paste -sd ';')"
fi

tcp_check "tcp forwarded" "tcp-1"
udp_check "udp forwarded" lan $UPLINK_ADDR /run/app-udp.log "udp-1 from $LAN_PEER to $APP"
udp_check "multicast relayed LAN -> app" lan $GROUP /run/app-udp.log "lan-announce from $LAN_PEER to $GROUP"
udp_check "multicast relayed app -> LAN" app $GROUP /run/lan-udp.log "app-announce from $UPLINK_ADDR to $GROUP"

# The watchdog: a daemon frozen with SIGSTOP stops pinging it; systemd kills
# and restarts it. Meanwhile the programs it attached keep forwarding.
frozen=$(prop MainPID)
restarts=$(prop NRestarts)
t0=$(us)
kill -STOP "$frozen"
tcp_check "tcp while the daemon is frozen" "tcp-frozen"
replaced() { local pid; pid=$(prop MainPID); [ "$pid" != 0 ] && [ "$pid" != "$frozen" ] && active; }
restarted=no
if wait_until 90 replaced; then
    restarted=yes
    detail="PID $frozen (SIGSTOP) replaced by $(prop MainPID), active again $(since "$t0") later, NRestarts $restarts -> $(prop NRestarts)"
    if journalctl -b -u forwarder.service -o cat --no-pager | grep -q "Watchdog timeout"; then
        pass "watchdog restarts a frozen daemon" "$detail; journal: $(journalctl -b -u forwarder.service -o cat --no-pager | grep -m1 'Watchdog timeout')"
    else
        fail "watchdog restarts a frozen daemon" "$detail, but no \"Watchdog timeout\" in the journal"
    fi
else
    fail "watchdog restarts a frozen daemon" "after 90 s: MainPID $(prop MainPID) ActiveState $(prop ActiveState) NRestarts $(prop NRestarts)"
    kill -CONT "$frozen" 2>/dev/null
fi
if [ $restarted = yes ]; then
    tcp_check "tcp after the restart" "tcp-2"
else
    fail "tcp after the restart" "no restart happened"
fi

t0=$(us)
timeout 120 systemctl stop forwarder.service
stop_time=$(since "$t0")
left=$(leftovers)
if [ "$(prop ActiveState)" = inactive ] && [ -z "$left" ]; then
    pass "systemctl stop cleans up" "inactive after $stop_time; no pins under /sys/fs/bpf/forwarder, no programs, no tc/tcx hooks, no nft table"
else
    fail "systemctl stop cleans up" "ActiveState=$(prop ActiveState) after $stop_time; left: $left"
fi

# apt remove of a running service: the prerm stops it, the postrm forgets
# the enablement; nothing but the user's config stays, and dpkg's record of
# the package (its file list and the postrm a later purge runs).
systemctl start forwarder.service
wait_until 120 active
was=$(prop ActiveState)
dpkg_record="/var/lib/dpkg/info/forwarder.list /var/lib/dpkg/info/forwarder.postrm "
# package_gone STEP: compares the filesystem with the one before the install.
package_gone() {
    snapshot > "/run/after-$1"
    added=$(comm -13 /run/before "/run/after-$1" | tr '\n' ' ')
    gone=$(comm -23 /run/before "/run/after-$1" | tr '\n' ' ')
    left=$(leftovers)
    state=$(dpkg-query -W -f '${db:Status-Status}' forwarder 2>/dev/null || echo not-installed)
    [ -z "$gone$left" ] && [ "$(sha256sum "$CONFIG")" = "$config_sum" ]
}
t0=$(us)
timeout 300 apt-get remove -y forwarder > "$share/apt-remove.log" 2>&1
status=$?
took=$(since "$t0")
if package_gone remove && [ "$status" = 0 ] &&
    { { [ "$state" = config-files ] && [ "$added" = "$dpkg_record" ]; } ||
        { [ "$state" = not-installed ] && [ -z "$added" ]; }; }; then
    pass "apt remove leaves only the user's config" "removed a running ($was) service in $took; dpkg: $state, keeping [$added]; all other files as before the install; $CONFIG unchanged"
else
    fail "apt remove leaves only the user's config" "exit $status, was $was, dpkg: $state; new: [$added] vanished: [$gone] left: [$left]"
fi
t0=$(us)
timeout 300 apt-get purge -y forwarder > "$share/apt-purge.log" 2>&1
status=$?
took=$(since "$t0")
if package_gone purge && [ "$status" = 0 ] && [ "$state" = not-installed ] && [ -z "$added" ]; then
    pass "apt purge forgets the rest" "in $took; dpkg: $state; every file as before the install; $CONFIG unchanged"
else
    fail "apt purge forgets the rest" "exit $status, dpkg: $state; new: [$added] vanished: [$gone] left: [$left]"
fi

journalctl -b --no-pager > "$share/journal.txt" 2>&1
echo END >> "$results"
