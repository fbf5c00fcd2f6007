//! `forwarder run`: attach, then follow rtnetlink until told to stop, then
//! remove everything this instance created.

use std::{
    collections::BTreeMap,
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, Result};
use forwarder_common::maps::{UPLINK_UP, UplinkState};
use log::{info, warn};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{mpsc, oneshot},
};

use crate::{
    config::{self, RunConfig},
    control::{self, Request, Response, RuleView},
    datapath::{Datapath, Role},
    interfaces::{self, Interfaces},
    multicast::Memberships,
    netlink::{self, Event, Monitor},
    nft,
    pin::{self, Bpffs, PinLayout},
    rules::{self, Origin, Rule},
    spec::{AllowFrom, ForwardSpec, RuleRef},
};

/// A request from a control-socket client, and where its answer goes.
type Call = (Request, oneshot::Sender<Response>);

struct Daemon {
    config: RunConfig,
    datapath: Datapath,
    interfaces: Interfaces,
    uplink: UplinkState,
    memberships: Memberships,
    /// What DOWNSTREAM_MACS holds, as last written.
    downstream_macs: BTreeMap<u32, [u8; 6]>,
    /// Link pins a predecessor left are adopted at the first reconcile and
    /// only then may the rest be removed.
    first_reconcile: bool,
}

impl Daemon {
    /// Brings the datapath in line with the interfaces: the uplink state map,
    /// and one attachment per uplink/downstream interface.
    fn reconcile(&mut self) -> Result<()> {
        let state = self.interfaces.uplink_state(&self.config.uplink);
        if state != self.uplink || self.first_reconcile {
            self.datapath.tables.set_uplink(state)?;
            if state.ifindex == 0 {
                warn!(
                    "uplink {} is absent; waiting for it to appear",
                    self.config.uplink
                );
            } else {
                info!(
                    "uplink {}: {}",
                    self.config.uplink,
                    interfaces::describe(&state)
                );
            }
            self.uplink = state;
        }
        let uplink_ifindex = if state.flags & UPLINK_UP != 0 {
            state.ifindex
        } else {
            0
        };
        for group in self.memberships.follow(uplink_ifindex)? {
            info!("joined {group} on {}", self.config.uplink);
        }

        let mut wanted: BTreeMap<u32, (Role, String)> = BTreeMap::new();
        if let Some(link) = self.interfaces.link_by_name(&self.config.uplink) {
            wanted.insert(link.index, (Role::Uplink, link.name.clone()));
        }
        for link in self
            .interfaces
            .downstream(&self.config.downstream, &self.config.uplink)
        {
            wanted.insert(link.index, (Role::Downstream, link.name.clone()));
        }

        let stale: Vec<u32> = self
            .datapath
            .attached()
            .iter()
            .filter(|(ifindex, a)| wanted.get(ifindex).is_none_or(|(role, _)| *role != a.role))
            .map(|(ifindex, _)| *ifindex)
            .collect();
        for ifindex in stale {
            let name = self.datapath.attached()[&ifindex].ifname.clone();
            self.datapath.detach(ifindex)?;
            info!("detached from {name} (ifindex {ifindex})");
        }
        for (ifindex, (role, name)) in wanted {
            if self.datapath.attached().contains_key(&ifindex) {
                continue;
            }
            match self.datapath.attach(ifindex, &name, role) {
                Ok(true) => info!(
                    "adopted the pinned {} link on {name} (ifindex {ifindex})",
                    role.name()
                ),
                Ok(false) => info!(
                    "attached {} program to {name} (ifindex {ifindex})",
                    role.name()
                ),
                // The interface can vanish between the event and the attach;
                // its removal event follows and settles the state.
                Err(err) => warn!("cannot attach to {name} (ifindex {ifindex}): {err:#}"),
            }
        }
        self.sync_downstream_macs()?;
        if self.first_reconcile {
            self.first_reconcile = false;
            for path in self.datapath.remove_stale_link_pins()? {
                info!("removed stale pinned link {}", path.display());
            }
        }
        Ok(())
    }

    /// Keeps DOWNSTREAM_MACS equal to the MACs of the attached downstream
    /// interfaces, which relay copies toward VMs use as source.
    fn sync_downstream_macs(&mut self) -> Result<()> {
        let wanted: BTreeMap<u32, [u8; 6]> = self
            .datapath
            .attached()
            .iter()
            .filter(|(_, a)| a.role == Role::Downstream)
            .filter_map(|(ifindex, _)| Some((*ifindex, self.interfaces.link(*ifindex)?.mac?)))
            .collect();
        for ifindex in self.downstream_macs.keys() {
            if !wanted.contains_key(ifindex) {
                self.datapath.tables.remove_downstream_mac(*ifindex)?;
            }
        }
        for (ifindex, mac) in &wanted {
            if self.downstream_macs.get(ifindex) != Some(mac) {
                self.datapath.tables.set_downstream_mac(*ifindex, *mac)?;
            }
        }
        self.downstream_macs = wanted;
        Ok(())
    }

