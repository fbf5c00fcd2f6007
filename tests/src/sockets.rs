//! Echo servers and clients that live in a namespace. Servers report the
//! peer address they saw, so tests can check which source survived NAT.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::netns::Netns;

/// A thread that runs a step over and over until dropped, then is joined.
/// Each step must return soon (a socket's read timeout, a short sleep), or
/// dropping waits for it.
pub struct Background {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Background {
    pub fn spawn(mut step: impl FnMut() + Send + 'static) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    step();
                }
            })
        };
        Background {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Everything a background step came back with (a datagram, a
/// connection), in order of arrival, until dropped.
pub struct Recorder<T> {
    seen: Arc<Mutex<Vec<T>>>,
    _thread: Background,
}

impl<T: Send + 'static> Recorder<T> {
    /// Records what each call of `next` returns; `next` must return soon,
    /// with `None` when nothing came (see `Background`).
    pub fn start(mut next: impl FnMut() -> Option<T> + Send + 'static) -> Self {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let seen = seen.clone();
            Background::spawn(move || {
                if let Some(record) = next() {
                    seen.lock().unwrap().push(record);
                }
            })
        };
        Recorder {
            seen,
            _thread: thread,
        }
    }

    /// The first record `pick` makes something of, waiting up to `timeout`
    /// for one.
    pub fn wait_for<R>(
        &self,
        timeout: Duration,
        mut pick: impl FnMut(&T) -> Option<R>,
    ) -> Option<R> {
        let mut found = None;
        crate::wait::wait_until(timeout, || {
            found = self.seen.lock().unwrap().iter().find_map(&mut pick);
            found.is_some()
        });
        found
    }

    /// Everything recorded so far.
    pub fn all(&self) -> Vec<T>
    where
        T: Clone,
    {
        self.seen.lock().unwrap().clone()
    }
}

/// Answers every TCP connection and UDP datagram on a port with
/// "<peer ip>:<peer port> <what was received>".
pub struct EchoServer {
    _tcp: Background,
    _udp: Background,
}

fn reply_for(peer: SocketAddr, data: &[u8]) -> Vec<u8> {
    let mut out = format!("{peer} ").into_bytes();
    out.extend_from_slice(data);
    out
}

impl EchoServer {
    pub fn start(ns: &Netns, port: u16) -> Result<Self> {
        let (tcp, udp) = ns.run(|| -> Result<_> {
            let tcp = TcpListener::bind(("0.0.0.0", port)).context("binding TCP")?;
            tcp.set_nonblocking(true)?;
            let udp = UdpSocket::bind(("0.0.0.0", port)).context("binding UDP")?;
            udp.set_read_timeout(Some(Duration::from_millis(20)))?;
            Ok((tcp, udp))
        })?;
        let tcp = Background::spawn(move || match tcp.accept() {
            Ok((mut conn, peer)) => {
                let _ = conn.set_nonblocking(false);
                let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                std::thread::spawn(move || {
                    let mut buf = [0u8; 65536];
                    while let Ok(n) = conn.read(&mut buf) {
                        if n == 0 || conn.write_all(&reply_for(peer, &buf[..n])).is_err() {
                            break;
                        }
                    }
                });
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        });
        let mut buf = vec![0u8; 65536];
        let udp = Background::spawn(move || {
            if let Ok((n, peer)) = udp.recv_from(&mut buf) {
                let _ = udp.send_to(&reply_for(peer, &buf[..n]), peer);
            }
        });
        Ok(EchoServer {
            _tcp: tcp,
            _udp: udp,
        })
    }
}

/// One datagram a socket received, and when.
#[derive(Clone, Debug)]
pub struct Received {
    pub from: SocketAddr,
    pub payload: Vec<u8>,
    pub at: Instant,
}

/// Records every datagram `socket` receives; it needs a read timeout.
fn record_datagrams(socket: UdpSocket) -> Recorder<Received> {
    let mut buf = vec![0u8; 65536];
    Recorder::start(move || {
        let (n, from) = socket.recv_from(&mut buf).ok()?;
        Some(Received {
            from,
            payload: buf[..n].to_vec(),
            at: Instant::now(),
        })
    })
}

/// Every UDP datagram that reaches a port of a namespace, with its source.
pub struct UdpRecorder {
    datagrams: Recorder<Received>,
}

impl UdpRecorder {
    pub fn start(ns: &Netns, port: u16) -> Result<Self> {
        let socket = ns.run(|| -> Result<UdpSocket> {
            let socket = UdpSocket::bind(("0.0.0.0", port)).context("binding UDP")?;
            socket.set_read_timeout(Some(Duration::from_millis(20)))?;
            Ok(socket)
        })?;
        Ok(UdpRecorder {
            datagrams: record_datagrams(socket),
        })
    }

