//! `forwarder run`: test the kernel, load and attach, then follow
//! rtnetlink and the control socket until told to stop, then remove
//! everything this instance created. The reconcile loop, rule management
//! and control dispatch each have their own file.

mod reconcile;
mod requests;
mod rule_changes;

use std::{collections::BTreeMap, time::Duration};

use anyhow::{Context as _, Result};
use forwarder_common::{flow, maps::UplinkState};
use log::{debug, info, warn};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

use crate::{
    cli::TcHook,
    clock,
    config::RunConfig,
    control,
    datapath::{Datapath, HookKind, LoadOptions},
    interfaces::Interfaces,
    kernel::Kernel,
    multicast::Memberships,
    netlink::{Event, Monitor},
    nft,
    notify::Notifier,
    pin::{self, Bpffs, PinLayout},
    selftest,
};

/// How often expired flows are swept from the table. The datapath ignores
/// them already; the sweep keeps listings and the table's fill honest.
const FLOW_SWEEP: Duration = Duration::from_secs(10);

struct Daemon {
    config: RunConfig,
    datapath: Datapath,
    interfaces: Interfaces,
    uplink: UplinkState,
    memberships: Memberships,
    /// What DOWNSTREAM_MACS holds, as last written.
    downstream_macs: BTreeMap<u32, [u8; 6]>,
    /// What a predecessor left is adopted at the first reconcile, and only
    /// then may the rest of it be removed.
    first_reconcile: bool,
}

impl Daemon {
    /// Removes flows past their idle timeout.
    fn sweep_flows(&mut self) -> Result<()> {
        let now = clock::boot_ns();
        let swept = self
            .datapath
            .tables
            .remove_flows(|key, entry| flow::expired(entry, key.proto, now))?;
        if swept > 0 {
            debug!("swept {swept} expired flows");
        }
        Ok(())
    }

    async fn follow(
        &mut self,
        monitor: &mut Monitor,
        server: &control::Server,
        stop: &mut Signals,
        notifier: &Notifier,
    ) -> Result<()> {
        let Signals { sigint, sigterm } = stop;
        let (calls_tx, mut calls) = mpsc::channel::<requests::Call>(16);
        let mut sweep = tokio::time::interval(FLOW_SWEEP);
        let mut keepalive = notifier.keepalive_interval().map(tokio::time::interval);
        loop {
            let expiry = self.next_expiry();
            tokio::select! {
                conn = server.accept() => {
                    let stream = conn.context("accepting on the control socket")?;
                    requests::serve_client(stream, calls_tx.clone());
                }
                Some((request, reply)) = calls.recv() => {
                    let _ = reply.send(self.handle(request).await);
                }
                () = sleep_until(expiry) => self.expire_rules().await?,
                _ = sweep.tick() => self.sweep_flows()?,
                () = tick(keepalive.as_mut()) => notifier.alive(),
                events = monitor.next() => {
                    let events = events.context("reading rtnetlink")?;
                    if events.contains(&Event::Overflow) {
                        warn!("rtnetlink overflowed; resyncing");
                        self.resync().await?;
                        continue;
                    }
                    for event in &events {
                        self.interfaces.apply(event);
                    }
                    // Routing changes (neighbours churn all the time) leave
                    // links and addresses as they were: they only invalidate
                    // cached FIB results.
                    if events
                        .iter()
                        .any(|e| !matches!(e, Event::RoutingChanged | Event::RoutesChanged))
                    {
                        self.reconcile()?;
                    }
                    if events.contains(&Event::RoutesChanged) {
                        self.refresh_route_mtus().await?;
                    }
                    if !events.is_empty() {
                        self.datapath.tables.bump_fib_generation()?;
                    }
                }
                _ = sigint.recv() => { info!("SIGINT: stopping"); return Ok(()) }
                _ = sigterm.recv() => { info!("SIGTERM: stopping"); return Ok(()) }
            }
        }
    }
}

/// SIGINT and SIGTERM, caught from the very start: a signal that arrives
/// while the datapath is being set up must still lead to a clean stop, not
/// to the default action that would leave pins and programs behind.
struct Signals {
    sigint: tokio::signal::unix::Signal,
    sigterm: tokio::signal::unix::Signal,
}

pub async fn run(config: RunConfig) -> Result<()> {
    let mut signals = Signals {
        sigint: signal(SignalKind::interrupt())?,
        sigterm: signal(SignalKind::terminate())?,
    };
    let layout = PinLayout::new(&config.pin_dir);
    let bpffs = pin::prepare(&layout)?;
    if let Bpffs::Mounted(at) = &bpffs {
        warn!(
            "no bpffs covered {}; mounted one at {}. That mount is private to this mount \
             namespace: `forwarder inspect` run elsewhere (e.g. via another `ip netns exec`) \
             will not see it",
            layout.root.display(),
            at.display()
        );
    }
    let result = serve(config, &layout, &mut signals).await;
    if let Bpffs::Mounted(at) = &bpffs {
        match pin::unmount_if_empty(at) {
            Ok(true) => info!("unmounted the bpffs at {}", at.display()),
            Ok(false) => info!(
                "left the bpffs at {} mounted: it holds other pins",
                at.display()
            ),
            Err(err) => warn!("{err:#}"),
        }
    }
    result
}