    /// Makes the datapath and the nftables guard hold the current rules.
    fn apply_rules(&mut self) -> Result<()> {
        self.datapath.tables.sync_rules(&self.config.rules)?;
        nft::install(&self.config.uplink, &self.config.rules)
    }

    /// Removes rules whose time is up.
    fn expire_rules(&mut self) -> Result<()> {
        let now = SystemTime::now();
        let (expired, kept): (Vec<Rule>, Vec<Rule>) =
            self.config.rules.drain(..).partition(|r| r.expired(now));
        self.config.rules = kept;
        if !expired.is_empty() {
            self.apply_rules()?;
            for rule in expired {
                info!("rule {} expired and was removed", rule);
            }
        }
        Ok(())
    }

    fn next_expiry(&self) -> Option<SystemTime> {
        self.config.rules.iter().filter_map(|r| r.expires).min()
    }

    fn rule_views(&self) -> Result<Vec<RuleView>> {
        let installed = self.datapath.tables.installed()?;
        let now = SystemTime::now();
        self.config
            .rules
            .iter()
            .map(|rule| {
                let counters = match installed.get(&(rule.proto.number(), rule.port)) {
                    Some((_, value)) => self.datapath.tables.rule_counters(value.slot)?,
                    None => Default::default(),
                };
                Ok(RuleView {
                    proto: rule.proto.to_string(),
                    port: rule.port,
                    target: rule.target,
                    target_port: rule.target_port,
                    allow_from: rule.allow.to_string(),
                    comment: rule.comment.clone(),
                    expires_in_secs: rule
                        .expires
                        .map(|t| t.duration_since(now).unwrap_or(Duration::ZERO).as_secs()),
                    origin: rule.origin,
                    packets_in: counters.packets_in,
                    bytes_in: counters.bytes_in,
                    packets_out: counters.packets_out,
                    bytes_out: counters.bytes_out,
                })
            })
            .collect()
    }

    /// The file `--save` writes to; checked before a change is made, so a
    /// refused save changes nothing.
    fn save_target(&self) -> Result<std::path::PathBuf, String> {
        self.config.config_file.clone().ok_or_else(|| {
            "this instance was started without --config: there is no file to save to".into()
        })
    }

    fn save(&mut self) -> Result<(), String> {
        let path = self.save_target()?;
        config::save_rules(&path, &self.config.rules)?;
        for rule in &mut self.config.rules {
            if rule.origin != Origin::Preset {
                rule.origin = Origin::File;
            }
        }
        info!(
            "saved {} forward rules to {}",
            self.config.rules.len(),
            path.display()
        );
        Ok(())
    }

    fn handle(&mut self, request: Request) -> Response {
        let result = match request {
            Request::List => Ok(String::new()),
            Request::Add {
                spec,
                allow_from,
                expire_secs,
                comment,
                save,
            } => self.add_rule(&spec, allow_from.as_deref(), expire_secs, comment, save),
            Request::Del { rule, save } => self.del_rule(&rule, save),
        };
        match result.and_then(|message| {
            self.rule_views()
                .map_err(|e| format!("{e:#}"))
                .map(|v| (message, v))
        }) {
            Ok((message, rules)) => Response {
                ok: true,
                message: (!message.is_empty()).then_some(message),
                rules,
                error: None,
            },
            Err(error) => Response::error(error),
        }
    }

    fn add_rule(
        &mut self,
        spec: &str,
        allow_from: Option<&str>,
        expire_secs: Option<u64>,
        comment: Option<String>,
        save: bool,
    ) -> Result<String, String> {
        if save {
            self.save_target()?;
        }
        let spec: ForwardSpec = spec.parse()?;
        let target = spec.target.or(self.config.target).ok_or_else(|| {
            format!("{spec}: no target address and the instance has no default target")
        })?;
        let allow = match allow_from {
            Some(a) => a.parse::<AllowFrom>()?,
            None => self.config.allow_from.clone(),
        };
        let mut rule = Rule::from_spec(&spec, target, allow, Origin::Live);
        rule.comment = comment;
        rule.expires = expire_secs.map(|s| SystemTime::now() + Duration::from_secs(s));
        let mut candidate = self.config.rules.clone();
        candidate.push(rule.clone());
        rules::check(&candidate)?;
        let previous = std::mem::replace(&mut self.config.rules, candidate);
        if let Err(err) = self.apply_rules() {
            self.config.rules = previous;
            let _ = self.apply_rules();
            return Err(format!("{err:#}"));
        }
        info!("added rule {rule} over the control socket");
        if save {
            self.save()?;
        }
        Ok(format!("added {rule}"))
    }