    /// The source of the first datagram carrying `marker`, waiting up to
    /// `timeout` for one.
    pub fn wait_for(&self, marker: &str, timeout: Duration) -> Option<SocketAddr> {
        self.datagrams.wait_for(timeout, |d| {
            d.payload.starts_with(marker.as_bytes()).then_some(d.from)
        })
    }

    /// When the first datagram carrying `marker` arrived after `after`,
    /// waiting up to `timeout` for one.
    pub fn first_after(&self, marker: &str, after: Instant, timeout: Duration) -> Option<Instant> {
        self.datagrams.wait_for(timeout, |d| {
            (d.at > after && d.payload.starts_with(marker.as_bytes())).then_some(d.at)
        })
    }
}

/// What a client got back: the server's view of the client, and the reply's
/// own source (for UDP).
#[derive(Debug)]
pub struct Echo {
    pub seen_as: SocketAddr,
    pub reply_from: Option<SocketAddr>,
}

fn parse_reply(reply: &[u8], sent: &[u8]) -> Result<SocketAddr> {
    let text = String::from_utf8_lossy(reply);
    let (peer, rest) = text.split_once(' ').context("malformed echo")?;
    if rest.as_bytes() != sent {
        bail!(
            "echo mismatch: sent {:?}, got {rest:?}",
            String::from_utf8_lossy(sent)
        );
    }
    Ok(peer.parse()?)
}

/// One TCP exchange from `ns` to `to`, optionally from a fixed source port.
pub fn tcp_echo(
    ns: &Netns,
    to: SocketAddrV4,
    from_port: Option<u16>,
    timeout: Duration,
) -> Result<Echo> {
    ns.run(|| {
        let mut stream = match from_port {
            None => TcpStream::connect_timeout(&to.into(), timeout)?,
            Some(port) => connect_from(port, to, timeout)?,
        };
        stream.set_read_timeout(Some(timeout))?;
        let msg = b"hello through two NATs";
        stream.write_all(msg)?;
        let mut buf = vec![0u8; 256];
        let mut got = 0;
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let n = stream.read(&mut buf[got..])?;
            if n == 0 {
                break;
            }
            got += n;
            if let Ok(seen_as) = parse_reply(&buf[..got], msg) {
                return Ok(Echo {
                    seen_as,
                    reply_from: None,
                });
            }
        }
        bail!(
            "incomplete TCP echo: {:?}",
            String::from_utf8_lossy(&buf[..got])
        )
    })
}

fn connect_from(port: u16, to: SocketAddrV4, timeout: Duration) -> Result<TcpStream> {
    // std cannot bind before connect; do it by hand.
    // SAFETY: plain socket calls with checked results; the fd is owned by
    // the TcpStream on success and closed on failure.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        if fd < 0 {
            bail!("socket: {}", std::io::Error::last_os_error());
        }
        let one: i32 = 1;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&raw const one).cast(),
            4,
        );
        let mut local: libc::sockaddr_in = std::mem::zeroed();
        local.sin_family = libc::AF_INET as u16;
        local.sin_port = port.to_be();
        if libc::bind(
            fd,
            (&raw const local).cast(),
            size_of::<libc::sockaddr_in>() as u32,
        ) != 0
        {
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            bail!("bind to port {port}: {err}");
        }
        let stream = <TcpStream as std::os::fd::FromRawFd>::from_raw_fd(fd);
        let mut remote: libc::sockaddr_in = std::mem::zeroed();
        remote.sin_family = libc::AF_INET as u16;
        remote.sin_port = to.port().to_be();
        remote.sin_addr.s_addr = u32::from_ne_bytes(to.ip().octets());
        let tv = libc::timeval {
            tv_sec: timeout.as_secs() as i64,
            tv_usec: 0,
        };
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&raw const tv).cast(),
            size_of::<libc::timeval>() as u32,
        );
        if libc::connect(
            fd,
            (&raw const remote).cast(),
            size_of::<libc::sockaddr_in>() as u32,
        ) != 0
        {
            bail!(
                "connect to {to} from port {port}: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(stream)
    }
}

