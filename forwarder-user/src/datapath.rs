//! Loading the eBPF object, attaching its programs, and adopting what a
//! predecessor left (pinned TCX links, or clsact filters in our slot) so
//! forwarding never stops for a restart.

use std::{collections::BTreeMap, fs, io, path::Path, path::PathBuf};

use anyhow::{Context as _, Result, anyhow};
use aya::{
    Ebpf, EbpfLoader, VerifierLogLevel,
    maps::{Array, HashMap, Map, MapData, ProgramArray},
    programs::{
        SchedClassifier, TcAttachType,
        links::{FdLink, LinkError, LinkOrder, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcError, TcHandle},
    },
    sys::SyscallError,
};
use forwarder_common::{
    cut::{self, Cut},
    maps::{globals, names, programs},
};

use crate::{
    EBPF_OBJECT,
    adopt::{self, Replaced},
    kernel::{Kernel, Support, TCX_SINCE},
    kernel_log,
    pin::PinLayout,
    tables::{RuleIds, Tables},
};

/// Which program an interface runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Uplink,
    Downstream,
}

impl Role {
    pub const fn name(self) -> &'static str {
        match self {
            Role::Uplink => "uplink",
            Role::Downstream => "downstream",
        }
    }

    const fn program(self) -> &'static str {
        match self {
            Role::Uplink => programs::UPLINK_INGRESS,
            Role::Downstream => programs::DOWNSTREAM_INGRESS,
        }
    }

    fn from_name(name: &str) -> Option<Role> {
        [Role::Uplink, Role::Downstream]
            .into_iter()
            .find(|r| r.name() == name)
    }
}

/// How programs are attached on this kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HookKind {
    /// A TCX link (6.6+), pinned so it outlives this process.
    Tcx,
    /// A clsact filter (older kernels), at a fixed priority and handle so a
    /// successor replaces it in place instead of adding a second one.
    Clsact,
}

impl std::str::FromStr for HookKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tcx" => Ok(HookKind::Tcx),
            "clsact" => Ok(HookKind::Clsact),
            _ => Err(format!(
                "{s:?} is not a TC hook: expected auto, tcx or clsact"
            )),
        }
    }
}

impl HookKind {
    pub const fn name(self) -> &'static str {
        match self {
            HookKind::Tcx => "tcx",
            HookKind::Clsact => "clsact",
        }
    }

    pub fn for_kernel(kernel: &Kernel) -> Self {
        if kernel.version >= TCX_SINCE {
            HookKind::Tcx
        } else {
            HookKind::Clsact
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(HookKind::Tcx),
            1 => Some(HookKind::Clsact),
            _ => None,
        }
    }

    const fn code(self) -> u8 {
        match self {
            HookKind::Tcx => 0,
            HookKind::Clsact => 1,
        }
    }
}

/// The clsact filter slot the forwarder owns on every interface. Priority
/// 1 runs it before filters added without one (the kernel numbers those
/// from 49152 down); unclaimed packets continue to them.
const CLSACT_PRIORITY: u16 = 1;
const CLSACT_HANDLE: TcHandle = TcHandle::new(0, 0xf0);

/// How a program is attached to one interface.
enum Hook {
    Tcx { link: FdLink, pin: PathBuf },
    Clsact(SchedClassifierLink),
}

pub struct Attachment {
    pub role: Role,
    pub ifname: String,
    hook: Hook,
}

impl Attachment {
    pub fn kind(&self) -> HookKind {
        match self.hook {
            Hook::Tcx { .. } => HookKind::Tcx,
            Hook::Clsact(_) => HookKind::Clsact,
        }
    }
}

/// What a load needs besides the pin directory.
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    pub support: Support,
    pub flow_table_size: u32,
    /// Whether the programs write their kernel log records (see
    /// kernel_log).
    pub kernel_log: bool,
    /// Only for `cargo xtask bench`'s breakdown: the forwarding paths stop
    /// there and pass the packet on.
    pub cut: Option<Cut>,
}

