//! `forwarder run`: test the kernel, load and attach, then follow
//! rtnetlink and the control socket until told to stop, then remove
//! everything this instance created. The reconcile loop, rule management,
//! control dispatch and the flow table's walks each have their own file.
//!
//! Only a requested stop removes the datapath. A start that fails before
//! any link runs its programs leaves what a predecessor pinned as it found
//! it, so the predecessor's programs keep forwarding; any later failure
//! leaves the datapath attached and pinned, as a crash would, for the next
//! start to adopt (or `forwarder teardown` to remove).

mod flow_worker;
mod qubesdb;
mod reconcile;
mod requests;
mod rule_changes;
mod share_apply;
mod uplink_route;

use std::{collections::BTreeMap, future::poll_fn, task::Poll, time::Duration};

use anyhow::{Context as _, Result, anyhow};
use forwarder_common::maps::UplinkState;
use log::{info, warn};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{mpsc, oneshot},
};

use self::{
    flow_worker::FlowWorker,
    qubesdb::Qubesdb,
    rule_changes::{RuleBook, Update},
};
use crate::{
    adopt::{Found, Replaced},
    cli::TcHook,
    clock,
    config::RunConfig,
    control,
    datapath::{self, Datapath, HookKind, LoadOptions, Role},
    interfaces::Interfaces,
    internal_nets::InternalNets,
    kernel::Kernel,
    kernel_log,
    multicast::Memberships,
    netlink::{Event, Monitor, Route},
    nft,
    notify::Notifier,
    pin::{self, Bpffs, PinLayout},
    qubesdb::Tools,
    selftest, teardown,
    timers::{sleep_until, tick},
};

/// How often expired flows are swept from the table. The datapath ignores
/// them already; the sweep keeps listings and the table's fill honest.
const FLOW_SWEEP: Duration = Duration::from_secs(10);

/// What a start took over from a predecessor, finished at the first
/// reconcile, once every link runs this instance's programs.
struct Takeover {
    /// The maps migrated rather than adopted.
    replaced: Vec<Replaced>,
    /// When the flow table was first copied (CLOCK_BOOTTIME).
    copied_from_ns: u64,
    /// What the predecessor recorded it attached, and how.
    attachments: BTreeMap<u32, (Role, HookKind)>,
}

struct Daemon {
    config: RunConfig,
    layout: PinLayout,
    datapath: Datapath,
    /// Does every walk of the flow table.
    worker: FlowWorker,
    interfaces: Interfaces,
    /// The uplink as last written to its map; `None` before the first write.
    uplink: Option<UplinkState>,
    memberships: Memberships,
    /// What DOWNSTREAM_MACS holds, as last written (at start, as found:
    /// entries of interfaces no longer attached are pruned).
    downstream_macs: BTreeMap<u32, [u8; 6]>,
    /// Every IPv4 route, as last dumped.
    routes: Vec<Route>,
    /// What INTERNAL_NETS holds, as last written; `None` before the first
    /// write (a predecessor's bits may be there).
    internal_nets: Option<InternalNets>,
    takeover: Option<Takeover>,
    /// dom0's share, in a Qubes router.
    qubesdb: Option<Qubesdb>,
    /// To the rule book: what the event loop changes.
    updates: mpsc::Sender<Update>,
    /// The rule book's end, until it starts.
    updates_rx: Option<mpsc::Receiver<Update>>,
    /// Writes the programs' kernel log records, with `--kernel-log`.
    _kernel_log: Option<kernel_log::Reader>,
}