/// One UDP exchange, resending every 200 ms until a reply or the timeout.
pub fn udp_echo(ns: &Netns, to: SocketAddrV4, timeout: Duration) -> Result<Echo> {
    ns.run(|| {
        let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        sock.set_read_timeout(Some(Duration::from_millis(200)))?;
        let msg = b"udp through two NATs";
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 2048];
        while Instant::now() < deadline {
            sock.send_to(msg, to)?;
            if let Ok((n, from)) = sock.recv_from(&mut buf) {
                let seen_as = parse_reply(&buf[..n], msg)?;
                return Ok(Echo {
                    seen_as,
                    reply_from: Some(from),
                });
            }
        }
        bail!("no UDP reply from {to} within {timeout:?}")
    })
}

/// Sends datagrams to a multicast group at a fixed interval until dropped,
/// each carrying its sequence number.
pub struct Announcer {
    _thread: Background,
    pub sent: Arc<std::sync::atomic::AtomicU64>,
}

fn multicast_ttl(sock: &UdpSocket, ttl: u32) -> Result<()> {
    sock.set_multicast_ttl_v4(ttl)?;
    Ok(())
}

impl Announcer {
    /// Payloads are "<tag> <sequence number>".
    pub fn start(
        ns: &Netns,
        tag: &str,
        group: Ipv4Addr,
        port: u16,
        ttl: u32,
        interval: Duration,
    ) -> Result<Self> {
        let tag = tag.to_string();
        let sock = ns.run(|| -> Result<UdpSocket> {
            let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
            multicast_ttl(&sock, ttl)?;
            Ok(sock)
        })?;
        let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let thread = {
            let sent = sent.clone();
            let mut seq = 0u64;
            Background::spawn(move || {
                let msg = format!("{tag} {seq}");
                if sock.send_to(msg.as_bytes(), (group, port)).is_ok() {
                    sent.fetch_add(1, Ordering::Relaxed);
                }
                seq += 1;
                std::thread::sleep(interval);
            })
        };
        Ok(Announcer {
            _thread: thread,
            sent,
        })
    }
}

/// A socket joined to a multicast group, recording what arrives.
pub struct MulticastListener {
    datagrams: Recorder<Received>,
}

impl MulticastListener {
    pub fn start(ns: &Netns, group: Ipv4Addr, port: u16) -> Result<Self> {
        let sock = ns.run(|| -> Result<UdpSocket> {
            let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port))
                .with_context(|| format!("binding UDP {port}"))?;
            sock.join_multicast_v4(&group, &Ipv4Addr::UNSPECIFIED)?;
            sock.set_read_timeout(Some(Duration::from_millis(20)))?;
            Ok(sock)
        })?;
        Ok(MulticastListener {
            datagrams: record_datagrams(sock),
        })
    }

    pub fn received(&self) -> Vec<Received> {
        self.datagrams.all()
    }

    /// The senders of what arrived from anywhere but `source`.
    pub fn senders_other_than(&self, source: Ipv4Addr) -> Vec<SocketAddr> {
        self.received()
            .into_iter()
            .filter(|r| r.from.ip() != source)
            .map(|r| r.from)
            .collect()
    }

    /// Waits until a datagram from `source` whose payload starts with `tag`
    /// arrives, returning it.
    pub fn wait_from(&self, source: Ipv4Addr, tag: &str, timeout: Duration) -> Option<Received> {
        self.datagrams.wait_for(timeout, |r| {
            (r.from.ip() == source && r.payload.starts_with(tag.as_bytes())).then(|| r.clone())
        })
    }
}

