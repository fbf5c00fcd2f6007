//! A router namespace for BPF_PROG_TEST_RUN: real interfaces, routes and
//! neighbours, so the programs' FIB lookups really happen, and the datapath
//! loaded with its maps pinned in the test bpffs.

use std::net::Ipv4Addr;

use anyhow::{Context as _, Result};
use aya::programs::{TestRun as _, TestRunOptions, TestRunResult};
use forwarder::{
    datapath::{Datapath, HookKind, LoadOptions, Role},
    interfaces::mac_text,
    internal_nets::InternalNets,
    kernel::Support,
    pin::{self, PinLayout},
    rules::{Origin, Relay, Rule},
    spec::{AllowFrom, Ports, Proto},
};
use forwarder_common::{
    cut::Cut,
    maps::{DEFAULT_FLOW_TABLE_SIZE, FlowEntry, FlowKey, UPLINK_HAS_ADDR, UPLINK_UP, UplinkState},
    reason::Reason,
};

use crate::{
    bpffs::PinDir,
    netns::{Link, Netns},
    packet::Mac,
};

pub const TC_ACT_UNSPEC: i32 = -1;
pub const TC_ACT_SHOT: i32 = 2;
pub const TC_ACT_REDIRECT: i32 = 7;

/// sizeof(struct __sk_buff) and the offset of its `ifindex`, which
/// BPF_PROG_TEST_RUN uses to pick the device the packet arrives on.
const SKB_CTX_LEN: usize = 192;
const SKB_CTX_IFINDEX: usize = 40;
const SKB_CTX_GSO_SIZE: usize = 176;

pub const UPLINK_ADDR: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 2);
pub const LAN_PEER: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 10);
pub const LAN_PEER_MAC: Mac = [0x02, 0, 0, 0, 1, 0x0a];
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 1);
pub const GATEWAY_MAC: Mac = [0x02, 0, 0, 0, 1, 0x01];
/// Behind vif1.0, with a neighbour entry.
pub const TARGET: Ipv4Addr = Ipv4Addr::new(10, 137, 0, 5);
pub const TARGET_MAC: Mac = [0x02, 0, 0, 0, 0, 0x05];
/// Behind vif2.0, with a neighbour entry.
pub const OTHER_VM: Ipv4Addr = Ipv4Addr::new(10, 137, 0, 6);
pub const OTHER_VM_MAC: Mac = [0x02, 0, 0, 0, 0, 0x06];
/// Behind vif1.0, without a neighbour entry.
pub const UNRESOLVED: Ipv4Addr = Ipv4Addr::new(10, 137, 0, 9);
/// The router's own address on its vifs (a Qubes netvm's gateway address).
pub const VIF_ADDR: Ipv4Addr = Ipv4Addr::new(10, 138, 0, 1);

/// LocalSend's port forwarded to TARGET, from any LAN host, given by flag.
pub fn localsend_rule(proto: Proto) -> Rule {
    Rule::new(
        proto,
        Ports::one(53317),
        TARGET,
        53317,
        AllowFrom::Auto,
        Origin::Flag,
    )
}

/// The flow table key of a peer of the rule `proto:listen_port`.
pub fn flow_key(proto: u8, peer: Ipv4Addr, peer_port: u16, listen_port: u16) -> FlowKey {
    FlowKey::new(
        u32::from_ne_bytes(peer.octets()),
        peer_port.to_be(),
        proto,
        listen_port.to_be(),
    )
}

pub struct Harness {
    pub datapath: Datapath,
    pub ns: Netns,
    pub uplink: Link,
    pub vif1: Link,
    pub vif2: Link,
    pins: PinDir,
    options: LoadOptions,
}

impl Harness {
    pub fn new(rules: &[Rule]) -> Result<Self> {
        Self::with_relays(rules, &[])
    }

    pub fn with_relays(rules: &[Rule], relays: &[Relay]) -> Result<Self> {
        Self::with_support(rules, relays, Support::NEWEST)
    }

    /// As `with_relays`, with the datapath loaded for a kernel that lacks
    /// what `support` says it lacks (the fallbacks the self-test picks).
    pub fn with_support(rules: &[Rule], relays: &[Relay], support: Support) -> Result<Self> {
        Self::with_kernel_log(rules, relays, support, false)
    }