/// Runs the self-test and loads the datapath, adopting or migrating what a
/// predecessor pinned.
fn load(config: &RunConfig, layout: &PinLayout) -> Result<Datapath> {
    let kernel = Kernel::running();
    let support = selftest::run(&layout.root.join("selftest"), config.flow_table_size)?;
    let hook = match config.tc_hook {
        TcHook::Auto => HookKind::for_kernel(&kernel),
        TcHook::Fixed(hook) => hook,
    };
    info!(
        "{kernel}: self-test passed; programs attach with {}",
        hook.name()
    );
    for fallback in support.fallbacks() {
        info!("fallback for this kernel: {fallback}");
    }
    let options = LoadOptions {
        support,
        flow_table_size: config.flow_table_size,
    };
    let (datapath, replaced) = Datapath::load(layout, &options, hook)?;
    for r in &replaced {
        warn!(
            "replaced the pinned map {} ({}); entries carried over: {}",
            r.name, r.why, r.carried
        );
    }
    Ok(datapath)
}

async fn serve(config: RunConfig, layout: &PinLayout, signals: &mut Signals) -> Result<()> {
    let mut datapath = match load(&config, layout) {
        Ok(datapath) => datapath,
        Err(err) => {
            // Nothing is attached yet; leave no empty pin directories behind.
            if std::fs::read_dir(&layout.links).is_ok_and(|mut d| d.next().is_none()) {
                let _ = layout.remove();
            }
            return Err(err);
        }
    };
    let mut config = config;
    let now = std::time::SystemTime::now();
    config.rules.retain(|r| {
        let expired = r.expired(now);
        if expired {
            warn!("skipping rule {r}: it expired before the start");
        }
        !expired
    });
    let setup = async {
        for gone in datapath.tables.sync_rules(&config.rules)? {
            info!("removed rule {gone}, which a previous instance left and the configuration does not hold");
        }
        for rule in &config.rules {
            info!("forwarding {rule}");
        }
        datapath.tables.sync_relays(&config.relays)?;
        for relay in &config.relays {
            info!("relaying {relay}");
        }
        for (preset, target) in &config.presets {
            info!("{}", preset.advice(*target));
        }
        nft::install_off_thread(&config.uplink, &config.rules).await?;
        info!(
            "nftables table ip {} keeps masquerade off the listen ports",
            nft::TABLE
        );
        Ok::<_, anyhow::Error>(())
    }
    .await;
    if let Err(err) = setup {
        if let Err(cleanup) = stop(datapath).await {
            warn!("cleaning up after a failed start: {cleanup:#}");
        }
        return Err(err);
    }
    let memberships = Memberships::new(config.relays.iter().map(|r| r.group).collect());
    let mut daemon = Daemon {
        config,
        datapath,
        interfaces: Interfaces::default(),
        uplink: UplinkState::default(),
        memberships,
        downstream_macs: BTreeMap::new(),
        first_reconcile: true,
    };
    let notifier = Notifier::from_env();
    let served = async {
        let server = control::Server::bind(&daemon.config.pin_dir)?;
        info!("control socket {}", server.path().display());
        // Subscribe before the dump, so no change falls between the two.
        let mut monitor = Monitor::subscribe().context("subscribing to rtnetlink")?;
        daemon.resync().await?;
        notifier.ready(&format!(
            "forwarding {} rules, relaying {} groups",
            daemon.config.rules.len(),
            daemon.config.relays.len()
        ));
        daemon
            .follow(&mut monitor, &server, signals, &notifier)
            .await
    }
    .await;
    notifier.stopping();
    let stopped = stop(daemon.datapath).await;
    served.and(stopped)
}

/// Removes every program, link, pin and nftables object of this instance.
async fn stop(datapath: Datapath) -> Result<()> {
    let nft_result = nft::remove_off_thread().await;
    let datapath_result = datapath.shutdown();
    nft_result.and(datapath_result)?;
    info!("removed all programs, links, pins and the nftables table");
    Ok(())
}

/// Sleeps until `deadline`, or forever when there is none.
async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// The next tick of `interval`, or never without one.
async fn tick(interval: Option<&mut tokio::time::Interval>) {
    match interval {
        Some(interval) => drop(interval.tick().await),
        None => std::future::pending().await,
    }
}
