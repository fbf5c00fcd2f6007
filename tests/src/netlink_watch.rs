//! Timestamps of rtnetlink address events in a namespace, seen the way the
//! forwarder sees them, so a test can measure from the event onwards.
//!
//! The watcher is a thread of its own that the daemon under test competes
//! with for two CPUs: it runs at a real-time priority, so it is woken as
//! soon as the kernel queues the event rather than after the daemon has
//! already acted on it, and a reader waits for its record instead of
//! assuming it is there by the time the daemon's effect is seen.

use std::{
    net::Ipv4Addr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use forwarder::netlink::{Event, Monitor};

use crate::{netns::Netns, wait::wait_until};

/// How long a reader waits for the watcher to record an event.
const RECORD_WAIT: Duration = Duration::from_secs(2);

/// A real-time priority (SCHED_FIFO) for the calling thread, low among
/// real-time ones; the thread sleeps in the kernel but for the moments it
/// reads an event. Returns whether the kernel granted it.
fn run_first() -> bool {
    let param = libc::sched_param { sched_priority: 1 };
    // SAFETY: pid 0 is the calling thread; param is a valid sched_param.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) == 0 }
}

pub struct AddressWatch {
    added: Arc<Mutex<Vec<(Instant, Ipv4Addr)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl AddressWatch {
    pub fn start(ns: &Netns) -> Result<Self> {
        let added = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel::<Result<()>>();
        let thread = {
            let added = added.clone();
            let stop = stop.clone();
            ns.spawn(move || {
                if !run_first() {
                    eprintln!(
                        "address watch: no real-time priority ({}); event times may be late",
                        std::io::Error::last_os_error()
                    );
                }
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    let mut monitor = match Monitor::subscribe() {
                        Ok(m) => m,
                        Err(err) => {
                            let _ = ready_tx.send(Err(err.into()));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(()));
                    while !stop.load(Ordering::Relaxed) {
                        if let Ok(Ok(events)) =
                            tokio::time::timeout(Duration::from_millis(20), monitor.next()).await
                        {
                            let at = Instant::now();
                            for event in events {
                                if let Event::NewAddress(addr) = event {
                                    added.lock().unwrap().push((at, addr.addr));
                                }
                            }
                        }
                    }
                });
            })?
        };
        ready_rx.recv().context("watch thread")??;
        Ok(AddressWatch {
            added,
            stop,
            thread: Some(thread),
        })
    }

    /// When `addr` was announced as added, if it was.
    pub fn added_at(&self, addr: Ipv4Addr) -> Option<Instant> {
        self.added_after(addr, None)
    }

    /// The first announcement of `addr` as added, at or after `since`. The
    /// daemon under test hears of the change too and may have acted on it
    /// before this watcher has run: waits up to two seconds for its record.
    pub fn added_after(&self, addr: Ipv4Addr, since: Option<Instant>) -> Option<Instant> {
        let find = || {
            self.added
                .lock()
                .unwrap()
                .iter()
                .find(|(t, a)| *a == addr && since.is_none_or(|s| *t >= s))
                .map(|(t, _)| *t)
        };
        let mut found = None;
        wait_until(RECORD_WAIT, || {
            found = find();
            found.is_some()
        });
        found
    }
}

impl Drop for AddressWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