    /// As `with_support`, with the programs writing kernel log records
    /// (`--kernel-log`) or not.
    pub fn with_kernel_log(
        rules: &[Rule],
        relays: &[Relay],
        support: Support,
        kernel_log: bool,
    ) -> Result<Self> {
        let ns = Netns::new("testrun")?;
        ns.sysctl("net.ipv4.ip_forward=1")?;
        for (a, b) in [("up0", "lan0"), ("vif1.0", "vm1"), ("vif2.0", "vm2")] {
            ns.ip(&format!("link add {a} type veth peer name {b}"))?;
            ns.ip(&format!("link set {a} up"))?;
            ns.ip(&format!("link set {b} up"))?;
        }
        ns.ip(&format!("addr add {UPLINK_ADDR}/24 dev up0"))?;
        ns.ip(&format!("route add default via {GATEWAY} dev up0"))?;
        for (addr, mac, dev) in [
            (GATEWAY, GATEWAY_MAC, "up0"),
            (LAN_PEER, LAN_PEER_MAC, "up0"),
            (TARGET, TARGET_MAC, "vif1.0"),
            (OTHER_VM, OTHER_VM_MAC, "vif2.0"),
        ] {
            if dev != "up0" {
                ns.ip(&format!("route add {addr}/32 dev {dev}"))?;
            }
            ns.ip(&format!(
                "neigh replace {addr} lladdr {} dev {dev} nud permanent",
                mac_text(mac)
            ))?;
        }
        ns.ip(&format!("route add {UNRESOLVED}/32 dev vif1.0"))?;
        for dev in ["vif1.0", "vif2.0"] {
            ns.ip(&format!("addr add {VIF_ADDR}/32 dev {dev}"))?;
        }

        let pins = PinDir::new("testrun")?;
        let layout = PinLayout::new(pins.path());
        pin::prepare(&layout)?;
        let options = LoadOptions {
            support,
            flow_table_size: DEFAULT_FLOW_TABLE_SIZE,
            kernel_log,
            cut: None,
        };
        let (mut datapath, _) = Datapath::load(&layout, &options, HookKind::Tcx)?;
        datapath.tables.sync_rules(rules)?;
        datapath.tables.sync_relays(relays)?;
        // What the daemon gathers from the namespace's vif routes and
        // addresses.
        datapath.tables.sync_internal_nets(&InternalNets::gather(
            rules,
            relays,
            &[(TARGET, 32), (OTHER_VM, 32), (UNRESOLVED, 32)],
            &[VIF_ADDR],
            &[],
        ))?;
        let mut harness = Harness {
            uplink: ns.link("up0")?,
            vif1: ns.link("vif1.0")?,
            vif2: ns.link("vif2.0")?,
            datapath,
            ns,
            pins,
            options,
        };
        let state = harness.uplink_state();
        let tables = &mut harness.datapath.tables;
        tables.set_uplink(state)?;
        for vif in [&harness.vif1, &harness.vif2] {
            tables.set_downstream_mac(vif.index, vif.mac)?;
        }
        Ok(harness)
    }

    /// The programs loaded again, stopping at `cut` (None: whole), over
    /// the same pinned maps: the rules, relays, flows and uplink state they
    /// meet are the harness's.
    pub fn variant(&self, cut: Option<Cut>) -> Result<Datapath> {
        let options = LoadOptions {
            cut,
            ..self.options
        };
        let layout = PinLayout::new(self.pins.path());
        Ok(Datapath::load(&layout, &options, HookKind::Tcx)?.0)
    }

    /// The harness's programs from now on are `variant(cut)`'s.
    pub fn cut_at(&mut self, cut: Option<Cut>) -> Result<()> {
        self.datapath = self.variant(cut)?;
        self.options.cut = cut;
        Ok(())
    }

    /// The state the daemon would write for up0.
    pub fn uplink_state(&self) -> UplinkState {
        UplinkState {
            ifindex: self.uplink.index,
            addr: u32::from_ne_bytes(UPLINK_ADDR.octets()),
            prefix_len: 24,
            flags: UPLINK_UP | UPLINK_HAS_ADDR,
            mac: self.uplink.mac,
        }
    }

    /// Runs `role`'s program on `frame` as if it arrived on `ifindex`.
    /// Returns the TC action and the packet as the program left it.
    pub fn run(&self, role: Role, ifindex: u32, frame: &[u8]) -> Result<(i32, Vec<u8>)> {
        self.run_gso(role, ifindex, frame, 0)
    }