impl Daemon {
    /// Loads the datapath, adopting or migrating what a predecessor pinned.
    fn load(config: RunConfig, layout: &PinLayout) -> Result<Self> {
        let attachments = datapath::recorded_attachments(layout).unwrap_or_default();
        let copied_from_ns = clock::boot_ns();
        let (mut datapath, replaced) = load_datapath(&config, layout)?;
        let kernel_log = config
            .kernel_log
            .then(|| datapath.read_kernel_log())
            .transpose()?;
        let worker = FlowWorker::start(datapath::pinned_tables(layout)?, &layout.maps, FLOW_SWEEP)?;
        let downstream_macs = datapath.tables.downstream_macs()?;
        let memberships = Memberships::new(config.relays.iter().map(|r| r.group).collect());
        let (updates, updates_rx) = mpsc::channel(4);
        Ok(Daemon {
            config,
            layout: layout.clone(),
            datapath,
            worker,
            interfaces: Interfaces::default(),
            uplink: None,
            memberships,
            downstream_macs,
            routes: Vec::new(),
            internal_nets: None,
            takeover: Some(Takeover {
                replaced,
                copied_from_ns,
                attachments,
            }),
            qubesdb: None,
            updates,
            updates_rx: Some(updates_rx),
            _kernel_log: kernel_log,
        })
    }

    /// Follows dom0's share, whose first read `qubesdb` took.
    fn with_qubesdb(&mut self, qubesdb: Qubesdb) {
        self.qubesdb = Some(qubesdb);
        let groups = self.relays().iter().map(|r| r.group).collect();
        self.memberships.set_groups(groups);
    }

    /// What may fail comes before what changes how the predecessor's
    /// datapath forwards: the nftables table (replaced atomically, or not
    /// at all), the interfaces, the uplink's state (what is true now) and
    /// the group memberships; then the rules and relays in the maps, then
    /// the attachments.
    async fn start(&mut self) -> Result<()> {
        nft::install_off_thread(&self.config.uplink, &self.config.rules).await?;
        info!(
            "nftables table ip {} keeps masquerade off the listen ports",
            nft::TABLE
        );
        self.dump().await?;
        self.follow_uplink()?;
        let jobs = self.worker.jobs();
        for gone in jobs.apply(self.config.rules.clone()).await? {
            info!(
                "removed rule {gone}, which a previous instance left and the configuration does not hold"
            );
        }
        for rule in &self.config.rules {
            info!("forwarding {rule}");
        }
        self.datapath.tables.sync_relays(&self.relays())?;
        for relay in &self.config.relays {
            info!("relaying {relay}");
        }
        for (preset, target) in &self.config.presets {
            info!("{}", preset.advice(*target));
        }
        self.reconcile()?;
        self.refresh_route_mtus().await?;
        self.datapath.tables.bump_fib_generation()
    }

    /// A start that failed with `err`. Asked to stop meanwhile, it removes
    /// everything (the operator's wish) and stops cleanly; otherwise it
    /// leaves the datapath as the failure found it.
    async fn abandon(self, err: anyhow::Error, found: &Found, signals: &mut Signals) -> Result<()> {
        let layout = self.layout.clone();
        if signals.pending().await {
            drop(self);
            warn!("the start failed ({err:#}) while a stop was requested; removing everything");
            for what in teardown::remove_everything(&layout)? {
                info!("removed {what}");
            }
            return Ok(());
        }
        if !self.datapath.attached().is_empty() {
            self.leave_attached();
            return Err(err.context(
                "the datapath stays attached and pinned: the next start adopts it, \
                 `forwarder teardown` removes it",
            ));
        }
        drop(self);
        Err(give_back(err, &layout, found).await)
    }

    /// Ends the process's hold on the datapath without detaching it: a
    /// clsact filter is removed when its link object is dropped, a pinned
    /// TCX link outlives the process on its own.
    fn leave_attached(self) {
        let Daemon {
            datapath, worker, ..
        } = self;
        drop(worker);
        std::mem::forget(datapath);
    }

    /// Removes every program, link, pin and nftables object of this
    /// instance.
    async fn stop(self) -> Result<()> {
        let Daemon {
            datapath, worker, ..
        } = self;
        drop(worker);
        let nft_result = nft::remove_off_thread().await;
        let datapath_result = datapath.shutdown();
        nft_result.and(datapath_result)?;
        info!("removed all programs, links, pins and the nftables table");
        Ok(())
    }

