//! The result lines of `vmcheck kernel` (`VMCHECK <id> <status> [<t>s]
//! <detail>`, then `VMCHECK-END`), gathered per kernel into one table.

use std::{fmt::Write as _, time::Duration};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    pub id: String,
    pub status: String,
    pub detail: String,
}

/// One kernel's run.
pub struct Row {
    pub kernel: String,
    pub release: String,
    pub checks: Vec<Check>,
    pub wall: Duration,
}

const PREFIX: &str = "VMCHECK ";
const END: &str = "VMCHECK-END";
/// The check that stands for the VM itself: it booted, ran every check to
/// the end and powered off in time.
pub const VM_CHECK: &str = "vm";

/// The checks a results file reports, and whether the run got to its end.
pub fn parse(text: &str) -> (Vec<Check>, bool) {
    let mut checks = Vec::new();
    let mut complete = false;
    for line in text.lines() {
        if line.trim() == END {
            complete = true;
        } else if let Some(rest) = line.strip_prefix(PREFIX) {
            let mut words = rest.splitn(3, ' ');
            let (Some(id), Some(status)) = (words.next(), words.next()) else {
                continue;
            };
            checks.push(Check {
                id: id.to_string(),
                status: status.to_string(),
                detail: words.next().unwrap_or_default().to_string(),
            });
        }
    }
    (checks, complete)
}

impl Row {
    pub fn failed(&self) -> usize {
        self.checks.iter().filter(|c| c.status == "FAIL").count()
    }

    /// Checks that held: passes, and refusals of the kernel that named it.
    pub fn passed(&self) -> usize {
        self.checks
            .iter()
            .filter(|c| c.status == "pass" || c.status == "refused")
            .count()
    }
}

/// Kernel against check, then the wall time, then every detail.
pub fn render(rows: &[Row], total: Duration) -> String {
    let mut ids: Vec<&str> = Vec::new();
    for row in rows {
        for check in &row.checks {
            if !ids.contains(&check.id.as_str()) {
                ids.push(&check.id);
            }
        }
    }
    let mut out = String::new();
    let _ = write!(out, "| kernel | release |");
    for id in &ids {
        let _ = write!(out, " {id} |");
    }
    out.push_str(" wall time |\n|---|---|");
    for _ in &ids {
        out.push_str("---|");
    }
    out.push_str("---|\n");
    for row in rows {
        let _ = write!(out, "| {} | {} |", row.kernel, row.release);
        for id in &ids {
            let status = row
                .checks
                .iter()
                .find(|c| c.id == *id)
                .map_or("-", |c| c.status.as_str());
            let _ = write!(out, " {status} |");
        }
        let _ = writeln!(out, " {:.0} s |", row.wall.as_secs_f64());
    }
    let _ = writeln!(out, "\ntotal wall time {:.0} s\n", total.as_secs_f64());
    for row in rows {
        let _ = writeln!(out, "{} ({}):", row.kernel, row.release);
        for check in &row.checks {
            let _ = writeln!(
                out,
                "  {:<4} {:<10} {}",
                check.status, check.id, check.detail
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_lines_parse() {
        let text = "noise\nVMCHECK start pass [3s] attached as tcx\nVMCHECK tcp FAIL [9s] no echo: timed out\nVMCHECK udp skip [9s] \nVMCHECK-END\n";
        let (checks, complete) = parse(text);
        assert!(complete);
        assert_eq!(checks.len(), 3);
        assert_eq!(checks[1].id, "tcp");
        assert_eq!(checks[1].status, "FAIL");
        assert_eq!(checks[1].detail, "[9s] no echo: timed out");
        assert!(!parse("VMCHECK start pass [1s] x\n").1);
    }
}