/// Loads and verifies both programs and those they tail-call, with maps
/// pinned in (or adopted from) `maps_dir` and the globals the self-test
/// chose and the kernel log asks for.
pub fn load_object(maps_dir: &Path, options: &LoadOptions) -> Result<Ebpf> {
    let skip_neigh = u8::from(options.support.fib_skip_neigh);
    let mtu_result = u8::from(options.support.fib_mtu_result);
    let log_level = kernel_log::level(options.kernel_log);
    let bench_cut = options.cut.map_or(cut::NONE, |at| at as u8);
    let mut ebpf = EbpfLoader::new()
        // Statistics only: a refusal then reads as the verifier's reason and
        // its counts. A full trace of a program this size overflows any log
        // buffer, and kernels before 6.x then fail the load with ENOSPC,
        // hiding the reason.
        .verifier_log_level(VerifierLogLevel::STATS)
        .default_map_pin_directory(maps_dir)
        .map_max_entries(names::FLOWS, options.flow_table_size)
        .override_global(globals::FIB_SKIP_NEIGH, &skip_neigh, true)
        .override_global(globals::FIB_MTU_RESULT, &mtu_result, true)
        .override_global(aya_log::LEVEL, &log_level, true)
        .override_global(globals::BENCH_CUT, &bench_cut, true)
        .load(EBPF_OBJECT)
        .context("loading the eBPF object (are you root, with BPF and BTF support?)")?;
    // Every program tail-calls kernel_log on its way out when it noted a
    // record: it is in its array before any of them runs.
    let kernel_log = load_program(&mut ebpf, programs::KERNEL_LOG)?
        .fd()?
        .try_clone()?;
    let mut log_stage: ProgramArray<&mut MapData> = ebpf
        .map_mut(names::KERNEL_LOG_STAGE)
        .ok_or_else(|| anyhow!("the eBPF object has no map {}", names::KERNEL_LOG_STAGE))?
        .try_into()?;
    log_stage
        .set(0, &kernel_log, 0)
        .context("setting the kernel log's program")?;
    for role in [Role::Uplink, Role::Downstream] {
        load_program(&mut ebpf, role.program())?;
    }
    // The stages go into the program array before any program that calls
    // them is attached. A pinned array is shared with a predecessor's
    // attached programs: their calls reach these stages from now on, which
    // recognise only packets this load's programs handed them.
    let mut fds = Vec::new();
    for name in programs::RELAY_UP_STAGES {
        let prog = load_program(&mut ebpf, name)?;
        fds.push(prog.fd()?.try_clone()?);
    }
    let mut stages: ProgramArray<&mut MapData> = ebpf
        .map_mut(names::RELAY_UP_STAGES)
        .ok_or_else(|| anyhow!("the eBPF object has no map {}", names::RELAY_UP_STAGES))?
        .try_into()?;
    for (slot, fd) in (0u32..).zip(&fds) {
        stages
            .set(slot, fd, 0)
            .with_context(|| format!("setting relay stage {slot}"))?;
    }
    Ok(ebpf)
}

fn load_program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut SchedClassifier> {
    let prog: &mut SchedClassifier = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("the eBPF object has no program {name}"))?
        .try_into()?;
    prog.load().with_context(|| format!("verifying {name}"))?;
    Ok(prog)
}

pub struct Datapath {
    ebpf: Ebpf,
    pub tables: Tables,
    layout: PinLayout,
    hook_kind: HookKind,
    attached: BTreeMap<u32, Attachment>,
    attachments: HashMap<MapData, u32, u32>,
}

fn not_found(err: &LinkError) -> bool {
    matches!(err, LinkError::SyscallError(SyscallError { io_error, .. }) if io_error.kind() == io::ErrorKind::NotFound)
}

/// Name of the record of attachments in `<pin-dir>/meta`, which `inspect`
/// reads: clsact filters cannot be pinned, so the pins alone do not say.
const ATTACHMENTS: &str = "ATTACHMENTS";
/// Name of the record of rule ids in `<pin-dir>/meta` (see `RuleIds`).
const RULE_IDS: &str = "RULE_IDS";

fn attachment_value(role: Role, kind: HookKind) -> u32 {
    u32::from(role == Role::Downstream) | (u32::from(kind.code()) << 8)
}

/// The attachments an instance recorded, by interface index.
pub fn recorded_attachments(layout: &PinLayout) -> Result<BTreeMap<u32, (Role, HookKind)>> {
    let path = layout.meta.join(ATTACHMENTS);
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    let map = HashMap::<MapData, u32, u32>::try_from(Map::HashMap(data))?;
    Ok(map
        .iter()
        .filter_map(Result::ok)
        .filter_map(|(ifindex, value)| {
            let role = if value & 0xff == 0 {
                Role::Uplink
            } else {
                Role::Downstream
            };
            Some((ifindex, (role, HookKind::from_code((value >> 8) as u8)?)))
        })
        .collect())
}

/// The maps an instance pinned, opened again to change rules from another
/// thread, with the record of rule ids its load made.
pub fn pinned_tables(layout: &PinLayout) -> Result<Tables> {
    let path = layout.meta.join(RULE_IDS);
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    let map = Map::from_map_data(data).with_context(|| format!("pinned map {}", path.display()))?;
    Tables::open_pinned_with_ids(&layout.maps, RuleIds::from_map(map)?)
}