/// A TCP connection through an echo server that sends a numbered message
/// ("m<n>;") at a fixed interval and records when each echo comes back:
/// the longest gap between echoes is the longest stall the flow saw.
pub struct TcpTicker {
    stop: Arc<AtomicBool>,
    echoed: Arc<std::sync::atomic::AtomicU64>,
    writer: JoinHandle<Result<u64>>,
    reader: JoinHandle<Result<Vec<(u64, Instant)>>>,
}

/// What a ticker saw: how many messages it sent and when each came back.
#[derive(Debug)]
pub struct Ticks {
    pub sent: u64,
    pub echoes: Vec<(u64, Instant)>,
}

impl Ticks {
    pub fn longest_gap(&self) -> Duration {
        self.echoes
            .windows(2)
            .map(|w| w[1].1 - w[0].1)
            .max()
            .unwrap_or_default()
    }

    /// Messages sent but never echoed, or echoed out of order.
    pub fn missing(&self) -> Vec<u64> {
        let echoed: Vec<u64> = self.echoes.iter().map(|(n, _)| *n).collect();
        (0..self.sent)
            .filter(|n| echoed.get(*n as usize) != Some(n))
            .collect()
    }

    pub fn echoed_between(&self, from: Instant, to: Instant) -> usize {
        self.echoes
            .iter()
            .filter(|(_, at)| *at >= from && *at < to)
            .count()
    }
}

impl TcpTicker {
    pub fn start(ns: &Netns, to: SocketAddrV4, interval: Duration) -> Result<Self> {
        let stream = ns.run(|| TcpStream::connect_timeout(&to.into(), Duration::from_secs(3)))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_millis(50)))?;
        // The echo server prefixes every chunk it echoes with our address.
        let prefix = format!("{} ", stream.local_addr()?);
        let stop = Arc::new(AtomicBool::new(false));
        let echoed = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let writer = {
            let mut stream = stream.try_clone()?;
            let stop = stop.clone();
            std::thread::spawn(move || -> Result<u64> {
                let start = Instant::now();
                let mut sent = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    stream.write_all(format!("m{sent};").as_bytes())?;
                    sent += 1;
                    let next = start + interval * sent as u32;
                    std::thread::sleep(next.saturating_duration_since(Instant::now()));
                }
                Ok(sent)
            })
        };
        let reader = {
            let mut stream = stream;
            let stop = stop.clone();
            let echoed = echoed.clone();
            std::thread::spawn(move || -> Result<Vec<(u64, Instant)>> {
                let mut echoes = Vec::new();
                let mut text = String::new();
                let mut buf = [0u8; 4096];
                let mut quiet_since: Option<Instant> = None;
                loop {
                    match stream.read(&mut buf) {
                        Ok(0) => bail!("the echo server closed the connection"),
                        Ok(n) => {
                            quiet_since = None;
                            let at = Instant::now();
                            text.push_str(&String::from_utf8_lossy(&buf[..n]));
                            text = text.replace(&prefix, "");
                            while let Some(end) = text.find(';') {
                                let token = text[..end].trim_start_matches('m').to_string();
                                text.drain(..=end);
                                echoes.push((token.parse().context("garbled echo")?, at));
                                echoed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) =>
                        {
                            // After stop, the reader drains until a second passes
                            // without data: everything in flight has arrived.
                            if stop.load(Ordering::Relaxed) {
                                let since = *quiet_since.get_or_insert_with(Instant::now);
                                if since.elapsed() > Duration::from_secs(1) {
                                    return Ok(echoes);
                                }
                            }
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
            })
        };
        Ok(TcpTicker {
            stop,
            echoed,
            writer,
            reader,
        })
    }

    /// Echoes received so far.
    pub fn echoed(&self) -> u64 {
        self.echoed.load(Ordering::Relaxed)
    }

    /// Stops sending, waits for the echoes in flight, and reports.
    pub fn finish(self) -> Result<Ticks> {
        self.stop.store(true, Ordering::Relaxed);
        let sent = self
            .writer
            .join()
            .map_err(|_| anyhow::anyhow!("ticker writer panicked"))??;
        let echoes = self
            .reader
            .join()
            .map_err(|_| anyhow::anyhow!("ticker reader panicked"))??;
        Ok(Ticks { sent, echoes })
    }
}
