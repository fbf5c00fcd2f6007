//! How calls reach qubesd, chosen as qubesadmin chooses (its
//! `qubesadmin/__init__.py`): in dom0, where /etc/qubes-release exists,
//! qubesd's socket; anywhere else (an admin qube), qrexec, through
//! `qrexec-client-vm DEST METHOD+ARG`, which dom0's policy routes to qubesd.
//! `QUBESD_SOCKET` names another socket, for tests.

use std::{
    io::{Read, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

use super::admin_api::{self, CallError, Event, EventParser, MAX_REPLY};

/// qubesd's socket in dom0.
pub const QUBESD_SOCKET: &str = "/var/run/qubesd.sock";
/// Present in dom0 only.
const QUBES_RELEASE: &str = "/etc/qubes-release";
/// The qrexec client of a VM.
const QREXEC_CLIENT_VM: &str = "qrexec-client-vm";
/// No call takes longer; qubesd answers in milliseconds.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transport {
    Socket(PathBuf),
    Qrexec,
}

impl Transport {
    /// `QUBESD_SOCKET` if set, else qubesd's socket in dom0, else qrexec.
    pub fn from_env() -> Transport {
        match std::env::var_os("QUBESD_SOCKET") {
            Some(path) => Transport::Socket(path.into()),
            None if Path::new(QUBES_RELEASE).exists() => Transport::Socket(QUBESD_SOCKET.into()),
            None => Transport::Qrexec,
        }
    }

    /// One call; the reply's body.
    pub fn call(
        &self,
        dest: &str,
        method: &str,
        arg: &str,
        payload: &[u8],
    ) -> Result<Vec<u8>, CallError> {
        let reply = match self {
            Transport::Socket(path) => {
                let mut stream = connect(path)?;
                let io = |e: std::io::Error| {
                    CallError::Failed(format!("{method} through {}: {e}", path.display()))
                };
                stream.set_read_timeout(Some(CALL_TIMEOUT)).map_err(io)?;
                stream.set_write_timeout(Some(CALL_TIMEOUT)).map_err(io)?;
                stream
                    .write_all(&admin_api::request_header(method, arg, dest))
                    .map_err(io)?;
                stream.write_all(payload).map_err(io)?;
                stream.shutdown(std::net::Shutdown::Write).map_err(io)?;
                read_bounded(&mut stream).map_err(io)?
            }
            Transport::Qrexec => {
                let mut child = qrexec(dest, method, arg)?;
                let io = |e: std::io::Error| {
                    CallError::Failed(format!("{method} through {QREXEC_CLIENT_VM}: {e}"))
                };
                let mut stdin = child.stdin.take().expect("piped");
                stdin.write_all(payload).map_err(io)?;
                drop(stdin);
                let reply = read_bounded(child.stdout.as_mut().expect("piped")).map_err(io)?;
                let status = child.wait().map_err(io)?;
                if !status.success() {
                    return Err(CallError::Failed(format!(
                        "{QREXEC_CLIENT_VM} {dest} {method}+{arg}: {status} (refused by the qrexec policy?)"
                    )));
                }
                reply
            }
        };
        admin_api::parse_reply(&reply)
    }

    /// `admin.Events` for every VM: its events as they come, on a channel
    /// a reader thread fills; the stream ends with an error or when the
    /// returned guard is dropped.
    pub fn events(&self) -> Result<EventStream, CallError> {
        let (tx, rx) = mpsc::channel();
        let guard = match self {
            Transport::Socket(path) => {
                let mut stream = connect(path)?;
                let io = |e: std::io::Error| {
                    CallError::Failed(format!("admin.Events through {}: {e}", path.display()))
                };
                stream
                    .write_all(&admin_api::request_header("admin.Events", "", "dom0"))
                    .map_err(io)?;
                stream.shutdown(std::net::Shutdown::Write).map_err(io)?;
                let reader = stream.try_clone().map_err(io)?;
                thread::spawn(move || pump(reader, tx));
                Guard::Socket(stream)
            }
            Transport::Qrexec => {
                let mut child = qrexec("dom0", "admin.Events", "")?;
                drop(child.stdin.take());
                let reader = child.stdout.take().expect("piped");
                thread::spawn(move || pump(reader, tx));
                Guard::Child(child)
            }
        };
        Ok(EventStream {
            events: rx,
            _guard: guard,
        })
    }
}

fn connect(path: &Path) -> Result<UnixStream, CallError> {
    UnixStream::connect(path).map_err(|e| {
        CallError::Failed(format!(
            "cannot connect to qubesd at {}: {e} (run in dom0 as a member of group qubes, or set QUBESD_SOCKET)",
            path.display()
        ))
    })
}

fn qrexec(dest: &str, method: &str, arg: &str) -> Result<Child, CallError> {
    let service = if arg.is_empty() {
        method.to_string()
    } else {
        format!("{method}+{arg}")
    };
    Command::new(QREXEC_CLIENT_VM)
        .args([dest, &service])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| {
            CallError::Failed(format!(
                "cannot run {QREXEC_CLIENT_VM} (not in dom0 or an admin qube?): {e}"
            ))
        })
}

/// Everything until EOF, refusing more than [`MAX_REPLY`] bytes.
fn read_bounded(reader: &mut impl Read) -> std::io::Result<Vec<u8>> {
    let mut reply = Vec::new();
    reader.take(MAX_REPLY as u64 + 1).read_to_end(&mut reply)?;
    if reply.len() > MAX_REPLY {
        return Err(std::io::Error::other(format!(
            "a reply of more than {MAX_REPLY} bytes"
        )));
    }
    Ok(reply)
}

/// Reads events until the stream ends, an error, or the receiver is gone.
fn pump(mut reader: impl Read, tx: mpsc::Sender<Result<Event, CallError>>) {
    let mut parser = EventParser::default();
    let mut buffer = [0u8; 4096];
    loop {
        let end = match reader.read(&mut buffer) {
            Ok(0) if parser.is_idle() => {
                CallError::Failed("qubesd closed the events connection".into())
            }
            Ok(0) => CallError::Failed("the events connection ended inside an event".into()),
            Ok(n) => match parser.feed(&buffer[..n]) {
                Ok(events) => {
                    if events.into_iter().any(|e| tx.send(Ok(e)).is_err()) {
                        return;
                    }
                    continue;
                }
                Err(e) => e,
            },
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => CallError::Failed(format!("reading events: {e}")),
        };
        let _ = tx.send(Err(end));
        return;
    }
}

/// What keeps an events connection open.
enum Guard {
    Socket(UnixStream),
    Child(Child),
}

impl Drop for Guard {
    fn drop(&mut self) {
        match self {
            Guard::Socket(stream) => {
                let _ = stream.shutdown(std::net::Shutdown::Both);
            }
            Guard::Child(child) => {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// Events of one `admin.Events` connection.
pub struct EventStream {
    pub events: mpsc::Receiver<Result<Event, CallError>>,
    _guard: Guard,
}