    /// As `run`, for a GSO packet the stack will cut into `gso_size` pieces.
    pub fn run_gso(
        &self,
        role: Role,
        ifindex: u32,
        frame: &[u8],
        gso_size: u32,
    ) -> Result<(i32, Vec<u8>)> {
        let (result, mut out) = self.test_run(&self.datapath, role, ifindex, frame, gso_size, 0)?;
        out.truncate(result.data_size_out as usize);
        Ok((result.return_value as i32, out))
    }

    /// Average time of one run of `role`'s program on `frame` over
    /// `repeat` runs, as BPF_PROG_TEST_RUN measures it (the program alone,
    /// not the set-up of the test packet).
    pub fn cost(
        &self,
        role: Role,
        ifindex: u32,
        frame: &[u8],
        repeat: u32,
    ) -> Result<std::time::Duration> {
        self.cost_on(&self.datapath, role, ifindex, frame, repeat)
    }

    /// As `cost`, for the programs of `datapath` (a `variant`).
    pub fn cost_on(
        &self,
        datapath: &Datapath,
        role: Role,
        ifindex: u32,
        frame: &[u8],
        repeat: u32,
    ) -> Result<std::time::Duration> {
        Ok(self
            .test_run(datapath, role, ifindex, frame, 0, repeat)?
            .0
            .duration)
    }

    /// One BPF_PROG_TEST_RUN inside the namespace, so FIB lookups see its
    /// routes; returns the result and the output buffer, untruncated.
    fn test_run(
        &self,
        datapath: &Datapath,
        role: Role,
        ifindex: u32,
        frame: &[u8],
        gso_size: u32,
        repeat: u32,
    ) -> Result<(TestRunResult, Vec<u8>)> {
        let _inside = self.ns.enter()?;
        let prog = datapath.program(role)?;
        let mut ctx = [0u8; SKB_CTX_LEN];
        ctx[SKB_CTX_IFINDEX..SKB_CTX_IFINDEX + 4].copy_from_slice(&ifindex.to_ne_bytes());
        ctx[SKB_CTX_GSO_SIZE..SKB_CTX_GSO_SIZE + 4].copy_from_slice(&gso_size.to_ne_bytes());
        let mut out = vec![0u8; frame.len() + 512];
        let result = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                repeat,
                ..TestRunOptions::default()
            })
            .context("BPF_PROG_TEST_RUN")?;
        Ok((result, out))
    }

    /// The flow table's entry for a peer of the rule `proto:listen_port`.
    pub fn flow(
        &self,
        proto: u8,
        peer: Ipv4Addr,
        peer_port: u16,
        listen_port: u16,
    ) -> Option<FlowEntry> {
        let key = flow_key(proto, peer, peer_port, listen_port);
        self.datapath
            .tables
            .flows()
            .expect("reading the flow table")
            .into_iter()
            .find(|(k, _)| *k == key)
            .map(|(_, e)| e)
    }

    /// Writes a flow entry as given, e.g. one last seen long ago.
    pub fn set_flow(
        &mut self,
        proto: u8,
        peer: Ipv4Addr,
        peer_port: u16,
        listen_port: u16,
        entry: &FlowEntry,
    ) {
        let key = flow_key(proto, peer, peer_port, listen_port);
        self.datapath
            .tables
            .set_flow(&key, entry)
            .expect("writing the flow table");
    }

    /// The id of the installed rule `proto:listen_port`.
    pub fn rule_id(&self, proto: u8, listen_port: u16) -> u32 {
        self.datapath.tables.installed().expect("rules")[&(proto, listen_port)]
            .1
            .id
    }

    pub fn reason(&self, reason: Reason) -> u64 {
        self.datapath
            .tables
            .reason_count(reason)
            .expect("reading reason counters")
    }

    /// Runs `frame` and asserts the program left it alone and counted
    /// `reason`.
    pub fn assert_untouched(&self, role: Role, ifindex: u32, frame: &[u8], reason: Reason) {
        let before = self.reason(reason);
        let (action, out) = self
            .run(role, ifindex, frame)
            .unwrap_or_else(|e| panic!("{reason:?}, {} bytes: {e:#}", frame.len()));
        assert_eq!(action, TC_ACT_UNSPEC, "{reason:?}: action");
        assert_eq!(out, frame, "{reason:?}: bytes changed");
        assert_eq!(self.reason(reason), before + 1, "{reason:?} not counted");
    }
}
