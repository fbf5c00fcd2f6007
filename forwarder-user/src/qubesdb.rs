//! A Qubes VM's `/vm-config/` tree, read and followed through the
//! `qubesdb-multiread` and `qubesdb-watch` tools on PATH, as Qubes' own
//! scripts do (qubes-core-qubesdb `client/qubesdb-cmd.c`):
//!
//! - `qubesdb-multiread DIR` prints every entry whose path starts with DIR
//!   as `PATH = VALUE`, PATH without DIR, one a line: each byte of VALUE
//!   from 0x20 to 0x7f as itself, any other as `\xNN`, so a value never
//!   breaks its line (`-r` would print it raw, newlines and all);
//! - `qubesdb-watch DIR` (a DIR ending in `/` watches everything under it)
//!   prints the path of the first entry written or removed and exits; with
//!   `-n N` it waits for N, but printf then sits in a pipe's buffer until
//!   4 KiB or exit, so one watch a change is how its output arrives now.
//!
//! A change is followed by re-arming the watch first, then waiting for a
//! quiet spell (which also lets dom0 finish writing a set of parts), then
//! reading the whole tree: a write the new watch missed, landing before it
//! was registered, landed before the read. A slow periodic read is the
//! backstop for a watch that took longer than the quiet spell to register.
//!
//! Values are hostile input: any backslash (an escaped byte, or a literal
//! one, which the output cannot tell apart) refuses the value, and the
//! output is bounded.

