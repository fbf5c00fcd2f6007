//! Timestamps of rtnetlink address events in a namespace, seen the way the
//! forwarder sees them, so a test can measure from the event onwards.

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

use crate::netns::Netns;

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

    /// The first announcement of `addr` as added, at or after `since`.
    pub fn added_after(&self, addr: Ipv4Addr, since: Option<Instant>) -> Option<Instant> {
        self.added
            .lock()
            .unwrap()
            .iter()
            .find(|(t, a)| *a == addr && since.is_none_or(|s| *t >= s))
            .map(|(t, _)| *t)
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
