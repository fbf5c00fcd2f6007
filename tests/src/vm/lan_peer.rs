//! The LAN peer of the NIC scenario. It runs on the host, in a namespace
//! holding the tap device QEMU backs the VM's virtio-net uplink with, and
//! does what the checks inside the VM ask over a line-based TCP control
//! connection (the VM reaches it through its own uplink):
//!
//!     announce <tag> <count> <interval ms>  ->  sent <n>
//!     bulk <bytes>                          ->  bulk <bytes> <sha256> <ms> <the app's reply>
//!
//! Anything that goes wrong is answered `error <message>`.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, Shutdown, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use sha2::{Digest as _, Sha256};

use crate::{
    netns::{Netns, run},
    topology::{LAN_GATEWAY, LAN_PEER, LOCALSEND_GROUP, LOCALSEND_PORT, SYSNET_LAN},
};

pub const CONTROL_PORT: u16 = 7070;

/// Deterministic bytes that do not compress and repeat nowhere near a
/// segment's length (xorshift64).
fn fill(state: &mut u64, buf: &mut [u8]) {
    for chunk in buf.chunks_mut(8) {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Sends `count` datagrams "<tag> <n>" to the relay group with TTL 1.
fn announce(tag: &str, count: u32, interval: Duration) -> Result<u32> {
    let sock = UdpSocket::bind((LAN_PEER, 0))?;
    sock.set_multicast_ttl_v4(1)?;
    let mut sent = 0;
    for n in 0..count {
        sock.send_to(
            format!("{tag} {n}").as_bytes(),
            (LOCALSEND_GROUP, LOCALSEND_PORT),
        )?;
        sent += 1;
        std::thread::sleep(interval);
    }
    Ok(sent)
}

/// Streams `bytes` to the forwarded port of sys-net's LAN address, closes
/// its side, and returns the line the app answers with, the SHA-256 of what
/// was sent and how long it took.
fn bulk(bytes: usize) -> Result<String> {
    let started = Instant::now();
    let to = SocketAddrV4::new(SYSNET_LAN, LOCALSEND_PORT);
    let mut stream = TcpStream::connect_timeout(&to.into(), Duration::from_secs(30))
        .with_context(|| format!("connecting to {to}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    stream.set_write_timeout(Some(Duration::from_secs(120)))?;
    let mut hash = Sha256::new();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len());
        fill(&mut state, &mut buf[..n]);
        stream.write_all(&buf[..n])?;
        hash.update(&buf[..n]);
        left -= n;
    }
    stream.shutdown(Shutdown::Write)?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    Ok(format!(
        "bulk {bytes} {} {} {}",
        hex(&hash.finalize()),
        started.elapsed().as_millis(),
        reply.trim()
    ))
}

fn answer(request: &str) -> Result<String> {
    let words: Vec<&str> = request.split_whitespace().collect();
    match words.as_slice() {
        ["announce", tag, count, interval] => {
            let sent = announce(
                tag,
                count.parse()?,
                Duration::from_millis(interval.parse()?),
            )?;
            Ok(format!("sent {sent}"))
        }
        ["bulk", bytes] => bulk(bytes.parse()?),
        _ => bail!("unknown request {request:?}"),
    }
}

fn serve_connection(stream: TcpStream) -> Result<()> {
    let mut writer = stream.try_clone()?;
    for request in BufReader::new(stream).lines() {
        let request = request?;
        let reply = answer(&request).unwrap_or_else(|err| format!("error {err:#}"));
        writeln!(writer, "{reply}")?;
    }
    Ok(())
}

/// Runs in the LAN namespace on the host: gives the tap the LAN peer's
/// address and a default route, as a host on a LAN has, prints `ready`,
/// then serves control connections until its stdin closes (the host task
/// holds it open for as long as the VM runs).
pub fn serve(tap: &str) -> Result<()> {
    let ip = |args: &str| run(std::process::Command::new("ip").args(args.split_whitespace()));
    ip(&format!("addr add {LAN_PEER}/24 dev {tap}"))?;
    ip(&format!("link set {tap} up"))?;
    ip(&format!("route add default via {LAN_GATEWAY} dev {tap}"))?;
    let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, CONTROL_PORT))?;
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                if let Err(err) = serve_connection(stream) {
                    eprintln!("lan-peer: {err:#}");
                }
            });
        }
    });
    println!("ready");
    std::io::stdout().flush()?;
    std::io::copy(&mut std::io::stdin(), &mut std::io::sink())?;
    Ok(())
}

/// What the LAN peer reported of one bulk transfer.
pub struct Bulk {
    pub bytes: usize,
    pub sent_sha256: String,
    pub millis: u64,
    /// The app's answer: the SHA-256 and length of what it received.
    pub received_sha256: String,
    pub received_bytes: usize,
}

/// The VM's end of the control connection, opened from a namespace whose
/// routes reach the LAN peer.
pub struct Control {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Control {
    pub fn connect(ns: &Netns, timeout: Duration) -> Result<Self> {
        let to = SocketAddrV4::new(LAN_PEER, CONTROL_PORT);
        let stream = ns
            .run(|| TcpStream::connect_timeout(&to.into(), timeout))
            .with_context(|| format!("connecting to the LAN peer's control port {to}"))?;
        stream.set_read_timeout(Some(Duration::from_secs(300)))?;
        Ok(Control {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        })
    }

    fn ask(&mut self, request: &str) -> Result<String> {
        writeln!(self.writer, "{request}")?;
        let mut reply = String::new();
        self.reader.read_line(&mut reply)?;
        let reply = reply.trim().to_string();
        if let Some(err) = reply.strip_prefix("error ") {
            bail!("the LAN peer: {err}");
        }
        ensure!(
            !reply.is_empty(),
            "the LAN peer closed the control connection"
        );
        Ok(reply)
    }

    /// Has the LAN peer send `count` announcements tagged `tag`; returns
    /// once they are sent.
    pub fn announce(&mut self, tag: &str, count: u32, interval: Duration) -> Result<u32> {
        let reply = self.ask(&format!("announce {tag} {count} {}", interval.as_millis()))?;
        reply
            .strip_prefix("sent ")
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("unexpected reply {reply:?}"))
    }

    /// Has the LAN peer stream `bytes` to sys-net's forwarded port.
    pub fn bulk(&mut self, bytes: usize) -> Result<Bulk> {
        let reply = self.ask(&format!("bulk {bytes}"))?;
        let words: Vec<&str> = reply.split_whitespace().collect();
        match words.as_slice() {
            ["bulk", bytes, sent, millis, received, received_bytes] => Ok(Bulk {
                bytes: bytes.parse()?,
                sent_sha256: sent.to_string(),
                millis: millis.parse()?,
                received_sha256: received.to_string(),
                received_bytes: received_bytes.parse()?,
            }),
            _ => bail!("unexpected reply {reply:?}"),
        }
    }
}

/// The app's end of a bulk transfer: one connection on `port`, read to its
/// end, answered with "<sha256> <bytes>".
pub fn sink(ns: &Netns, port: u16) -> Result<std::thread::JoinHandle<Result<()>>> {
    let listener = ns.run(|| TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)))?;
    Ok(std::thread::spawn(move || {
        let (mut conn, _) = listener.accept()?;
        conn.set_read_timeout(Some(Duration::from_secs(120)))?;
        let mut hash = Sha256::new();
        let mut total = 0usize;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = conn.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
            total += n;
        }
        writeln!(conn, "{} {total}", hex(&hash.finalize()))?;
        Ok(())
    }))
}
