//! systemd's notification protocol (sd_notify): readiness, status, and
//! the watchdog keep-alive that lets systemd restart a wedged daemon. A
//! no-op when not started by systemd with `Type=notify`.

use std::{
    io,
    os::{linux::net::SocketAddrExt as _, unix::net::SocketAddr, unix::net::UnixDatagram},
    time::Duration,
};

pub struct Notifier {
    socket: Option<(UnixDatagram, SocketAddr)>,
    watchdog: Option<Duration>,
}

fn address(path: &str) -> io::Result<SocketAddr> {
    match path.strip_prefix('@') {
        Some(abstract_name) => SocketAddr::from_abstract_name(abstract_name.as_bytes()),
        None => SocketAddr::from_pathname(path),
    }
}

impl Notifier {
    /// From $NOTIFY_SOCKET and $WATCHDOG_USEC (for this process only, when
    /// $WATCHDOG_PID names another).
    pub fn from_env() -> Self {
        let socket = std::env::var("NOTIFY_SOCKET").ok().and_then(|path| {
            let to = address(&path).ok()?;
            Some((UnixDatagram::unbound().ok()?, to))
        });
        let for_us = std::env::var("WATCHDOG_PID")
            .ok()
            .and_then(|p| p.parse::<u32>().ok())
            .is_none_or(|pid| pid == std::process::id());
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|usec| usec.parse::<u64>().ok())
            .filter(|usec| *usec > 0 && for_us)
            .map(Duration::from_micros);
        Notifier { socket, watchdog }
    }

    fn send(&self, message: &str) {
        if let Some((socket, to)) = &self.socket
            && let Err(err) = socket.send_to_addr(message.as_bytes(), to)
        {
            log::debug!("sd_notify {message:?}: {err}");
        }
    }

    /// Start-up is complete: the datapath is attached and followed.
    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={status}"));
    }

    pub fn stopping(&self) {
        self.send("STOPPING=1");
    }

    /// How often the main loop must call `alive`: half the watchdog
    /// timeout, as systemd recommends; `None` without a watchdog.
    pub fn keepalive_interval(&self) -> Option<Duration> {
        self.watchdog.map(|timeout| timeout / 2)
    }

    /// The main loop is turning.
    pub fn alive(&self) {
        self.send("WATCHDOG=1");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_reach_the_socket_systemd_names() {
        let dir = std::env::temp_dir().join(format!("forwarder-notify-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let systemd = UnixDatagram::bind(&path).unwrap();
        let notifier = Notifier {
            socket: Some((
                UnixDatagram::unbound().unwrap(),
                address(path.to_str().unwrap()).unwrap(),
            )),
            watchdog: Some(Duration::from_secs(10)),
        };
        notifier.ready("forwarding");
        notifier.alive();
        let mut buf = [0u8; 128];
        let n = systemd.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=forwarding");
        let n = systemd.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"WATCHDOG=1");
        assert_eq!(notifier.keepalive_interval(), Some(Duration::from_secs(5)));
        assert!(address("@forwarder-test").is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
