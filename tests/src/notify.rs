//! A stand-in for systemd's notification socket that keeps every message
//! with the time it arrived: readiness, and the gaps between watchdog
//! pings.

use std::{
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::Result;

type Messages = Arc<Mutex<Vec<(Instant, String)>>>;

pub struct NotifyRecorder {
    path: PathBuf,
    messages: Messages,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl NotifyRecorder {
    pub fn bind(label: &str) -> Result<Self> {
        let path =
            std::env::temp_dir().join(format!("fwd-notify-rec-{}-{label}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let socket = UnixDatagram::bind(&path)?;
        socket.set_read_timeout(Some(Duration::from_millis(20)))?;
        let messages = Messages::default();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (messages, stop) = (messages.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 1024];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(n) = socket.recv(&mut buf) {
                        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                        messages.lock().unwrap().push((Instant::now(), text));
                    }
                }
            })
        };
        Ok(NotifyRecorder {
            path,
            messages,
            stop,
            thread: Some(thread),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// When READY=1 arrived, if it did.
    pub fn ready_at(&self) -> Option<Instant> {
        self.messages
            .lock()
            .unwrap()
            .iter()
            .find(|(_, m)| m.lines().any(|l| l == "READY=1"))
            .map(|(at, _)| *at)
    }

    /// When each WATCHDOG=1 arrived.
    pub fn pings(&self) -> Vec<Instant> {
        self.messages
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, m)| m.lines().any(|l| l == "WATCHDOG=1"))
            .map(|(at, _)| *at)
            .collect()
    }

    /// The longest time without a ping from `from` until now.
    pub fn longest_silence(&self, from: Instant) -> Duration {
        let mut last = from;
        let mut longest = Duration::ZERO;
        for at in self.pings().into_iter().filter(|at| *at >= from) {
            longest = longest.max(at - last);
            last = at;
        }
        longest.max(last.elapsed())
    }
}

impl Drop for NotifyRecorder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}
