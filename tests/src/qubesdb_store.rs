//! The stand-in of a running VM's QubesDB: one file per VM that the
//! stand-in qubesd writes (as qubesd writes the real one over vchan) and
//! the stand-in `qubesdb-*` tools read. No file: the VM is not running, so
//! it has no QubesDB daemon to connect to.
//!
//! The file holds `PATH` NUL `VALUE` NUL pairs, and is replaced whole
//! (written aside, then renamed), so a reader never sees half an update.
//!
//! The tools learn which store is theirs from `QUBESDB_STANDIN_DIR` and
//! `QUBESDB_STANDIN_VM`, or else from a `qubesdb-standin.conf` beside them
//! ([`install_tools`]), so a process that runs them from PATH, as the
//! forwarder does, needs no special environment.

use std::{
    collections::BTreeMap,
    io,
    path::{Path, PathBuf},
};

/// Names the directory of the stores, for the tools.
pub const DIR_ENV: &str = "QUBESDB_STANDIN_DIR";
/// Names the VM whose store the tools read, as a VM's tools read its own.
pub const VM_ENV: &str = "QUBESDB_STANDIN_VM";
/// Beside the tools: the store's directory, then the VM, one a line.
pub const CONF: &str = "qubesdb-standin.conf";
/// The names the tools answer to.
pub const TOOLS: [&str; 3] = ["qubesdb-read", "qubesdb-multiread", "qubesdb-watch"];

/// Makes `at` a directory of tools (symlinks to the `standin` binary) that
/// read `vm`'s store in `store`: the PATH directory of one VM.
pub fn install_tools(standin: &Path, at: &Path, store: &Path, vm: &str) -> io::Result<()> {
    std::fs::create_dir_all(at)?;
    for tool in TOOLS {
        let link = at.join(tool);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(standin, link)?;
    }
    std::fs::write(at.join(CONF), format!("{}\n{vm}\n", store.display()))
}

/// The store the tools at `argv0` serve: the environment's, or the
/// configuration file's beside them (found on PATH, as the shell found the
/// tool, when `argv0` is a bare name).
pub fn configured(argv0: &Path) -> Option<(PathBuf, String)> {
    if let (Some(dir), Ok(vm)) = (std::env::var_os(DIR_ENV), std::env::var(VM_ENV)) {
        return Some((dir.into(), vm));
    }
    let dir = match argv0.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => std::env::split_paths(&std::env::var_os("PATH")?)
            .find(|dir| dir.join(argv0).exists())?,
    };
    let conf = std::fs::read_to_string(dir.join(CONF)).ok()?;
    let mut lines = conf.lines();
    Some((lines.next()?.into(), lines.next()?.to_string()))
}

pub type Entries = BTreeMap<String, Vec<u8>>;

pub fn path(dir: &Path, vm: &str) -> PathBuf {
    dir.join(format!("{vm}.qdb"))
}

pub fn write(dir: &Path, vm: &str, entries: &Entries) -> io::Result<()> {
    let mut bytes = Vec::new();
    for (path, value) in entries {
        bytes.extend_from_slice(path.as_bytes());
        bytes.push(0);
        bytes.extend_from_slice(value);
        bytes.push(0);
    }
    let target = path(dir, vm);
    let aside = target.with_extension("qdb.new");
    std::fs::write(&aside, bytes)?;
    std::fs::rename(aside, target)
}

/// The VM's entries; `None` when it is not running.
pub fn read(dir: &Path, vm: &str) -> io::Result<Option<Entries>> {
    let bytes = match std::fs::read(path(dir, vm)) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut fields = bytes.split(|b| *b == 0);
    let mut entries = Entries::new();
    while let (Some(path), Some(value)) = (fields.next(), fields.next()) {
        if path.is_empty() {
            break;
        }
        entries.insert(String::from_utf8_lossy(path).into_owned(), value.to_vec());
    }
    Ok(Some(entries))
}

pub fn remove(dir: &Path, vm: &str) -> io::Result<()> {
    match std::fs::remove_file(path(dir, vm)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}