impl Datapath {
    /// Loads the programs. Pinned maps that match this build are adopted
    /// with their contents; the others are replaced (see `adopt`), and the
    /// replacements are returned for the log.
    pub fn load(
        layout: &PinLayout,
        options: &LoadOptions,
        hook_kind: HookKind,
    ) -> Result<(Self, Vec<Replaced>)> {
        let defs = adopt::definitions(&[(names::FLOWS, options.flow_table_size)])?;
        let mut replaced = adopt::set_aside(layout, &defs)?;
        let mut ebpf = load_object(&layout.maps, options)?;
        adopt::carry_over(layout, &mut replaced)?;
        adopt::record(layout, &defs)?;
        let rule_ids = open_or_create(&layout.meta.join(RULE_IDS), |path| {
            Ok(Array::<MapData, u32>::create(1, 0)?.pin(path)?)
        })?;
        let tables = Tables::from_ebpf(&mut ebpf, RuleIds::from_map(rule_ids)?)?;
        let attachments = open_or_create(&layout.meta.join(ATTACHMENTS), |path| {
            Ok(
                HashMap::<MapData, u32, u32>::create(forwarder_common::maps::MAX_IFACES, 0)?
                    .pin(path)?,
            )
        })?;
        let attachments = HashMap::try_from(attachments)?;
        Ok((
            Datapath {
                ebpf,
                tables,
                layout: layout.clone(),
                hook_kind,
                attached: BTreeMap::new(),
                attachments,
            },
            replaced,
        ))
    }

    /// The loaded program of a role, for BPF_PROG_TEST_RUN.
    pub fn program(&self, role: Role) -> Result<&SchedClassifier> {
        Ok(self
            .ebpf
            .program(role.program())
            .ok_or_else(|| anyhow!("no program {}", role.program()))?
            .try_into()?)
    }

    /// Starts writing the programs' kernel log records to the daemon's log.
    pub fn read_kernel_log(&mut self) -> Result<kernel_log::Reader> {
        kernel_log::Reader::start(&mut self.ebpf)
    }

    /// Every program of the object, by name: the two attached ones and the
    /// programs they tail-call (the relay stages, kernel_log).
    pub fn programs(&self) -> impl Iterator<Item = (&str, &aya::programs::Program)> {
        self.ebpf.programs()
    }

    pub fn attached(&self) -> &BTreeMap<u32, Attachment> {
        &self.attached
    }

    /// Attaches `role`'s program to the interface. Where a predecessor left
    /// one (a pinned TCX link, or a filter in our clsact slot), the program
    /// inside it is swapped in one atomic update. Returns whether one was.
    pub fn attach(&mut self, ifindex: u32, ifname: &str, role: Role) -> Result<bool> {
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(role.program())
            .ok_or_else(|| anyhow!("no program {}", role.program()))?
            .try_into()?;
        let (hook, adopted) = match self.hook_kind {
            HookKind::Tcx => {
                let pin = self.layout.link_pin(role.name(), ifindex);
                let (link, adopted) = attach_tcx(prog, ifname, &pin)?;
                (Hook::Tcx { link, pin }, adopted)
            }
            HookKind::Clsact => {
                let (link, adopted) = attach_clsact(prog, ifname, role)?;
                (Hook::Clsact(link), adopted)
            }
        };
        self.attachments
            .insert(ifindex, attachment_value(role, self.hook_kind), 0)
            .context("recording the attachment")?;
        self.attached.insert(
            ifindex,
            Attachment {
                role,
                ifname: ifname.to_string(),
                hook,
            },
        );
        Ok(adopted)
    }

