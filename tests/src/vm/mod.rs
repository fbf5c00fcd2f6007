//! The checks `cargo xtask vm-test` runs inside a VM booted on each kernel
//! users run, and the LAN peer it runs outside the VM, on the host end of
//! the VM's NIC. Each check prints one machine-readable line
//! (`VMCHECK <id> <pass|refused|FAIL|skip> <detail>`), also appended to a results
//! file the host reads after the VM powers off; `VMCHECK-END` marks a run
//! that got to its end.

pub mod lan_peer;
pub mod matrix;
pub mod nic;
mod routers;

use std::{
    fs::File,
    io::Write as _,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

pub const LINE_PREFIX: &str = "VMCHECK";
/// Why checks are skipped on a kernel the forwarder refuses.
pub const REFUSED: &str = "the forwarder refuses this kernel";
pub const END_LINE: &str = "VMCHECK-END";

/// Deadlines inside the VM: under TCG every instruction is emulated, so a
/// program load, a process start or a TCP handshake takes many times what
/// it takes on the host. A start verifies both programs twice (self-test,
/// then the real load), for two daemons at once, and took over a minute on
/// a loaded host.
pub const SLOW: Duration = Duration::from_secs(180);
pub const WAIT: Duration = Duration::from_secs(15);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Pass,
    /// The forwarder refused the kernel at start, naming it: what it must
    /// do where it cannot run, so no failure, but no pass to read past.
    Refused,
    Fail,
    Skip,
}

impl Status {
    pub fn word(self) -> &'static str {
        match self {
            Status::Pass => "pass",
            Status::Refused => "refused",
            Status::Fail => "FAIL",
            Status::Skip => "skip",
        }
    }
}

/// Where the result lines go: stdout, and a file the host can read.
pub struct Results {
    file: Option<File>,
    started: Instant,
}

impl Results {
    pub fn new(file: Option<&Path>) -> Result<Self> {
        let file = file
            .map(|path| File::create(path).with_context(|| format!("creating {}", path.display())))
            .transpose()?;
        Ok(Results {
            file,
            started: Instant::now(),
        })
    }

    fn line(&mut self, line: &str) {
        println!("{line}");
        if let Some(file) = &mut self.file {
            // Written and synced line by line: a VM that dies half-way
            // still leaves the lines before.
            let _ = writeln!(file, "{line}").and_then(|()| file.sync_data());
        }
    }

    /// Records one check: `Ok(detail)` passes, `Err` fails with its chain.
    pub fn check(&mut self, id: &str, result: Result<String>) {
        match result {
            Ok(detail) => self.record(id, Status::Pass, &detail),
            Err(err) => self.record(id, Status::Fail, &format!("{err:#}")),
        }
    }

    /// Records each of `ids` with one status and detail (skipped, or
    /// failed by what stopped them all).
    pub fn record_all(&mut self, ids: &[&str], status: Status, detail: &str) {
        for id in ids {
            self.record(id, status, detail);
        }
    }

    pub fn record(&mut self, id: &str, status: Status, detail: &str) {
        let detail = detail.split_whitespace().collect::<Vec<_>>().join(" ");
        self.line(&format!(
            "{LINE_PREFIX} {id} {} [{:.0}s] {detail}",
            status.word(),
            self.started.elapsed().as_secs_f64()
        ));
    }

    pub fn end(&mut self) {
        self.line(END_LINE);
    }
}

/// The running kernel's release (`uname -r`).
pub fn kernel_release() -> Result<String> {
    Ok(std::fs::read_to_string("/proc/sys/kernel/osrelease")?
        .trim()
        .to_string())
}
