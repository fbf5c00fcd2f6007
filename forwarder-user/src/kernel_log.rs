//! The datapath's own records: what only the kernel sees going wrong (a
//! helper's unexpected code, a redirect or copy refused, a map update
//! refused; see forwarder-ebpf's log.rs), written through aya-log and shown
//! in the daemon's log as warnings under the target `forwarder::ebpf`.
//!
//! Whether the kernel writes them is fixed when the object is loaded: the
//! read-only global AYA_LOG_LEVEL, which the verifier folds, so that with
//! it off no program carries the code. `--kernel-log` therefore takes
//! effect when the daemon starts; a restart, which adopts the running
//! datapath without a gap, turns it on or off.

use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
};

use anyhow::{Context as _, Result};
use aya::Ebpf;
use aya_log::EbpfLogger;
use log::{Log, Metadata, Record};

/// The target the records are shown under.
pub const TARGET: &str = "forwarder::ebpf";

/// How long the reader waits for records before it looks whether it
/// should stop.
const POLL_MS: i32 = 200;

/// AYA_LOG_LEVEL for a load: the kernel writes its records (all warnings)
/// when they are asked for, and nothing otherwise.
pub fn level(wanted: bool) -> u8 {
    if wanted {
        aya_log::Level::Warn.into()
    } else {
        0
    }
}

/// Writes the records of one loaded instance to the daemon's log, from a
/// thread of its own: writing a log can block (a slow journal), and the
/// daemon's event loop must not.
pub struct Reader {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Reader {
    pub fn start(ebpf: &mut Ebpf) -> Result<Self> {
        let mut logger = EbpfLogger::init_with_logger(ebpf, Records { prefix: "" })
            .context("opening the kernel's log records")?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("kernel-log".into())
            .spawn(move || {
                while !stopping.load(Ordering::Relaxed) {
                    wait_readable(&logger, POLL_MS);
                    logger.flush();
                }
            })
            .context("starting the kernel log's reader")?;
        Ok(Reader {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Waits until the ring buffer holds a record, or `timeout_ms` passed.
fn wait_readable(logger: &EbpfLogger<Records>, timeout_ms: i32) {
    let mut fd = libc::pollfd {
        fd: logger.as_fd().as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd; an error or a timeout only means another
    // round.
    unsafe { libc::poll(&mut fd, 1, timeout_ms) };
}

/// The records of a throwaway instance (the self-test's), written at once
/// with `prefix` before each.
pub fn drain(ebpf: &mut Ebpf, prefix: &'static str) -> Result<()> {
    let mut logger = EbpfLogger::init_with_logger(ebpf, Records { prefix })
        .context("opening the kernel's log records")?;
    logger.flush();
    Ok(())
}

/// Hands aya-log's records to the daemon's logger, naming the interfaces
/// they give by index (as they are now: one may have gone since).
struct Records {
    prefix: &'static str,
}

impl Log for Records {
    fn enabled(&self, metadata: &Metadata) -> bool {
        log::logger().enabled(metadata)
    }

    fn log(&self, record: &Record) {
        let text = with_interface_names(&record.args().to_string(), ifname);
        log::logger().log(
            &Record::builder()
                .args(format_args!("{}{text}", self.prefix))
                .level(record.level())
                .target(record.target())
                .module_path(record.module_path())
                .file(record.file())
                .line(record.line())
                .build(),
        );
    }

    fn flush(&self) {
        log::logger().flush();
    }
}

/// `text` with every "ifindex N" followed by the interface's name, or
/// "gone" for an index no interface has.
fn with_interface_names(text: &str, name: impl Fn(u32) -> Option<String>) -> String {
    const WORD: &str = "ifindex ";
    let mut out = String::with_capacity(text.len() + 16);
    let mut rest = text;
    while let Some(at) = rest.find(WORD) {
        let (before, after) = rest.split_at(at + WORD.len());
        out.push_str(before);
        let digits = after.len() - after.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        let (number, tail) = after.split_at(digits);
        out.push_str(number);
        if let Ok(index) = number.parse::<u32>() {
            match name(index) {
                Some(name) => out.push_str(&format!(" ({name})")),
                None => out.push_str(" (gone)"),
            }
        }
        rest = tail;
    }
    out.push_str(rest);
    out
}

/// The name of the interface with index `index` in this network
/// namespace.
fn ifname(index: u32) -> Option<String> {
    let mut buf = [0u8; libc::IF_NAMESIZE];
    // SAFETY: buf has room for IF_NAMESIZE bytes, as if_indextoname needs.
    let name = unsafe { libc::if_indextoname(index, buf.as_mut_ptr().cast()) };
    if name.is_null() {
        return None;
    }
    let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    Some(String::from_utf8_lossy(&buf[..len]).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interfaces_are_named_where_the_record_gives_an_index() {
        let name = |i: u32| (i == 4).then(|| "vif1.0".to_string());
        assert_eq!(
            with_interface_names(
                "bpf_clone_redirect of a relay copy from 1.2.3.4 for 224.0.0.167 to ifindex 4 failed: 1",
                name
            ),
            "bpf_clone_redirect of a relay copy from 1.2.3.4 for 224.0.0.167 to ifindex 4 (vif1.0) failed: 1"
        );
        assert_eq!(
            with_interface_names("from ifindex 9 for a -> b, ifindex 4", name),
            "from ifindex 9 (gone) for a -> b, ifindex 4 (vif1.0)"
        );
        assert_eq!(with_interface_names("no index here", name), "no index here");
    }
}
