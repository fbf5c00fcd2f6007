//! Why a program did not claim a packet, or dropped it. Counted per CPU in
//! `REASON_COUNTERS`, indexed by the discriminant; userspace prints the names.

/// What happened to a packet the program did not forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disposition {
    /// Returned to the stack untouched.
    Passed,
    /// Dropped by the forwarder.
    Dropped,
}

macro_rules! reasons {
    ($($variant:ident = $name:literal, $disposition:ident, $help:literal;)*) => {
        /// A skip or drop reason. The discriminant indexes `REASON_COUNTERS`.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Reason {
            $($variant,)*
        }

        impl Reason {
            pub const ALL: &'static [Reason] = &[$(Reason::$variant,)*];

            /// Stable snake_case name, used in `inspect` output and JSON.
            pub const fn name(self) -> &'static str {
                match self {
                    $(Reason::$variant => $name,)*
                }
            }

            pub const fn disposition(self) -> Disposition {
                match self {
                    $(Reason::$variant => Disposition::$disposition,)*
                }
            }

            /// One line for people reading `inspect`.
            pub const fn help(self) -> &'static str {
                match self {
                    $(Reason::$variant => $help,)*
                }
            }
        }
    };
}

reasons! {
    NotIpv4 = "not_ipv4", Passed, "EtherType is neither IPv4, IPv6 nor VLAN (ARP and the like)";
    Ipv6 = "ipv6", Passed, "IPv6 is not handled";
    Vlan = "vlan_tagged", Passed, "802.1Q/802.1ad tagged frames are not handled";
    Truncated = "truncated", Passed, "a header ends past the end of the packet";
    BadIpHeader = "bad_ip_header", Passed, "IP version is not 4 or IHL is below 5";
    IpOptions = "ip_options", Passed, "IPv4 header carries options";
    BadLength = "bad_length", Passed, "IP total length disagrees with the packet";
    Fragment = "fragment", Passed, "IPv4 fragments of anything but a relayed datagram are left to the stack";
    OtherProtocol = "other_protocol", Passed, "neither TCP nor UDP";
    NotUplink = "not_uplink", Passed, "uplink program ran on an interface that is not the current uplink";
    OtherDestination = "other_destination", Passed, "not addressed to the uplink's address";
    NoRule = "no_rule", Passed, "no forward rule for this protocol and port";
    RuleExpired = "rule_expired", Passed, "the rule's deadline has passed (the programs stop applying it themselves)";
    NoFlow = "no_flow", Passed, "from a forward target's port but no flow the LAN started (or it timed out): left to the stack and the VM's firewall";
    NoUplinkAddress = "no_uplink_address", Passed, "the uplink is down or has no IPv4 address";
    MartianSource = "martian_source", Passed, "source is zero, loopback, multicast, broadcast, reserved or the router's own";
    SourceNotAllowed = "source_not_allowed", Passed, "source is outside the rule's allow-from";
    ReversePathFailed = "reverse_path_failed", Passed, "source does not route back out of the interface it came in on";
    TtlExpired = "ttl_expired", Passed, "TTL would reach zero; the stack answers";
    TargetViaUplink = "target_via_uplink", Passed, "forward target routes back out of the uplink";
    PeerNotAllowed = "peer_not_allowed", Passed, "reply addressed to a peer the rule does not allow";
    ReplyNotViaUplink = "reply_not_via_uplink", Passed, "reply destination does not route out of the uplink";
    FibFwdDisabled = "fib_forwarding_disabled", Passed, "IPv4 forwarding is disabled on the ingress interface";
    FibNoRoute = "fib_no_route", Passed, "no usable route (unreachable, blackhole, prohibit, local or unsupported)";
    FibLookupRejected = "fib_lookup_rejected", Passed, "the kernel refused the FIB lookup's arguments (a flag it does not know)";
    FibFragNeeded = "fib_frag_needed", Passed, "packet exceeds the egress MTU; left to the stack";
    Reflected = "reflected", Passed, "multicast carrying this router's own MAC or address (reflected by an access point)";
    RelayNotTarget = "relay_not_target", Passed, "multicast to a relay group from a host that is not one of its targets";
    RelayRateLimited = "relay_rate_limited", Passed, "relay copy to the LAN suppressed by the relay's token bucket";
    RelayDownRateLimited = "relay_down_rate_limited", Passed, "relay copies toward the VMs suppressed by the relay's token bucket";
    RelayNoRoute = "relay_no_route", Passed, "no relay target routes through a downstream interface";
    RelayCloneFailed = "relay_clone_failed", Passed, "the kernel refused to clone a relay copy";
    RelayAnswerBlocked = "relay_answer_blocked", Passed, "a VM's mDNS answer is never relayed to the LAN: its records carry the VM's internal address";
    RelayCarriesAddress = "relay_carries_address", Passed, "a VM's datagram naming an internal address (as 4 bytes, dotted text or in-addr.arpa labels) is not relayed to the LAN";
    IcmpErrorDropped = "icmp_error_dropped", Dropped, "ICMP error quoting a forwarded flow from the downstream side";
    RewriteFailed = "rewrite_failed", Dropped, "the kernel refused a checksum update mid-rewrite";
    RelayUnscannable = "relay_unscannable", Passed, "a VM's datagram too long to scan for internal addresses (an IP packet over 1500 bytes) or not linear enough: not relayed to the LAN";
    FragmentOutOfOrder = "fragment_out_of_order", Passed, "a fragment of a relayed datagram that does not follow the one before it (a gap, an overlap, or past 64 KiB): not relayed";
    TcpOutOfWindow = "tcp_out_of_window", Passed, "a TCP reset outside the window the other side advertised: not believed, not forwarded";
}

impl Reason {
    pub const COUNT: u32 = Reason::ALL.len() as u32;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discriminants_are_dense_indexes() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{r:?}");
        }
    }

    #[test]
    fn names_are_unique_snake_case() {
        let mut seen = std::collections::HashSet::new();
        for r in Reason::ALL {
            assert!(seen.insert(r.name()), "duplicate {}", r.name());
            assert!(
                r.name()
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            );
            assert!(!r.help().is_empty());
        }
    }
}