    async fn follow(
        &mut self,
        monitor: &mut Monitor,
        server: &control::Server,
        stop: &mut Signals,
        notifier: &Notifier,
    ) -> Result<()> {
        let (calls_tx, calls) = mpsc::channel::<rule_changes::Call>(16);
        let (stop_rules, rules_stop) = oneshot::channel();
        let mut book = RuleBook::new(&self.config, self.worker.jobs());
        if let Some(updates) = self.updates_rx.take() {
            book = book.with_updates(updates);
        }
        let mut rules = tokio::spawn(book.serve(calls, rules_stop));
        let mut keepalive = notifier.keepalive_interval().map(tokio::time::interval);
        let followed = loop {
            let qubesdb_wakeup = self.qubesdb.as_ref().and_then(Qubesdb::wakeup);
            tokio::select! {
                conn = server.accept() => {
                    let stream = match conn.context("accepting on the control socket") {
                        Ok(stream) => stream,
                        Err(err) => break Err(err),
                    };
                    requests::serve_client(stream, calls_tx.clone());
                }
                ended = &mut rules => {
                    return Err(match ended {
                        Ok(Err(err)) => err.context("changing the rules"),
                        Ok(Ok(())) => anyhow!("the rule book stopped"),
                        Err(err) => anyhow!(err).context("the rule book's task"),
                    });
                }
                () = tick(keepalive.as_mut()) => notifier.alive(),
                read = self.next_qubesdb_read() => {
                    if let Err(err) = self.take_tree(read).await {
                        break Err(err);
                    }
                }
                () = sleep_until(qubesdb_wakeup) => {
                    if let Err(err) = self.reresolve_qubesdb().await {
                        break Err(err);
                    }
                }
                events = monitor.next() => {
                    let events = match events.context("reading rtnetlink") {
                        Ok(events) => events,
                        Err(err) => break Err(err),
                    };
                    if let Err(err) = self.follow_events(&events).await {
                        break Err(err);
                    }
                }
                _ = stop.sigint.recv() => { info!("SIGINT: stopping"); break Ok(()) }
                _ = stop.sigterm.recv() => { info!("SIGTERM: stopping"); break Ok(()) }
            }
        };
        drop(stop_rules);
        match rules.await {
            Ok(Err(err)) => warn!("changing the rules: {err:#}"),
            Err(err) => warn!("the rule book's task: {err}"),
            Ok(Ok(())) => {}
        }
        followed
    }

    async fn follow_events(&mut self, events: &[Event]) -> Result<()> {
        if events.contains(&Event::Overflow) {
            warn!("rtnetlink overflowed; resyncing");
            return self.resync().await;
        }
        for event in events {
            self.interfaces.apply(event);
        }
        // Routing changes (neighbours churn all the time) leave links and
        // addresses as they were: they only invalidate cached FIB results.
        if events
            .iter()
            .any(|e| !matches!(e, Event::RoutingChanged | Event::RoutesChanged))
        {
            self.reconcile()?;
        }
        if events.contains(&Event::RoutesChanged) {
            self.refresh_route_mtus().await?;
        }
        // A default route that moved, a VM's vif and route that came or
        // went: neighbours alone change neither.
        if events.iter().any(|e| *e != Event::RoutingChanged) {
            self.follow_default_route().await?;
            self.reresolve_qubesdb().await?;
        }
        if !events.is_empty() {
            self.datapath.tables.bump_fib_generation()?;
        }
        Ok(())
    }
}

/// SIGINT and SIGTERM, caught from the very start: a signal that arrives
/// while the datapath is being set up must still lead to a clean stop, not
/// to the default action that would leave pins and programs behind.
struct Signals {
    sigint: tokio::signal::unix::Signal,
    sigterm: tokio::signal::unix::Signal,
}

