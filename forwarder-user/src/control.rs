//! The control socket: how `forwarder rules` talks to the daemon that owns
//! the rules. One JSON request per connection, one JSON response. The socket
//! belongs to the instance its pin directory names, lives under
//! /run/forwarder (mode 0700), is itself mode 0600, and the daemon also
//! checks that the peer is root.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

use crate::rule_view::RuleView;

pub const SOCKET_DIR: &str = "/run/forwarder";

/// The control socket of the instance pinned at `pin_dir`: readable name,
/// unambiguous hash (unix socket paths are limited to 108 bytes).
pub fn socket_path(pin_dir: &Path) -> PathBuf {
    let text = pin_dir.to_string_lossy();
    let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let name: String = pin_dir
        .file_name()
        .map(|n| {
            n.to_string_lossy()
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
                .take(40)
                .collect()
        })
        .unwrap_or_default();
    PathBuf::from(SOCKET_DIR).join(format!("{name}-{:08x}.sock", hash as u32))
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    List,
    Add {
        spec: String,
        allow_from: Option<String>,
        expire_secs: Option<u64>,
        comment: Option<String>,
        save: bool,
    },
    Del {
        rule: String,
        save: bool,
    },
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    pub rules: Vec<RuleView>,
}

impl Response {
    pub fn error(message: impl Into<String>) -> Self {
        Response {
            ok: false,
            error: Some(message.into()),
            ..Response::default()
        }
    }
}

/// Sends one request to the instance at `pin_dir` and returns its answer.
pub fn request(pin_dir: &Path, request: &Request) -> Result<Response> {
    let path = socket_path(pin_dir);
    let mut stream = UnixStream::connect(&path).with_context(|| {
        format!(
            "no forwarder instance answers at {} (pin dir {}): is `forwarder run --pin-dir {}` running, and are you root?",
            path.display(),
            pin_dir.display(),
            pin_dir.display()
        )
    })?;
    // Every answer counts the flows of each rule: seconds for a flow table
    // of millions.
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply)?;
    if reply.is_empty() {
        bail!("the daemon closed the control socket without answering");
    }
    Ok(serde_json::from_str(&reply)?)
}

/// The daemon's end of the control socket.
pub struct Server {
    listener: tokio::net::UnixListener,
    path: PathBuf,
}

impl Server {
    /// Binds the socket of the instance at `pin_dir`. A socket file nobody
    /// answers on is a killed predecessor's and is replaced; one that
    /// answers belongs to a running instance, and binding fails.
    pub fn bind(pin_dir: &Path) -> Result<Self> {
        use std::os::unix::fs::PermissionsExt as _;

        let path = socket_path(pin_dir);
        std::fs::create_dir_all(SOCKET_DIR).with_context(|| format!("creating {SOCKET_DIR}"))?;
        std::fs::set_permissions(SOCKET_DIR, std::fs::Permissions::from_mode(0o700))?;
        if path.exists() {
            if UnixStream::connect(&path).is_ok() {
                bail!(
                    "another forwarder instance already serves {} (pin dir {})",
                    path.display(),
                    pin_dir.display()
                );
            }
            std::fs::remove_file(&path)?;
        }
        let listener = tokio::net::UnixListener::bind(&path)
            .with_context(|| format!("binding the control socket {}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        Ok(Server { listener, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub async fn accept(&self) -> std::io::Result<tokio::net::UnixStream> {
        Ok(self.listener.accept().await?.0)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The longest request line read: a rule with every option is a few
/// hundred bytes. A client sending more is answered with an error and cut
/// off, however long it goes on.
pub const MAX_REQUEST: usize = 64 * 1024;

/// How long a client has to send its request, and to take its answer.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Reads one request from a client, refusing anyone but root.
pub async fn read_request(stream: &mut tokio::net::UnixStream) -> Result<Request, Response> {
    use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _};

    match stream.peer_cred() {
        Ok(cred) if cred.uid() == 0 => {}
        Ok(cred) => {
            return Err(Response::error(format!(
                "uid {} may not control the forwarder; root only",
                cred.uid()
            )));
        }
        Err(err) => {
            return Err(Response::error(format!(
                "cannot identify the client: {err}"
            )));
        }
    }
    let mut line = Vec::new();
    let mut reader = tokio::io::BufReader::new(stream.take(MAX_REQUEST as u64 + 1));
    match tokio::time::timeout(CLIENT_TIMEOUT, reader.read_until(b'\n', &mut line)).await {
        Ok(Ok(_)) if line.len() > MAX_REQUEST => Err(Response::error(format!(
            "request longer than {} KiB; refused",
            MAX_REQUEST / 1024
        ))),
        Ok(Ok(n)) if n > 0 => {
            serde_json::from_slice(&line).map_err(|e| Response::error(format!("bad request: {e}")))
        }
        Ok(Ok(_)) => Err(Response::error("empty request")),
        Ok(Err(err)) => Err(Response::error(format!("reading the request: {err}"))),
        Err(_) => Err(Response::error(format!(
            "no request within {} s",
            CLIENT_TIMEOUT.as_secs()
        ))),
    }
}

pub async fn write_response(stream: &mut tokio::net::UnixStream, response: &Response) {
    use tokio::io::AsyncWriteExt as _;

    let mut line = serde_json::to_string(response).unwrap_or_else(|e| {
        serde_json::to_string(&Response::error(format!("encoding the response: {e}")))
            .unwrap_or_default()
    });
    line.push('\n');
    // A client that never reads its answer gives up its task, not more.
    let _ = tokio::time::timeout(CLIENT_TIMEOUT, stream.write_all(line.as_bytes())).await;
}

/// The process serving the control socket of the instance at `pin_dir`,
/// if one answers there.
pub fn serving_pid(pin_dir: &Path) -> Option<u32> {
    use std::os::fd::AsRawFd as _;

    let stream = UnixStream::connect(socket_path(pin_dir)).ok()?;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: a connected socket, and a ucred buffer of the length given.
    let ret = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut len,
        )
    };
    (ret == 0).then_some(cred.pid as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_paths_are_short_distinct_and_stable() {
        let a = socket_path(Path::new("/sys/fs/bpf/forwarder"));
        let b = socket_path(Path::new("/sys/fs/bpf/forwarder2"));
        let c = socket_path(Path::new("/run/x/forwarder"));
        assert!(a.starts_with(SOCKET_DIR) && a.to_string_lossy().contains("forwarder-"));
        assert_ne!(a, b);
        assert_ne!(a, c, "same last component, different directory");
        assert_eq!(a, socket_path(Path::new("/sys/fs/bpf/forwarder")));
        let long = socket_path(Path::new(&format!("/{}", "x".repeat(300))));
        assert!(long.as_os_str().len() < 108);
    }

    #[test]
    fn requests_round_trip_as_json() {
        let add = Request::Add {
            spec: "tcp:8080=10.0.0.1:80".into(),
            allow_from: Some("any".into()),
            expire_secs: Some(60),
            comment: Some("web".into()),
            save: true,
        };
        let json = serde_json::to_string(&add).unwrap();
        assert!(json.contains(r#""op":"add""#), "{json}");
        assert_eq!(serde_json::from_str::<Request>(&json).unwrap(), add);
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"list"}"#).unwrap(),
            Request::List
        );
        assert!(serde_json::from_str::<Request>(r#"{"op":"flush"}"#).is_err());
        let response = Response::error("nope");
        let back: Response =
            serde_json::from_str(&serde_json::to_string(&response).unwrap()).unwrap();
        assert_eq!(back, response);
    }
}
