//! The interface of this network namespace's IPv4 default route, as
//! `/proc/net/route` lists the main table: a Qubes router's uplink when
//! none is given (eth0 in sys-firewall; in sys-net whichever NIC
//! NetworkManager connected, which can change).

use std::io;

/// The interface of the default route with the lowest metric, if any.
pub fn interface() -> io::Result<Option<String>> {
    Ok(parse(&std::fs::read_to_string("/proc/net/route")?))
}

/// `/proc/net/route`: a header, then `Iface Destination Gateway Flags
/// RefCnt Use Metric Mask …` a line, addresses in hex.
pub fn parse(table: &str) -> Option<String> {
    const RTF_UP: u32 = 0x1;
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [iface, destination, _, flags, _, _, metric, mask, ..] = fields[..] else {
                return None;
            };
            let flags = u32::from_str_radix(flags, 16).ok()?;
            let default = destination == "00000000" && mask == "00000000";
            let metric = metric.parse::<u32>().ok()?;
            (default && flags & RTF_UP != 0).then_some((metric, iface))
        })
        .min()
        .map(|(_, iface)| iface.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str =
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n";

    #[test]
    fn the_default_route_with_the_lowest_metric_wins() {
        let table = format!(
            "{HEADER}\
             vif3.0\t110089A0\t00000000\t0005\t0\t0\t32752\tFFFFFFFF\t0\t0\t0\n\
             wlan0\t00000000\t0101A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0\n\
             eth0\t00000000\t0101A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n\
             eth0\t0001A8C0\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0\n"
        );
        assert_eq!(parse(&table).as_deref(), Some("eth0"));
    }

    #[test]
    fn no_default_route_is_none() {
        let table = format!(
            "{HEADER}eth0\t0001A8C0\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0\n\
             eth1\t00000000\t0101A8C0\t0002\t0\t0\t100\t00000000\t0\t0\t0\n"
        );
        assert_eq!(parse(&table), None, "a route that is not up does not count");
        assert_eq!(parse(""), None);
        assert_eq!(parse(&format!("{HEADER}garbage\n")), None);
    }
}
