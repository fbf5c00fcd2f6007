//! The thread that does everything that walks the flow table: the periodic
//! sweep of expired flows, rule changes (which end the flows of the rules
//! they remove or retarget) and the per-rule flow counts of `rules`
//! answers. At the largest flow table a walk takes seconds; here it never
//! holds up the event loop, and with it the systemd watchdog. One job at a
//! time: two walks never compete.

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc::{self, RecvTimeoutError},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow};
use aya::maps::MapData;
use forwarder_common::{flow, maps::names};
use log::{debug, warn};
use tokio::sync::oneshot;

use crate::{clock, flow_table::FlowTable, rule_view::RuleView, rules::Rule, tables::Tables};

enum Job {
    /// Makes the rule maps hold these rules; answers the rules removed.
    Apply(Vec<Rule>, oneshot::Sender<Result<Vec<String>>>),
    /// The installed rules with their live flows.
    Views(oneshot::Sender<Result<Vec<RuleView>>>),
    /// Wakes the thread to find it is told to stop.
    Stop,
}

/// The event loop's end: asks for jobs and awaits their answers.
#[derive(Clone)]
pub(super) struct Jobs(mpsc::Sender<Job>);

impl Jobs {
    async fn ask<T>(&self, job: impl FnOnce(oneshot::Sender<T>) -> Job) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.0
            .send(job(tx))
            .map_err(|_| anyhow!("the flow table thread has stopped"))?;
        rx.await
            .map_err(|_| anyhow!("the flow table thread stopped before answering"))
    }

    /// Installs `rules`, removing the flows of rules gone or retargeted;
    /// returns the rules removed, as `proto:port`.
    pub(super) async fn apply(&self, rules: Vec<Rule>) -> Result<Vec<String>> {
        self.ask(|tx| Job::Apply(rules, tx)).await?
    }

    /// The installed rules as `rules list` shows them.
    pub(super) async fn views(&self) -> Result<Vec<RuleView>> {
        self.ask(Job::Views).await?
    }
}

pub(super) struct FlowWorker {
    jobs: Jobs,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FlowWorker {
    /// Starts the thread on the maps of `tables`, pinned in `maps`; it
    /// sweeps expired flows every `sweep_every`.
    pub(super) fn start(tables: Tables, maps: &Path, sweep_every: Duration) -> Result<Self> {
        let flows = MapData::from_pin(maps.join(names::FLOWS))
            .with_context(|| format!("opening the flow table in {}", maps.display()))?;
        let (tx, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("flow-table".into())
                .spawn(move || serve(tables, &flows, &rx, sweep_every, &stop))
                .context("starting the flow table thread")?
        };
        Ok(FlowWorker {
            jobs: Jobs(tx),
            stop,
            thread: Some(thread),
        })
    }

    pub(super) fn jobs(&self) -> Jobs {
        self.jobs.clone()
    }
}

/// Stops the thread, cutting a sweep short between two batches; jobs still
/// queued are dropped unanswered.
impl Drop for FlowWorker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.jobs.0.send(Job::Stop);
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            warn!("the flow table thread panicked");
        }
    }
}

fn serve(
    mut tables: Tables,
    flows: &MapData,
    jobs: &mpsc::Receiver<Job>,
    sweep_every: Duration,
    stop: &AtomicBool,
) {
    let mut next_sweep = Instant::now() + sweep_every;
    while !stop.load(Ordering::Relaxed) {
        match jobs.recv_timeout(next_sweep.saturating_duration_since(Instant::now())) {
            Ok(Job::Stop) => return,
            Ok(Job::Apply(rules, answer)) => drop(answer.send(tables.sync_rules(&rules))),
            Ok(Job::Views(answer)) => drop(answer.send(tables.rule_views())),
            Err(RecvTimeoutError::Timeout) => {
                sweep(flows, stop);
                next_sweep = Instant::now() + sweep_every;
            }
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// Removes the flows past their idle timeout. The datapath ignores them
/// already; the sweep keeps listings and the table's fill honest.
fn sweep(flows: &MapData, stop: &AtomicBool) {
    let started = Instant::now();
    let now = clock::boot_ns();
    match FlowTable::of(flows).remove_if(
        |key, entry| flow::expired(entry, key.proto, now),
        || !stop.load(Ordering::Relaxed),
    ) {
        Ok(swept) => debug!(
            "swept {} expired flows of {} in {} ms{}",
            swept.removed,
            swept.seen,
            started.elapsed().as_millis(),
            if swept.stopped { " (stopped)" } else { "" }
        ),
        Err(err) => warn!("sweeping the flow table: {err:#}"),
    }
}
