//! Replacing a file as root in a directory others may write to, such as a
//! user's config file for `--save`. Nothing a user planted is followed:
//! - the path is resolved by hand, and a symlink on the way is followed only
//!   when root or the owner of the file it leads to made it;
//! - the directory is opened once, and the file is read and replaced
//!   relative to it, so a directory or file swapped in meanwhile is refused
//!   or replaced, never written through;
//! - the new text goes to a fresh file under an unpredictable name, created
//!   exclusively (no symlink, no existing file) and readable by root alone
//!   until it has the old file's owner and mode, then synced and renamed
//!   over the old one.

use std::{
    ffi::{CString, OsString},
    fs::{self, File},
    io::{self, Read as _, Write as _},
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::{
            ffi::OsStrExt as _,
            fs::{MetadataExt as _, OpenOptionsExt as _},
        },
    },
    path::{Component, Path, PathBuf},
};

/// Symlinks followed before giving up, as the kernel's limit.
const MAX_LINKS: usize = 40;

/// A file read for replacing: its directory, held open, its name in it,
/// its owner and mode, and its text.
pub struct Original {
    dir: File,
    name: CString,
    uid: u32,
    gid: u32,
    mode: u32,
    pub text: String,
}

fn other(message: String) -> io::Error {
    io::Error::other(message)
}

fn cstring(name: &std::ffi::OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| other(format!("{name:?} contains NUL")))
}

/// What is left to walk of a path, next part last.
enum Part {
    Root,
    Parent,
    Name(OsString),
}

fn push_parts(stack: &mut Vec<Part>, path: &Path) {
    for component in path.components().rev() {
        match component {
            Component::RootDir | Component::Prefix(_) => stack.push(Part::Root),
            Component::CurDir => {}
            Component::ParentDir => stack.push(Part::Parent),
            Component::Normal(name) => stack.push(Part::Name(name.to_os_string())),
        }
    }
}

/// The path `path` names with every symlink resolved, and each symlink
/// followed on the way with its owner.
fn resolve(path: &Path) -> io::Result<(PathBuf, Vec<(PathBuf, u32)>)> {
    let mut resolved = if path.is_absolute() {
        PathBuf::from("/")
    } else {
        std::env::current_dir()?
    };
    let mut stack = Vec::new();
    push_parts(&mut stack, path);
    let mut links = Vec::new();
    while let Some(part) = stack.pop() {
        match part {
            Part::Root => resolved = PathBuf::from("/"),
            Part::Parent => {
                resolved.pop();
            }
            Part::Name(name) => {
                let next = resolved.join(&name);
                let meta = fs::symlink_metadata(&next)?;
                if !meta.file_type().is_symlink() {
                    resolved = next;
                    continue;
                }
                if links.len() == MAX_LINKS {
                    return Err(io::Error::from_raw_os_error(libc::ELOOP));
                }
                push_parts(&mut stack, &fs::read_link(&next)?);
                links.push((next, meta.uid()));
            }
        }
    }
    Ok((resolved, links))
}

impl Original {
    /// Opens the file `path` names for replacing (see the module's
    /// documentation for what is refused).
    pub fn open(path: &Path) -> io::Result<Self> {
        let (real, links) = resolve(path)?;
        let owner = fs::metadata(&real)?.uid();
        if let Some((link, made_by)) = links.iter().find(|(_, uid)| *uid != 0 && *uid != owner) {
            return Err(other(format!(
                "{} is a symlink made by uid {made_by} that leads to {}, owned by uid {owner}: \
                 a symlink is followed only when root or the file's owner made it",
                link.display(),
                real.display()
            )));
        }
        let (Some(dir_path), Some(name)) = (real.parent(), real.file_name()) else {
            return Err(other(format!("{} is not a file", real.display())));
        };
        let expected = fs::metadata(dir_path)?;
        let dir = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
            .open(dir_path)?;
        let opened = dir.metadata()?;
        if (opened.dev(), opened.ino()) != (expected.dev(), expected.ino()) {
            return Err(other(format!(
                "{} was replaced while it was being opened",
                dir_path.display()
            )));
        }
        let name = cstring(name)?;
        // Non-blocking: a FIFO planted under the name must not hang us.
        let mut file = openat(
            &dir,
            &name,
            libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK,
            0,
        )?;
        let meta = file.metadata()?;
        if !meta.file_type().is_file() {
            return Err(other(format!("{} is not a regular file", real.display())));
        }
        let mut text = String::new();
        file.read_to_string(&mut text)?;
        Ok(Original {
            dir,
            name,
            uid: meta.uid(),
            gid: meta.gid(),
            mode: meta.mode() & 0o7777,
            text,
        })
    }

