//! One forward rule as people and scripts see it, the same for `rules
//! list` (answered by the daemon) and `inspect` (read from the pins).

use std::net::Ipv4Addr;

use forwarder_common::maps::{ALLOW_ANY, ALLOW_AUTO, Allow, ForwardRule, RuleCounters};
use serde::{Deserialize, Serialize};

use crate::{
    rules::Origin,
    spec::{Ports, Proto},
};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleView {
    pub proto: String,
    pub port: u16,
    /// The last port of a range; equal to `port` for one port.
    pub port_end: u16,
    pub target: Ipv4Addr,
    pub target_port: u16,
    pub allow_from: String,
    /// Seconds until the datapath stops applying the rule.
    pub expires_in_secs: Option<u64>,
    pub packets_in: u64,
    pub bytes_in: u64,
    pub packets_out: u64,
    pub bytes_out: u64,
    /// Flows of the rule that have not timed out.
    pub flows: u64,
    /// Only the daemon knows these; `inspect` leaves them out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<Origin>,
}

/// An allow-from as the map holds it, in the form operators write it.
pub fn allow_text(allow: &Allow) -> String {
    match allow.kind {
        ALLOW_ANY => "any".into(),
        ALLOW_AUTO => "auto".into(),
        _ => allow
            .cidrs
            .iter()
            .take(usize::from(allow.n_cidrs))
            .map(|c| {
                let prefix = u32::from_be(c.mask).leading_ones();
                format!("{}/{prefix}", Ipv4Addr::from(c.addr.to_ne_bytes()))
            })
            .collect::<Vec<_>>()
            .join(","),
    }
}

impl RuleView {
    /// The view of an installed rule, its counters and its live flows, at
    /// `now_ns` on the datapath's clock.
    pub fn new(
        proto: u8,
        ports: Ports,
        rule: &ForwardRule,
        counters: &RuleCounters,
        flows: u64,
        now_ns: u64,
    ) -> Self {
        RuleView {
            proto: Proto::from_number(proto).map_or_else(|| proto.to_string(), |p| p.to_string()),
            port: ports.first,
            port_end: ports.last,
            target: Ipv4Addr::from(rule.target_addr.to_ne_bytes()),
            target_port: u16::from_be(rule.target_port),
            allow_from: allow_text(&rule.allow),
            expires_in_secs: (rule.deadline_ns != 0).then(|| {
                rule.deadline_ns
                    .saturating_sub(now_ns)
                    .div_ceil(1_000_000_000)
            }),
            packets_in: counters.packets_in,
            bytes_in: counters.bytes_in,
            packets_out: counters.packets_out,
            bytes_out: counters.bytes_out,
            flows,
            comment: None,
            origin: None,
        }
    }

    fn ports(&self) -> Ports {
        Ports {
            first: self.port,
            last: self.port_end,
        }
    }

    /// The name operators use for it: `tcp:8080`, `tcp:1714-1764`.
    pub fn name(&self) -> String {
        format!("{}:{}", self.proto, self.ports())
    }

    /// Where it forwards: `10.137.0.5:80`, `10.137.0.5:1714-1764`.
    pub fn target_text(&self) -> String {
        let shifted = self
            .ports()
            .starting_at(self.target_port)
            .unwrap_or(self.ports());
        format!("{}:{}", self.target, shifted)
    }
}

/// How long the datapath keeps applying a rule, for people.
pub fn expires_text(secs: Option<u64>) -> String {
    match secs {
        None => "never".into(),
        Some(0) => "expired".into(),
        Some(s) => humantime::format_duration(std::time::Duration::from_secs(s)).to_string(),
    }
}