use std::{
    io::Read,
    os::{fd::AsRawFd, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::vm_config::{
    QUBESDB_DIR,
    input::InputShare,
    parts::{Family, INPUT, ROUTER},
    router::RouterShare,
};

/// The most `qubesdb-multiread` may print: two full families and room for
/// other `vm-config.` features.
const MAX_OUTPUT: usize = 2 << 20;
/// A watch prints one path of at most 63 bytes.
const MAX_WATCH_LINE: usize = 128;
/// How long a burst of writes must be quiet before the read.
pub const QUIET: Duration = Duration::from_millis(100);
/// Read again after this long without a change.
pub const BACKSTOP: Duration = Duration::from_secs(60);

/// Where the `qubesdb-*` tools are.
#[derive(Clone, Debug, Default)]
pub struct Tools {
    /// `None`: found on PATH.
    dir: Option<PathBuf>,
}

impl Tools {
    /// The tools on PATH, as in a Qubes VM.
    pub fn on_path() -> Self {
        Tools::default()
    }

    /// The tools in `dir` (tests' stand-ins).
    pub fn in_dir(dir: &Path) -> Self {
        Tools {
            dir: Some(dir.to_path_buf()),
        }
    }

    fn command(&self, tool: &str) -> Command {
        match &self.dir {
            Some(dir) => Command::new(dir.join(tool)),
            None => Command::new(tool),
        }
    }

    /// Every entry under `/vm-config/`: `(name, value)`, the name relative
    /// to `/vm-config/`.
    pub fn read_vm_config(&self) -> Result<Vec<(String, String)>, String> {
        let output = self
            .command("qubesdb-multiread")
            .arg(QUBESDB_DIR)
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .map_err(|e| format!("cannot run qubesdb-multiread: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "qubesdb-multiread {QUBESDB_DIR}: {}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        parse_multiread(&output.stdout)
    }
}

/// `qubesdb-multiread`'s output as `(path, value)` pairs.
pub fn parse_multiread(output: &[u8]) -> Result<Vec<(String, String)>, String> {
    if output.len() > MAX_OUTPUT {
        return Err(format!(
            "qubesdb-multiread printed more than {MAX_OUTPUT} bytes"
        ));
    }
    if !output.is_ascii() {
        return Err("qubesdb-multiread printed bytes above 0x7f, which it escapes".into());
    }
    let text = std::str::from_utf8(output).expect("ASCII");
    if !text.is_empty() && !text.ends_with('\n') {
        return Err("qubesdb-multiread's output ends inside a line".into());
    }
    text.lines()
        .map(|line| {
            let (path, value) = line
                .split_once(" = ")
                .ok_or_else(|| format!("qubesdb-multiread printed {line:?}, not PATH = VALUE"))?;
            Ok((path.to_string(), decode(path, value)?))
        })
        .collect()
}

/// A value as the tools print it, refused when it holds anything but
/// printable ASCII.
fn decode(path: &str, value: &str) -> Result<String, String> {
    if value.contains('\\') {
        return Err(format!(
            "{QUBESDB_DIR}{path}: a backslash, or a byte outside printable ASCII"
        ));
    }
    if value.contains('\x7f') {
        return Err(format!("{QUBESDB_DIR}{path}: a DEL byte"));
    }
    Ok(value.to_string())
}

/// The entries of one family.
fn family(pairs: &[(String, String)], family: Family) -> Vec<(String, String)> {
    pairs
        .iter()
        .filter(|(name, _)| family.owns(name))
        .cloned()
        .collect()
}

/// The router's share among `/vm-config/` entries; none is an empty share.
pub fn router_share(pairs: &[(String, String)]) -> Result<RouterShare, String> {
    RouterShare::from_qubesdb(&family(pairs, ROUTER))
}

/// What this VM must admit, among `/vm-config/` entries.
pub fn input_share(pairs: &[(String, String)]) -> Result<InputShare, String> {
    InputShare::from_qubesdb(&family(pairs, INPUT))
}

/// One armed `qubesdb-watch /vm-config/`.
struct Watch(Child);

impl Watch {
    fn arm(tools: &Tools) -> Result<Watch, String> {
        let mut command = tools.command("qubesdb-watch");
        // A process that exits without dropping the watch (the daemon's
        // follower thread is never joined) takes it along.
        // SAFETY: prctl is async-signal-safe and touches only the child.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        command
            .arg(QUBESDB_DIR)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map(Watch)
            .map_err(|e| format!("cannot run qubesdb-watch: {e}"))
    }

    /// The path it reports, if one comes within `timeout`.
    fn fired(&mut self, timeout: Duration) -> Result<Option<String>, String> {
        let stdout = self.0.stdout.as_mut().expect("piped");
        let mut poll = libc::pollfd {
            fd: stdout.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: one valid pollfd, for the duration of the call.
        match unsafe { libc::poll(&mut poll, 1, ms) } {
            0 => return Ok(None),
            n if n < 0 => {
                let err = std::io::Error::last_os_error();
                if err.kind() == std::io::ErrorKind::Interrupted {
                    return Ok(None);
                }
                return Err(format!("waiting for qubesdb-watch: {err}"));
            }
            _ => {}
        }
        let mut line = Vec::new();
        stdout
            .take(MAX_WATCH_LINE as u64)
            .read_to_end(&mut line)
            .map_err(|e| format!("reading qubesdb-watch: {e}"))?;
        let status = self.0.wait().map_err(|e| format!("qubesdb-watch: {e}"))?;
        if !status.success() {
            return Err(format!("qubesdb-watch {QUBESDB_DIR}: {status}"));
        }
        parse_watch(&line).map(Some)
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `qubesdb-watch`'s output: the path that fired, on one line.
pub fn parse_watch(output: &[u8]) -> Result<String, String> {
    let text = std::str::from_utf8(output).unwrap_or_default();
    match text.strip_suffix('\n') {
        Some(path)
            if path.starts_with('/')
                && path.len() < 64
                && path
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_/.:@".contains(&b)) =>
        {
            Ok(path.to_string())
        }
        _ => Err(format!("qubesdb-watch printed {output:?}, not a path")),
    }
}

/// Follows `/vm-config/`: each call of [`Follower::changed`] returns the tree
/// after a change (or the backstop period).
pub struct Follower {
    tools: Tools,
    watch: Watch,
}

impl Follower {
    /// Arms the watch, then reads the tree as it is.
    pub fn start(tools: Tools) -> Result<(Follower, Vec<(String, String)>), String> {
        let watch = Watch::arm(&tools)?;
        std::thread::sleep(QUIET);
        let tree = tools.read_vm_config()?;
        Ok((Follower { tools, watch }, tree))
    }

    /// Blocks until something under `/vm-config/` changed and the writes
    /// stopped for [`QUIET`], or [`BACKSTOP`] passed; the tree then.
    pub fn changed(&mut self) -> Result<Vec<(String, String)>, String> {
        if self.watch.fired(BACKSTOP)?.is_some() {
            self.watch = Watch::arm(&self.tools)?;
            let start = Instant::now();
            // Each further write re-arms and restarts the quiet spell, up
            // to ten of them.
            while start.elapsed() < QUIET * 10 && self.watch.fired(QUIET)?.is_some() {
                self.watch = Watch::arm(&self.tools)?;
            }
        }
        self.tools.read_vm_config()
    }
}

/// `/vm-config/` entries, names relative to it.
pub type Tree = Vec<(String, String)>;

/// How soon a failed read or watch is tried again.
pub const RETRY: Duration = Duration::from_secs(5);

/// Follows `/vm-config/` on a thread of its own, for as long as the
/// receiver lives: each tree read, or what stopped the reading (tried
/// again after [`RETRY`]).
pub fn feed(tools: Tools) -> std::io::Result<tokio::sync::mpsc::Receiver<Result<Tree, String>>> {
    let (trees, receiver) = tokio::sync::mpsc::channel(4);
    std::thread::Builder::new()
        .name("qubesdb".into())
        .spawn(move || follow(&tools, &trees))?;
    Ok(receiver)
}

fn follow(tools: &Tools, trees: &tokio::sync::mpsc::Sender<Result<Tree, String>>) {
    loop {
        let err = match Follower::start(tools.clone()) {
            Ok((mut follower, tree)) => {
                let mut read = Ok(tree);
                loop {
                    match read {
                        Ok(tree) => {
                            if trees.blocking_send(Ok(tree)).is_err() {
                                return;
                            }
                        }
                        Err(err) => break err,
                    }
                    read = follower.changed();
                }
            }
            Err(err) => err,
        };
        if trees.blocking_send(Err(err)).is_err() {
            return;
        }
        std::thread::sleep(RETRY);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `qubesdb-multiread /vm-config/` prints for two entries, as
    /// qubesdb-cmd.c's `cmd_multiread` writes them (parsed here, decoded by
    /// vm_config elsewhere).
    const MULTIREAD: &str = "forwarder.1 = v1 part=1/1 sum=0 | forward=tcp:53317=10.137.0.6\n\
                             other = x\n";

    #[test]
    fn multiread_output_parses_into_pairs() {
        let pairs = parse_multiread(MULTIREAD.as_bytes()).unwrap();
        assert_eq!(pairs.len(), 2);
        assert_eq!(pairs[0].0, "forwarder.1");
        assert!(pairs[0].1.ends_with("| forward=tcp:53317=10.137.0.6"));
        assert_eq!(pairs[1], ("other".to_string(), "x".to_string()));
        assert_eq!(parse_multiread(b"").unwrap(), []);
        assert_eq!(
            parse_multiread(b"forwarder.1 = a = b\n").unwrap(),
            [("forwarder.1".to_string(), "a = b".to_string())]
        );
        assert_eq!(
            parse_multiread(b"empty = \n").unwrap(),
            [("empty".to_string(), String::new())]
        );
    }

    #[test]
    fn escaped_bytes_and_malformed_output_are_refused() {
        for (output, needle) in [
            (&b"forwarder.1 = a\\x0ab\n"[..], "printable ASCII"),
            (b"forwarder.1 = a\\b\n", "backslash"),
            (b"forwarder.1 = a\x7f\n", "DEL"),
            (b"forwarder.1 = \xc3\xa9\n", "above 0x7f"),
            (b"forwarder.1 a\n", "not PATH = VALUE"),
            (b"forwarder.1 = a", "inside a line"),
        ] {
            let err = parse_multiread(output).unwrap_err();
            assert!(err.contains(needle), "{output:?}: {err}");
        }
        let huge = vec![b'x'; MAX_OUTPUT + 1];
        assert!(parse_multiread(&huge).unwrap_err().contains("more than"));
    }

    #[test]
    fn families_are_told_apart() {
        let router = RouterShare {
            forwards: vec![crate::vm_config::router::Forward {
                spec: "tcp:53317=10.137.0.6".parse().unwrap(),
                attrs: Default::default(),
            }],
            relays: Vec::new(),
        };
        let input = InputShare {
            admits: vec![crate::vm_config::input::Admit {
                rule: "tcp:53317".parse().unwrap(),
                attrs: Default::default(),
            }],
            groups: Vec::new(),
        };
        let mut output = String::new();
        for (i, v) in input.values().unwrap().iter().enumerate() {
            output.push_str(&format!("{} = {v}\n", INPUT.name(i + 1)));
        }
        for (i, v) in router.values().unwrap().iter().enumerate() {
            output.push_str(&format!("{} = {v}\n", ROUTER.name(i + 1)));
        }
        output.push_str("forwarderx = not ours\n");
        let pairs = parse_multiread(output.as_bytes()).unwrap();
        assert_eq!(router_share(&pairs).unwrap(), router);
        assert_eq!(input_share(&pairs).unwrap(), input);
        assert_eq!(router_share(&[]).unwrap(), RouterShare::default());
    }

    #[test]
    fn watch_output_is_one_path() {
        assert_eq!(
            parse_watch(b"/vm-config/forwarder.1\n").unwrap(),
            "/vm-config/forwarder.1"
        );
        for bad in [
            &b""[..],
            b"/vm-config/x",
            b"vm-config\n",
            b"/a b\n",
            b"/a\n/b\n",
        ] {
            assert!(parse_watch(bad).is_err(), "{bad:?}");
        }
    }
}
