//! Loading the eBPF object, attaching its programs, and adopting what a
//! predecessor left pinned so forwarding never stops for a restart.

use std::{collections::BTreeMap, fs, io, path::PathBuf};

use anyhow::{Context as _, Result, anyhow};
use aya::{
    Ebpf, EbpfLoader,
    programs::{
        SchedClassifier, TcAttachType,
        links::{FdLink, LinkError, PinnedLink},
        tc::{self, SchedClassifierLink, TcError},
    },
    sys::SyscallError,
};
use forwarder_common::maps::programs;

use crate::{EBPF_OBJECT, pin::PinLayout, tables::Tables};

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
}

/// How a program is attached to one interface.
enum Hook {
    /// A TCX link (kernel >= 6.6), pinned so it outlives this process.
    Tcx { link: FdLink, pin: PathBuf },
    /// A clsact filter (older kernels); it cannot be pinned or adopted.
    Clsact(SchedClassifierLink),
}

pub struct Attachment {
    pub role: Role,
    pub ifname: String,
    hook: Hook,
}

impl Attachment {
    pub fn adopted_or_pinned(&self) -> bool {
        matches!(self.hook, Hook::Tcx { .. })
    }
}

pub struct Datapath {
    ebpf: Ebpf,
    pub tables: Tables,
    layout: PinLayout,
    attached: BTreeMap<u32, Attachment>,
}

fn not_found(err: &LinkError) -> bool {
    matches!(err, LinkError::SyscallError(SyscallError { io_error, .. }) if io_error.kind() == io::ErrorKind::NotFound)
}

impl Datapath {
    /// Loads the programs; maps already pinned under the layout are reused
    /// with their contents, new ones are created and pinned.
    pub fn load(layout: &PinLayout) -> Result<Self> {
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&layout.maps)
            .load(EBPF_OBJECT)
            .context("loading the eBPF object (are you root, with BPF and BTF support?)")?;
        if let Err(err) = aya_log::EbpfLogger::init(&mut ebpf) {
            log::debug!("eBPF logging unavailable: {err}");
        }
        for role in [Role::Uplink, Role::Downstream] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(role.program())
                .ok_or_else(|| anyhow!("the eBPF object has no program {}", role.program()))?
                .try_into()?;
            prog.load()
                .with_context(|| format!("verifying {}", role.program()))?;
        }
        let tables = Tables::from_ebpf(&mut ebpf)?;
        Ok(Datapath {
            ebpf,
            tables,
            layout: layout.clone(),
            attached: BTreeMap::new(),
        })
    }

    /// The loaded program of a role, for BPF_PROG_TEST_RUN.
    pub fn program(&self, role: Role) -> Result<&SchedClassifier> {
        Ok(self
            .ebpf
            .program(role.program())
            .ok_or_else(|| anyhow!("no program {}", role.program()))?
            .try_into()?)
    }

    pub fn attached(&self) -> &BTreeMap<u32, Attachment> {
        &self.attached
    }

    /// Attaches `role`'s program to the interface, or, when a predecessor
    /// left a pinned link there, swaps the program inside that link in one
    /// atomic update. Returns whether an existing link was adopted.
    pub fn attach(&mut self, ifindex: u32, ifname: &str, role: Role) -> Result<bool> {
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(role.program())
            .ok_or_else(|| anyhow!("no program {}", role.program()))?
            .try_into()?;
        let pin = self.layout.link_pin(role.name(), ifindex);
        let (link_id, adopted) = match PinnedLink::from_pin(&pin) {
            Ok(pinned) => {
                let link = SchedClassifierLink::try_from(FdLink::from(pinned))
                    .with_context(|| format!("{} is not a TCX link", pin.display()))?;
                (prog.attach_to_link(link)?, true)
            }
            Err(err) if not_found(&err) => {
                if let Err(err) = tc::qdisc_add_clsact(ifname) {
                    // TCX needs no qdisc; older kernels need clsact, and
                    // "already there" is fine.
                    if !matches!(err, TcError::AlreadyAttached) {
                        log::debug!("clsact on {ifname}: {err}");
                    }
                }
                let id = prog
                    .attach(ifname, TcAttachType::Ingress)
                    .with_context(|| format!("attaching {} to {ifname}", role.program()))?;
                (id, false)
            }
            Err(err) => return Err(err).with_context(|| format!("opening {}", pin.display())),
        };
        let link = prog.take_link(link_id)?;
        let hook = if <&FdLink>::try_from(&link).is_ok() {
            let fd_link = FdLink::try_from(link)?;
            if adopted {
                Hook::Tcx { link: fd_link, pin }
            } else {
                let pinned = fd_link
                    .pin(&pin)
                    .with_context(|| format!("pinning {}", pin.display()))?;
                Hook::Tcx {
                    link: FdLink::from(pinned),
                    pin,
                }
            }
        } else {
            Hook::Clsact(link)
        };
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
        Ok(())
    }

    /// Pinned links of interfaces this instance does not attach to (a
    /// predecessor's, for interfaces gone or no longer matching): unpinned,
    /// which detaches them.
    pub fn remove_stale_link_pins(&self) -> Result<Vec<PathBuf>> {
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
        drop(self.ebpf);
        if let Err(err) = self.layout.remove() {
            first_error.get_or_insert(anyhow!(err).context("removing pins"));
        }
        first_error.map_or(Ok(()), Err)
    }
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
        Hook::Clsact(link) => drop(link),
    }
    Ok(())
}
