//! tc's view of an interface's ingress hook. On kernels before 6.6 the
//! forwarder attaches clsact filters, which are no file descriptor of the
//! process: they outlive a killed daemon, so restarts and leak checks count
//! them.

use std::process::Command;

use anyhow::Result;

use crate::netns::run;

/// One line per filter on `dev`'s ingress hook in network namespace
/// `netns`, as `tc filter show` prints it (with the program's name and
/// id); none without a clsact qdisc.
pub fn ingress_filters(netns: &str, dev: &str) -> Result<Vec<String>> {
    let qdiscs = run(Command::new("tc").args(["-n", netns, "qdisc", "show", "dev", dev]))?;
    if !qdiscs.contains("qdisc clsact") && !qdiscs.contains("qdisc ingress") {
        return Ok(Vec::new());
    }
    let out = run(Command::new("tc").args(["-n", netns, "filter", "show", "dev", dev, "ingress"]))?;
    // tc prints a header line per priority and one line per filter, the
    // latter with its handle.
    Ok(out
        .lines()
        .filter(|l| l.contains(" handle "))
        .map(str::to_string)
        .collect())
}