impl Signals {
    /// Whether either arrived and was not seen yet.
    async fn pending(&mut self) -> bool {
        poll_fn(|cx| {
            let int = self.sigint.poll_recv(cx).is_ready();
            let term = self.sigterm.poll_recv(cx).is_ready();
            Poll::Ready(int || term)
        })
        .await
    }
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

/// In a Qubes router started without an uplink: the default route's
/// interface, if there is one yet (the daemon follows it afterwards).
fn pick_uplink(config: &mut RunConfig) {
    if !config.follow_default_route {
        return;
    }
    match crate::default_route::interface() {
        Ok(Some(uplink)) => {
            info!("uplink {uplink}: the interface of the default route");
            config.uplink = uplink;
        }
        Ok(None) => {
            info!("no default route yet: the uplink will be the interface of the first one")
        }
        Err(err) => warn!("reading the default route: {err}; the uplink waits for it"),
    }
}

/// Runs the self-test and loads the datapath, adopting or migrating what a
/// predecessor pinned.
fn load_datapath(config: &RunConfig, layout: &PinLayout) -> Result<(Datapath, Vec<Replaced>)> {
    let kernel = Kernel::running();
    let support = selftest::run(&layout.selftest, config.flow_table_size, config.kernel_log)?;
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
        kernel_log: config.kernel_log,
        cut: None,
    };
    if config.kernel_log {
        info!(
            "kernel log on: what only the kernel sees goes to the log as warnings under {}",
            kernel_log::TARGET
        );
    }
    let (datapath, replaced) = Datapath::load(layout, &options, hook)?;
    for r in &replaced {
        warn!(
            "replaced the pinned map {} ({}); entries carried over: {}",
            r.name, r.why, r.carried
        );
    }
    Ok((datapath, replaced))
}

/// After a start failed before any link ran its programs: the pins go
/// back to what the predecessor left, or, with none, everything this start
/// created goes.
async fn give_back(err: anyhow::Error, layout: &PinLayout, found: &Found) -> anyhow::Error {
    let undone = if found.predecessor() {
        found
            .restore(layout)
            .map(|()| "left the previous instance's pins and links as they were")
    } else {
        match nft::remove_off_thread().await {
            Ok(()) => layout
                .remove()
                .map_err(anyhow::Error::from)
                .map(|()| "removed what it created"),
            Err(nft_err) => Err(nft_err),
        }
    };
    match undone {
        Ok(what) => err.context(format!("the start failed and {what}")),
        Err(undo_err) => {
            warn!("undoing the failed start: {undo_err:#}");
            err
        }
    }
}

async fn serve(mut config: RunConfig, layout: &PinLayout, signals: &mut Signals) -> Result<()> {
    // Another running instance holds the socket: found before anything of
    // its datapath is touched.
    let server = control::Server::bind(&config.pin_dir)?;
    info!("control socket {}", server.path().display());
    // Subscribe before the dump, so no change falls between the two.
    let mut monitor = Monitor::subscribe().context("subscribing to rtnetlink")?;
    let found = Found::read(layout)?;
    pick_uplink(&mut config);
    let qubesdb = if config.qubesdb {
        info!("following dom0's share in QubesDB (/vm-config/forwarder.N)");
        Some(Qubesdb::start(Tools::on_path(), &mut config).await?)
    } else {
        None
    };
    let mut daemon = match Daemon::load(config, layout) {
        Ok(daemon) => daemon,
        Err(err) => return Err(give_back(err, layout, &found).await),
    };
    if let Some(qubesdb) = qubesdb {
        daemon.with_qubesdb(qubesdb);
    }
    if let Err(err) = daemon.start().await {
        return daemon.abandon(err, &found, signals).await;
    }
    let notifier = Notifier::from_env();
    notifier.ready(&format!(
        "forwarding {} rules, relaying {} groups",
        daemon.config.rules.len(),
        daemon.relays().len()
    ));
    let followed = daemon
        .follow(&mut monitor, &server, signals, &notifier)
        .await;
    notifier.stopping();
    match followed {
        Ok(()) => daemon.stop().await,
        Err(err) => {
            daemon.leave_attached();
            Err(err.context(
                "the datapath stays attached and pinned: the next start adopts it, \
                 `forwarder teardown` removes it",
            ))
        }
    }
}