    fn del_rule(&mut self, rule: &str, save: bool) -> Result<String, String> {
        if save {
            self.save_target()?;
        }
        let target: RuleRef = rule.parse()?;
        let index = self
            .config
            .rules
            .iter()
            .position(|r| r.proto == target.proto && r.port == target.port)
            .ok_or_else(|| format!("no rule {target}"))?;
        if save && self.config.rules[index].origin == Origin::Preset {
            return Err(format!(
                "{target} comes from the localsend preset; remove `localsend` from the config file to drop it for good, or delete it without --save"
            ));
        }
        let removed = self.config.rules.remove(index);
        self.apply_rules().map_err(|e| format!("{e:#}"))?;
        info!("deleted rule {removed} over the control socket");
        if save {
            self.save()?;
        }
        Ok(format!("deleted {removed}"))
    }

    /// Dumps links and addresses afresh (at start, and after the event
    /// stream overflowed) and forgets every FIB result the datapath cached.
    async fn resync(&mut self) -> Result<()> {
        let (links, addresses) = netlink::dump()
            .await
            .context("dumping links and addresses")?;
        self.interfaces = Interfaces::new(links, addresses);
        self.reconcile()?;
        self.datapath.tables.bump_fib_generation()
    }

    async fn follow(
        &mut self,
        monitor: &mut Monitor,
        server: &control::Server,
        stop: &mut Signals,
    ) -> Result<()> {
        let Signals { sigint, sigterm } = stop;
        let (calls_tx, mut calls) = mpsc::channel::<Call>(16);
        loop {
            let expiry = self.next_expiry().map(|t| {
                let wait = t
                    .duration_since(SystemTime::now())
                    .unwrap_or(Duration::ZERO);
                tokio::time::Instant::now() + wait
            });
            tokio::select! {
                conn = server.accept() => {
                    let mut stream = conn.context("accepting on the control socket")?;
                    let calls_tx = calls_tx.clone();
                    tokio::spawn(async move {
                        let response = match control::read_request(&mut stream).await {
                            Ok(request) => {
                                let (tx, rx) = oneshot::channel();
                                let _ = calls_tx.send((request, tx)).await;
                                rx.await.unwrap_or_else(|_| Response::error("the daemon is stopping"))
                            }
                            Err(response) => response,
                        };
                        control::write_response(&mut stream, &response).await;
                    });
                }
                Some((request, reply)) = calls.recv() => {
                    let _ = reply.send(self.handle(request));
                }
                () = sleep_until(expiry) => self.expire_rules()?,
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
                    // Route and neighbour changes (ARP churns all the time)
                    // leave links and addresses as they were: they only
                    // invalidate cached FIB results.
                    if events.iter().any(|e| !matches!(e, Event::RoutingChanged)) {
                        self.reconcile()?;
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

async fn serve(config: RunConfig, layout: &PinLayout, signals: &mut Signals) -> Result<()> {
    let mut datapath = match Datapath::load(layout) {
        Ok(datapath) => datapath,
        Err(err) => {
            // Nothing is attached yet; leave no empty pin directories behind.
            let _ = layout.remove();
            return Err(err);
        }
    };
    let mut config = config;
    let now = SystemTime::now();
    config.rules.retain(|r| {
        let expired = r.expired(now);
        if expired {
            warn!("skipping rule {r}: it expired before the start");
        }
        !expired
    });
    let setup = (|| -> Result<()> {
        datapath.tables.sync_rules(&config.rules)?;
        for rule in &config.rules {
            info!("forwarding {rule}");
        }
        datapath.tables.sync_relays(&config.relays)?;
        for relay in &config.relays {
            info!("relaying {relay}");
        }
        nft::install(&config.uplink, &config.rules)?;
        info!(
            "nftables table ip {} keeps masquerade off the listen ports",
            nft::TABLE
        );
        Ok(())
    })();
    if let Err(err) = setup {
        if let Err(cleanup) = stop(datapath) {
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
    // Subscribe before the dump, so no change falls between the two.
    let served = async {
        let server = control::Server::bind(&daemon.config.pin_dir)?;
        info!("control socket {}", server.path().display());
        let mut monitor = Monitor::subscribe().context("subscribing to rtnetlink")?;
        daemon.resync().await?;
        daemon.follow(&mut monitor, &server, signals).await
    }
    .await;
    let stopped = stop(daemon.datapath);
    served.and(stopped)
}

/// Removes every program, link, pin and nftables object of this instance.
fn stop(datapath: Datapath) -> Result<()> {
    let nft_result = nft::remove();
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