    /// Detaches from the interface (if it still exists) and removes its pin.
    pub fn detach(&mut self, ifindex: u32) -> Result<()> {
        if let Some(attachment) = self.attached.remove(&ifindex) {
            release(attachment.hook)?;
        }
        match self.attachments.remove(&ifindex) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(err) => Err(err).context("forgetting the attachment"),
        }
    }

    /// What a predecessor left that this instance does not attach to (links
    /// and records of interfaces gone or no longer matching), and the maps
    /// set aside for replacements, now that the links run the new programs.
    /// Returns the link pins removed.
    pub fn remove_stale(&mut self) -> Result<Vec<PathBuf>> {
        let mut removed = Vec::new();
        let ours: Vec<PathBuf> = self
            .attached
            .iter()
            .map(|(ifindex, a)| self.layout.link_pin(a.role.name(), *ifindex))
            .collect();
        for entry in fs::read_dir(&self.layout.links)? {
            let path = entry?.path();
            if !ours.contains(&path) {
                fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
                removed.push(path);
            }
        }
        let recorded: Vec<u32> = self.attachments.keys().filter_map(Result::ok).collect();
        for ifindex in recorded {
            if !self.attached.contains_key(&ifindex) {
                let _ = self.attachments.remove(&ifindex);
            }
        }
        adopt::remove_set_aside(&self.layout)?;
        Ok(removed)
    }

    /// Detaches everything and removes every pin.
    pub fn shutdown(mut self) -> Result<()> {
        let mut first_error = None;
        for (_, attachment) in std::mem::take(&mut self.attached) {
            if let Err(err) = release(attachment.hook) {
                first_error.get_or_insert(err);
            }
        }
        drop(self.tables);
        drop(self.attachments);
        drop(self.ebpf);
        if let Err(err) = self.layout.remove() {
            first_error.get_or_insert(anyhow!(err).context("removing pins"));
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// The record pinned at `path` in `<pin-dir>/meta`, first made and pinned
/// there by `create` if there is none.
fn open_or_create(path: &Path, create: impl FnOnce(&Path) -> Result<()>) -> Result<Map> {
    if MapData::from_pin(path).is_err() {
        create(path).with_context(|| format!("pinning {}", path.display()))?;
    }
    let data = MapData::from_pin(path).with_context(|| format!("opening {}", path.display()))?;
    Map::from_map_data(data).with_context(|| format!("pinned map {}", path.display()))
}

/// TCX: adopt the pinned link by updating its program, or create and pin one.
fn attach_tcx(prog: &mut SchedClassifier, ifname: &str, pin: &Path) -> Result<(FdLink, bool)> {
    let (link_id, adopted) = match PinnedLink::from_pin(pin) {
        Ok(pinned) => {
            let link = SchedClassifierLink::try_from(FdLink::from(pinned))
                .with_context(|| format!("{} is not a TCX link", pin.display()))?;
            (prog.attach_to_link(link)?, true)
        }
        Err(err) if not_found(&err) => {
            let id = prog
                .attach_with_options(
                    ifname,
                    TcAttachType::Ingress,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .with_context(|| format!("attaching to {ifname} with TCX"))?;
            (id, false)
        }
        Err(err) => return Err(err).with_context(|| format!("opening {}", pin.display())),
    };
    let link = FdLink::try_from(prog.take_link(link_id)?)?;
    if adopted {
        return Ok((link, true));
    }
    let pinned = link
        .pin(pin)
        .with_context(|| format!("pinning {}", pin.display()))?;
    Ok((FdLink::from(pinned), false))
}

/// clsact: replace the filter in our slot, or create it there. A filter of
/// the same program elsewhere (left by an older release, which let the
/// kernel pick the slot) is removed first, so there is never a second set.
fn attach_clsact(
    prog: &mut SchedClassifier,
    ifname: &str,
    role: Role,
) -> Result<(SchedClassifierLink, bool)> {
    if let Err(err) = tc::qdisc_add_clsact(ifname)
        && !matches!(err, TcError::AlreadyAttached)
    {
        log::debug!("clsact on {ifname}: {err}");
    }
    let ours = SchedClassifierLink::attached(
        ifname,
        TcAttachType::Ingress,
        CLSACT_PRIORITY,
        CLSACT_HANDLE,
        None,
    )
    .with_context(|| format!("looking up {ifname}"))?;
    let (id, adopted) = match prog.attach_to_link(ours) {
        Ok(id) => (id, true),
        Err(_) => {
            let _ = tc::qdisc_detach_program(ifname, TcAttachType::Ingress, role.program());
            let id = prog
                .attach_with_options(
                    ifname,
                    TcAttachType::Ingress,
                    TcAttachOptions::Netlink(NlOptions {
                        priority: CLSACT_PRIORITY,
                        handle: CLSACT_HANDLE,
                        classid: None,
                    }),
                )
                .with_context(|| format!("attaching to {ifname} with clsact"))?;
            (id, false)
        }
    };
    Ok((prog.take_link(id)?, adopted))
}

fn release(hook: Hook) -> Result<()> {
    match hook {
        Hook::Tcx { link, pin } => {
            match fs::remove_file(&pin) {
                Err(err) if err.kind() != io::ErrorKind::NotFound => {
                    return Err(err).with_context(|| format!("unpinning {}", pin.display()));
                }
                _ => {}
            }
            // Closing the last reference detaches the link.
            drop(link);
        }
        // Dropping a netlink link removes the filter.
        Hook::Clsact(link) => drop(link),
    }
    Ok(())
}

/// `Role::from_name` for readers of link pin names.
pub fn role_of_pin(name: &str) -> Option<(Role, u32)> {
    let (role, index) = name.rsplit_once('-')?;
    Some((Role::from_name(role)?, index.parse().ok()?))
}
