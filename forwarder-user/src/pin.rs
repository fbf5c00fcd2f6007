//! Where an instance pins its maps and links, and making sure that place is
//! a bpffs.

use std::{
    ffi::CString,
    fs, io,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// `<pin-dir>/maps` holds the programs' maps by name, `<pin-dir>/links`
/// the TCX links by role and interface, and `<pin-dir>/meta` the daemon's
/// own records (map layouts, attachments). Which build may adopt a pinned
/// map is decided by its recorded layout, not by its path (see `adopt`).
/// `<pin-dir>/stale` holds maps being migrated, and `<pin-dir>/selftest`
/// the start-up self-test's throwaway maps.
#[derive(Clone, Debug)]
pub struct PinLayout {
    pub root: PathBuf,
    pub maps: PathBuf,
    pub links: PathBuf,
    pub meta: PathBuf,
    pub stale: PathBuf,
    pub selftest: PathBuf,
}

/// Directories of the releases that kept a layout version in the path
/// (`<pin-dir>/v1/{maps,links}`); their pins are taken over at start.
pub const LEGACY_DIRS: &[&str] = &["v1"];

impl PinLayout {
    pub fn new(root: &Path) -> Self {
        PinLayout {
            root: root.to_path_buf(),
            maps: root.join("maps"),
            links: root.join("links"),
            meta: root.join("meta"),
            stale: root.join("stale"),
            selftest: root.join("selftest"),
        }
    }

    pub fn link_pin(&self, role: &str, ifindex: u32) -> PathBuf {
        self.links.join(format!("{role}-{ifindex}"))
    }

    /// Removes every pin of an instance and its directories; `root` too when
    /// nothing else is left in it.
    pub fn remove(&self) -> io::Result<()> {
        let legacy = LEGACY_DIRS.iter().map(|d| self.root.join(d));
        for dir in [
            &self.links,
            &self.maps,
            &self.meta,
            &self.stale,
            &self.selftest,
        ]
        .into_iter()
        .cloned()
        .chain(legacy)
        {
            remove_tree(&dir)?;
        }
        match fs::remove_dir(&self.root) {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
            // Something else lives there, or it is a mount point.
            Err(err) => {
                log::debug!("keeping {}: {err}", self.root.display());
                Ok(())
            }
        }
    }
}

/// Removes a directory of pins (and directories of pins) if it exists.
pub fn remove_tree(dir: &Path) -> io::Result<()> {
    match fs::read_dir(dir) {
        Ok(entries) => {
            for entry in entries {
                let entry = entry?;
                if entry.file_type()?.is_dir() {
                    remove_tree(&entry.path())?;
                } else {
                    fs::remove_file(entry.path())?;
                }
            }
            fs::remove_dir(dir)
        }
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(err),
    }
}

fn fs_type(path: &Path) -> io::Result<i64> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    // SAFETY: statfs writes into the zeroed struct; c is NUL-terminated.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut buf) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(buf.f_type as i64)
}

pub fn is_bpffs(path: &Path) -> bool {
    fs_type(path).is_ok_and(|t| t == BPF_FS_MAGIC)
}

/// The closest existing ancestor of `path` (itself included).
fn existing_ancestor(path: &Path) -> Option<&Path> {
    path.ancestors().find(|p| p.exists())
}

/// The conventional bpffs mount point. sysfs allows no new directories, so a
/// pin directory below it can only exist once a bpffs is mounted there.
const SYS_FS_BPF: &str = "/sys/fs/bpf";

/// How the pin directory came to be on a bpffs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Bpffs {
    /// It already was (or lies below a bpffs mount).
    Existing,
    /// This process mounted one, at the given path.
    Mounted(PathBuf),
}

/// Makes `layout.root` a directory on a bpffs, mounting one if no bpffs
/// covers it (at /sys/fs/bpf for pin directories below it, else at the pin
/// directory itself), then creates the layout's directories.
pub fn prepare(layout: &PinLayout) -> Result<Bpffs> {
    let ancestor = existing_ancestor(&layout.root)
        .with_context(|| format!("{} has no existing ancestor", layout.root.display()))?;
    let how = if is_bpffs(ancestor) {
        Bpffs::Existing
    } else {
        let at = if layout.root.starts_with(SYS_FS_BPF) {
            PathBuf::from(SYS_FS_BPF)
        } else {
            layout.root.clone()
        };
        fs::create_dir_all(&at).with_context(|| format!("creating {}", at.display()))?;
        mount_bpffs(&at)?;
        Bpffs::Mounted(at)
    };
    for dir in [&layout.root, &layout.maps, &layout.links, &layout.meta] {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // Whoever can open a pinned map can rewrite forwarding: the kernel makes
    // pins 0600, and the directory keeps others from even listing them.
    fs::set_permissions(
        &layout.root,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .with_context(|| format!("restricting {}", layout.root.display()))?;
    if !is_bpffs(&layout.maps) {
        bail!("{} is not on a bpffs", layout.maps.display());
    }
    Ok(how)
}

/// Unmounts a bpffs this process mounted, but only if nothing else was
/// pinned in it meanwhile: unmounting would silently release those objects.
pub fn unmount_if_empty(at: &Path) -> Result<bool> {
    if fs::read_dir(at)?.next().is_some() {
        return Ok(false);
    }
    let target = CString::new(at.as_os_str().as_bytes())?;
    // SAFETY: valid NUL-terminated path.
    if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("unmounting the bpffs at {}", at.display()));
    }
    Ok(true)
}

fn mount_bpffs(at: &Path) -> Result<()> {
    let target = CString::new(at.as_os_str().as_bytes())?;
    let fstype = c"bpf";
    // SAFETY: all pointers are valid NUL-terminated strings.
    let ret = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("mounting a bpffs at {}", at.display()));
    }
    // Restrict who can even look at the pins: they control forwarding.
    fs::set_permissions(at, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    Ok(())
}
