//! The one nftables object the forwarder owns: a nat chain that runs just
//! before Qubes' masquerade and keeps masquerade from handing a forwarded
//! port to an outbound connection. Without it, a connection masqueraded onto
//! the listen port would have its replies claimed by the datapath and sent
//! to the forward target instead of back through conntrack.

use std::{
    io::Write as _,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    rules::Rule,
    spec::{Ports, Proto},
};

pub const TABLE: &str = "forwarder";

/// The largest run of ports in 1024-65535 that holds no listen port, for
/// masquerade to pick from instead.
pub fn free_range(listen: &[Ports]) -> (u16, u16) {
    let mut taken: Vec<Ports> = listen.iter().copied().filter(|p| p.last >= 1024).collect();
    taken.sort_unstable();
    let mut best = (0u16, 0u16);
    let mut best_len = 0u32;
    let mut start: u32 = 1024;
    for (first, last) in taken
        .iter()
        .map(|p| (u32::from(p.first), u32::from(p.last)))
        .chain(std::iter::once((65536, 65536)))
    {
        if first > start && first - start > best_len {
            best_len = first - start;
            best = (start as u16, (first - 1) as u16);
        }
        start = start.max(last + 1);
    }
    best
}

fn ports_of(rules: &[Rule], proto: Proto) -> Vec<Ports> {
    rules
        .iter()
        .filter(|r| r.proto == proto)
        .map(|r| r.ports)
        .collect()
}

/// The complete table as one atomic nft transaction: create-then-delete
/// makes it idempotent, so a table left by a killed predecessor is replaced.
pub fn script(uplink: &str, rules: &[Rule]) -> String {
    let mut out = format!("table ip {TABLE}\ndelete table ip {TABLE}\ntable ip {TABLE} {{\n");
    let mut chain = String::new();
    for proto in [Proto::Tcp, Proto::Udp] {
        let ports = ports_of(rules, proto);
        // No uplink yet (a Qubes router before its first default route):
        // nothing is masqueraded out of it.
        if ports.is_empty() || uplink.is_empty() {
            continue;
        }
        let elements: Vec<String> = ports.iter().map(Ports::to_string).collect();
        out += &format!(
            "\tset {proto}_listen {{\n\t\ttype inet_service\n\t\tflags interval\n\t\telements = {{ {} }}\n\t}}\n",
            elements.join(", ")
        );
        let (lo, hi) = free_range(&ports);
        chain += &format!(
            "\t\toifname \"{uplink}\" {proto} sport @{proto}_listen masquerade to :{lo}-{hi}\n"
        );
    }
    out += "\tchain keep-listen-ports-free {\n\t\ttype nat hook postrouting priority srcnat - 1; policy accept;\n";
    out += &chain;
    out += "\t}\n}\n";
    out
}

/// Runs `nft` with `args`, writing `input` to its stdin when given;
/// returns what it printed. A refusal names the command, nft's words and
/// the input.
pub fn run(args: &[&str], input: Option<&str>) -> Result<String> {
    let mut child = Command::new("nft")
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running nft (the forwarder needs nftables installed)")?;
    if let Some(input) = input {
        child
            .stdin
            .take()
            .context("nft stdin")?
            .write_all(input.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "nft {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim(),
            input.map(|i| format!("\n{i}")).unwrap_or_default()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn nft(input: &str) -> Result<()> {
    run(&["-f", "-"], Some(input)).map(drop)
}

/// Installs the table on a blocking thread: `nft` takes milliseconds the
/// daemon's event loop must not wait through.
pub async fn install_off_thread(uplink: &str, rules: &[Rule]) -> Result<()> {
    let script = script(uplink, rules);
    tokio::task::spawn_blocking(move || nft(&script)).await?
}

/// Removes the table if it is there; returns whether it was.
pub fn remove() -> Result<bool> {
    let listed = run(&["list", "table", "ip", TABLE], None).is_ok();
    // Create-then-delete: gone either way, even if it appeared meanwhile.
    nft(&format!("table ip {TABLE}\ndelete table ip {TABLE}\n"))?;
    Ok(listed)
}

/// Removes the table, on a blocking thread.
pub async fn remove_off_thread() -> Result<()> {
    tokio::task::spawn_blocking(remove).await?.map(drop)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::{rules::Origin, spec::AllowFrom};

    #[test]
    fn free_range_avoids_every_listen_port() {
        let one = |ports: &[u16]| -> Vec<Ports> { ports.iter().map(|p| Ports::one(*p)).collect() };
        assert_eq!(free_range(&[]), (1024, 65535));
        assert_eq!(free_range(&one(&[53317])), (1024, 53316));
        assert_eq!(free_range(&one(&[2000])), (2001, 65535));
        assert_eq!(free_range(&one(&[80, 443])), (1024, 65535));
        assert_eq!(free_range(&one(&[65535])), (1024, 65534));
        assert_eq!(free_range(&one(&[1024])), (1025, 65535));
        let many: Vec<u16> = (0..10_000).map(|i| 1024 + i * 6).collect();
        let (lo, hi) = free_range(&one(&many));
        assert!(many.iter().all(|p| *p < lo || *p > hi));
        assert!(hi - lo > 1000);
        let ranges = [
            Ports {
                first: 20000,
                last: 60000,
            },
            Ports {
                first: 1714,
                last: 1764,
            },
            Ports::one(30000),
        ];
        assert_eq!(
            free_range(&ranges),
            (1765, 19999),
            "ranges are skipped whole"
        );
    }

    #[test]
    fn script_has_one_rule_per_protocol() {
        let rule = |proto, port| {
            Rule::new(
                proto,
                Ports::one(port),
                Ipv4Addr::new(10, 137, 0, 5),
                port,
                AllowFrom::Auto,
                Origin::Flag,
            )
        };
        let s = script(
            "wls6f0",
            &[
                rule(Proto::Tcp, 53317),
                rule(Proto::Udp, 53317),
                rule(Proto::Tcp, 8080),
            ],
        );
        assert!(s.contains("elements = { 53317, 8080 }"), "{s}");
        assert!(s.contains("flags interval"), "{s}");
        assert!(
            s.contains("oifname \"wls6f0\" tcp sport @tcp_listen masquerade to :8081-53316"),
            "{s}"
        );
        assert!(
            s.contains("oifname \"wls6f0\" udp sport @udp_listen masquerade to :1024-53316"),
            "{s}"
        );
        let no_uplink = script("", &[rule(Proto::Tcp, 53317)]);
        assert!(!no_uplink.contains("oifname"), "{no_uplink}");
        let empty = script("eth0", &[]);
        assert!(!empty.contains("masquerade"));
        assert!(empty.contains("priority srcnat - 1"));
    }
}