    /// Replaces the file with `text`, keeping its owner and mode.
    pub fn replace(self, text: &str) -> io::Result<()> {
        let tmp = cstring(std::ffi::OsStr::new(&format!(
            ".forwarder-save-{:016x}",
            random_u64()?
        )))?;
        let result = (|| {
            let mut file = openat(
                &self.dir,
                &tmp,
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
                0o600,
            )?;
            file.write_all(text.as_bytes())?;
            std::os::unix::fs::fchown(&file, Some(self.uid), Some(self.gid))?;
            // After the chown, which clears set-id bits.
            file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(self.mode))?;
            file.sync_all()?;
            renameat(&self.dir, &tmp, &self.name)?;
            self.dir.sync_all()
        })();
        if result.is_err() {
            // SAFETY: a NUL-terminated name relative to a directory we hold.
            unsafe { libc::unlinkat(self.dir.as_raw_fd(), tmp.as_ptr(), 0) };
        }
        result
    }
}

fn openat(dir: &File, name: &CString, flags: libc::c_int, mode: libc::mode_t) -> io::Result<File> {
    // SAFETY: a NUL-terminated name relative to a directory we hold.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            flags | libc::O_CLOEXEC,
            libc::c_uint::from(mode),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor just opened and owned by nothing else.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

fn renameat(dir: &File, from: &CString, to: &CString) -> io::Result<()> {
    let fd = dir.as_raw_fd();
    // SAFETY: NUL-terminated names relative to a directory we hold.
    if unsafe { libc::renameat(fd, from.as_ptr(), fd, to.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn random_u64() -> io::Result<u64> {
    let mut bytes = [0u8; 8];
    // SAFETY: the buffer is valid for its length.
    let got = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if got != bytes.len() as isize {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::from_ne_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{PermissionsExt as _, symlink};

    use super::*;

    struct Dir(PathBuf);

    impl Dir {
        fn new(test: &str) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("forwarder-replace-{test}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            Dir(dir)
        }

        fn entries(&self) -> Vec<OsString> {
            let mut names: Vec<OsString> = fs::read_dir(&self.0)
                .unwrap()
                .flatten()
                .map(|e| e.file_name())
                .collect();
            names.sort();
            names
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn a_file_is_replaced_with_its_mode_and_no_leftover() {
        let dir = Dir::new("plain");
        let path = dir.0.join("a.toml");
        fs::write(&path, "old").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        let original = Original::open(&path).unwrap();
        assert_eq!(original.text, "old");
        original.replace("new").unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "new");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o7777,
            0o640
        );
        assert_eq!(dir.entries(), ["a.toml"]);
    }

    #[test]
    fn symlinks_resolve_through_dots_and_relative_targets() {
        let dir = Dir::new("resolve");
        fs::create_dir_all(dir.0.join("sub/deeper")).unwrap();
        fs::write(dir.0.join("sub/real.toml"), "x").unwrap();
        symlink("deeper/../real.toml", dir.0.join("sub/rel")).unwrap();
        symlink(dir.0.join("sub"), dir.0.join("subdir")).unwrap();
        let (real, links) = resolve(&dir.0.join("subdir/./rel")).unwrap();
        assert_eq!(real, dir.0.join("sub/real.toml"));
        assert_eq!(links.len(), 2);
        symlink("loop", dir.0.join("loop")).unwrap();
        let err = resolve(&dir.0.join("loop")).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ELOOP));
    }

    #[test]
    fn a_symlink_made_by_another_user_is_not_followed() {
        let dir = Dir::new("foreign-link");
        let victim = dir.0.join("victim");
        fs::write(&victim, "secret").unwrap();
        let link = dir.0.join("forwarder.toml");
        symlink(&victim, &link).unwrap();
        if std::os::unix::fs::lchown(&link, Some(65534), Some(65534)).is_err() {
            eprintln!("skipped: changing a symlink's owner needs root");
            return;
        }
        let err = Original::open(&link).err().unwrap().to_string();
        assert!(
            err.contains("made by uid 65534") && err.contains("victim"),
            "{err}"
        );
        std::os::unix::fs::lchown(&link, Some(0), Some(0)).unwrap();
        assert_eq!(Original::open(&link).unwrap().text, "secret", "root's own");
    }

    #[test]
    fn a_fifo_or_a_directory_is_refused_without_blocking() {
        let dir = Dir::new("fifo");
        let fifo = dir.0.join("fifo");
        let c = CString::new(fifo.as_os_str().as_bytes()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        for path in [fifo, dir.0.clone()] {
            let err = Original::open(&path).err().unwrap().to_string();
            assert!(err.contains("not a regular file"), "{err}");
        }
    }
}
