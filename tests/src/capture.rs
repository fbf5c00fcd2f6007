//! Every frame seen on one interface of a namespace, captured with an
//! AF_PACKET socket on a thread living in that namespace.

use std::{
    net::Ipv4Addr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread::JoinHandle,
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::netns::Netns;

const ETH_P_ALL: u16 = 0x0003;

pub struct Capture {
    frames: Arc<Mutex<Vec<Vec<u8>>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// An AF_PACKET socket bound to `ifname` of the calling thread's
/// namespace, seeing every frame; receives time out after 20 ms.
pub fn open(ifname: &str) -> Result<i32> {
    // SAFETY: plain socket calls with checked results.
    unsafe {
        let fd = libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW,
            i32::from(ETH_P_ALL.to_be()),
        );
        if fd < 0 {
            bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
        }
        let name = std::ffi::CString::new(ifname)?;
        let index = libc::if_nametoindex(name.as_ptr());
        if index == 0 {
            libc::close(fd);
            bail!("no interface {ifname}");
        }
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = ETH_P_ALL.to_be();
        addr.sll_ifindex = index as i32;
        if libc::bind(
            fd,
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_ll>() as u32,
        ) != 0
        {
            libc::close(fd);
            bail!("binding to {ifname}: {}", std::io::Error::last_os_error());
        }
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: 20_000,
        };
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const timeout).cast(),
            size_of::<libc::timeval>() as u32,
        );
        Ok(fd)
    }
}

impl Capture {
    /// Starts capturing; returns once the socket is bound, so nothing sent
    /// afterwards can be missed.
    pub fn start(ns: &Netns, ifname: &str) -> Result<Self> {
        let frames = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let ifname = ifname.to_string();
        let thread = {
            let frames = frames.clone();
            let stop = stop.clone();
            ns.spawn(move || {
                let fd = match open(&ifname) {
                    Ok(fd) => {
                        let _ = ready_tx.send(Ok(()));
                        fd
                    }
                    Err(err) => {
                        let _ = ready_tx.send(Err(err));
                        return;
                    }
                };
                let mut buf = vec![0u8; 65536];
                // Once stopped, what the socket already holds is still read
                // (without waiting): a frame the kernel delivered before
                // `finish` belongs to the capture.
                loop {
                    let stopping = stop.load(Ordering::Relaxed);
                    let flags = if stopping { libc::MSG_DONTWAIT } else { 0 };
                    // SAFETY: buf is valid for its length.
                    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), flags) };
                    if n > 0 {
                        frames.lock().unwrap().push(buf[..n as usize].to_vec());
                    } else if stopping {
                        break;
                    }
                }
                // SAFETY: closing our own socket.
                unsafe { libc::close(fd) };
            })?
        };
        ready_rx.recv().context("capture thread")??;
        Ok(Capture {
            frames,
            stop,
            thread: Some(thread),
        })
    }

    /// Every frame seen so far; the capture goes on.
    pub fn snapshot(&self) -> Vec<Vec<u8>> {
        self.frames.lock().unwrap().clone()
    }

    /// Stops and returns every frame seen.
    pub fn finish(mut self) -> Vec<Vec<u8>> {
        self.halt();
        std::mem::take(&mut *self.frames.lock().unwrap())
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.halt();
    }
}

/// Every IPv4 address a frame carries in its IP header and, for ICMP errors,
/// in the header it quotes.
pub fn addresses(frame: &[u8]) -> Vec<Ipv4Addr> {
    let mut out = Vec::new();
    if frame.len() < 34 || frame[12..14] != [0x08, 0x00] {
        return out;
    }
    let ip = &frame[14..];
    let at = |b: &[u8], i: usize| Ipv4Addr::new(b[i], b[i + 1], b[i + 2], b[i + 3]);
    out.push(at(ip, 12));
    out.push(at(ip, 16));
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if ip[9] == 1 && ip.len() >= ihl + 8 + 20 && matches!(ip[ihl], 3 | 4 | 5 | 11 | 12) {
        let inner = &ip[ihl + 8..];
        out.push(at(inner, 12));
        out.push(at(inner, 16));
    }
    out
}

/// Sends one raw frame out of `ifname` in `ns`, exactly as given.
pub fn inject(ns: &Netns, ifname: &str, frame: &[u8]) -> Result<()> {
    inject_all(ns, ifname, std::iter::once(frame.to_vec()))
}

/// Sends raw frames out of `ifname` in `ns`, as fast as the socket takes
/// them (a full queue is waited out, not dropped).
pub fn inject_all(
    ns: &Netns,
    ifname: &str,
    frames: impl Iterator<Item = Vec<u8>> + Send,
) -> Result<()> {
    ns.run(|| {
        let fd = open(ifname)?;
        let result = (|| {
            for frame in frames {
                loop {
                    // SAFETY: fd is a bound AF_PACKET socket; frame is valid.
                    let sent = unsafe { libc::send(fd, frame.as_ptr().cast(), frame.len(), 0) };
                    if sent == frame.len() as isize {
                        break;
                    }
                    let err = std::io::Error::last_os_error();
                    if err.raw_os_error() != Some(libc::ENOBUFS) {
                        bail!("sending on {ifname}: {err}");
                    }
                    std::thread::yield_now();
                }
            }
            Ok(())
        })();
        // SAFETY: closing our own socket.
        unsafe { libc::close(fd) };
        result
    })
}

/// One line about a frame, for failure messages.
/// Fails when any frame carries an address `internal` matches, saying how
/// many did and describing the first.
pub fn ensure_no_internal(frames: &[Vec<u8>], internal: impl Fn(&Ipv4Addr) -> bool) -> Result<()> {
    let leaks: Vec<&Vec<u8>> = frames
        .iter()
        .filter(|f| addresses(f).iter().any(&internal))
        .collect();
    ensure!(
        leaks.is_empty(),
        "{} frames with internal addresses, e.g. {}",
        leaks.len(),
        describe(leaks[0])
    );
    Ok(())
}

pub fn describe(frame: &[u8]) -> String {
    match crate::packet::parse(frame) {
        Some(p) => format!(
            "{} {}:{} -> {}:{} ttl {}",
            match p.proto {
                6 => "tcp",
                17 => "udp",
                _ => "ip",
            },
            p.saddr,
            p.sport,
            p.daddr,
            p.dport,
            p.ttl
        ),
        None => format!("{:?} ({} bytes)", addresses(frame), frame.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::{Frame, icmp_error};

    #[test]
    fn addresses_include_quoted_headers() {
        let a = Ipv4Addr::new(192, 168, 1, 10);
        let b = Ipv4Addr::new(10, 137, 0, 17);
        let plain = Frame::udp(a, 1, b, 2).build();
        assert_eq!(addresses(&plain), vec![a, b]);
        let err = icmp_error(a, a, 3, 3, &plain);
        assert!(addresses(&err).contains(&b));
    }
}
