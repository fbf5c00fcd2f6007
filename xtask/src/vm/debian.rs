//! Debian's kernel packages for the VM tier. A suite's `linux-image-amd64`
//! names the versioned image package of its current kernel, which
//! `apt-get download` fetches through a private apt configuration (its own
//! sources list, package lists and cache under target/vm/apt/<suite>) that
//! points at the archive the system's apt already uses: the system's own
//! sources and state are never touched. The package is unpacked under
//! target/vm/kernels/<version> and used from there on; remove that
//! directory to fetch the suite's newest kernel.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{
    mirror::KEYRING,
    process::{command, output, run_cmd},
};

/// A kernel unpacked from its package: the image virtme-ng boots, next to
/// the modules directory it finds by itself (lib/modules/<release> or, in
/// trixie, usr/lib/modules/<release>, below the same root).
pub struct KernelImage {
    pub release: String,
    pub vmlinuz: PathBuf,
}

/// Where the system's apt gets Debian from, and the keyring it checks the
/// archive with.
struct Archive {
    uri: String,
    keyring: String,
}

/// The first source of Debian's main archive in the system's apt
/// configuration: a `deb` entry for a plain release (no -security or
/// -updates suite) whose URI ends in /debian.
fn system_archive() -> Result<Archive> {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(entries) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut parts: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        parts.sort();
        files.extend(parts);
    }
    for file in files {
        let Ok(text) = fs::read_to_string(&file) else {
            continue;
        };
        let found = match file.extension().and_then(|e| e.to_str()) {
            Some("sources") => deb822_archive(&text),
            Some("list") => one_line_archive(&text),
            _ if file.ends_with("sources.list") => one_line_archive(&text),
            _ => None,
        };
        if let Some(archive) = found {
            return Ok(archive);
        }
    }
    bail!("the system's apt sources name no Debian archive (a deb entry whose URI ends in /debian)")
}

fn is_main_archive(uri: &str, suites: &[&str]) -> bool {
    uri.trim_end_matches('/').ends_with("/debian") && suites.iter().any(|s| !s.contains('-'))
}

/// deb822 stanzas (`Types:`, `URIs:`, `Suites:`, `Signed-By:`).
fn deb822_archive(text: &str) -> Option<Archive> {
    for stanza in text.split("\n\n") {
        let field = |name: &str| {
            stanza
                .lines()
                .filter(|l| !l.starts_with('#'))
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
        };
        let types = field("Types:").unwrap_or_default();
        let suites: Vec<&str> = field("Suites:")
            .unwrap_or_default()
            .split_whitespace()
            .collect();
        let Some(uri) = field("URIs:").and_then(|u| u.split_whitespace().next()) else {
            continue;
        };
        if types.split_whitespace().any(|t| t == "deb") && is_main_archive(uri, &suites) {
            let keyring = field("Signed-By:")
                .filter(|k| k.starts_with('/'))
                .unwrap_or(KEYRING);
            return Some(Archive {
                uri: uri.trim_end_matches('/').to_string(),
                keyring: keyring.to_string(),
            });
        }
    }
    None
}

/// One-line entries: `deb [options] URI suite component...`.
fn one_line_archive(text: &str) -> Option<Archive> {
    for line in text.lines().map(str::trim) {
        let Some(rest) = line.strip_prefix("deb ") else {
            continue;
        };
        let (options, rest) = match rest.trim_start().strip_prefix('[') {
            Some(inner) => inner.split_once(']')?,
            None => ("", rest),
        };
        let mut words = rest.split_whitespace();
        let (Some(uri), Some(suite)) = (words.next(), words.next()) else {
            continue;
        };
        if is_main_archive(uri, &[suite]) {
            let keyring = options
                .split_whitespace()
                .find_map(|o| o.strip_prefix("signed-by="))
                .unwrap_or(KEYRING);
            return Some(Archive {
                uri: uri.trim_end_matches('/').to_string(),
                keyring: keyring.to_string(),
            });
        }
    }
    None
}

/// apt-get or apt-cache confined to `dir`: its sources list, lists and
/// cache. Downloads run as root: target/ is no place the _apt user may
/// write to.
fn private_apt(program: &str, dir: &Path) -> Command {
    let mut cmd = command(program);
    cmd.arg("-q")
        .arg(format!(
            "-oDir::Etc::sourcelist={}",
            dir.join("sources.list").display()
        ))
        .arg("-oDir::Etc::sourceparts=-")
        .arg(format!(
            "-oDir::State::Lists={}",
            dir.join("lists").display()
        ))
        .arg(format!("-oDir::Cache={}", dir.join("cache").display()))
        .arg("-oAPT::Sandbox::User=root");
    cmd
}

/// The versioned package `linux-image-amd64` depends on.
fn image_package(show: &str) -> Option<String> {
    show.lines()
        .find_map(|l| l.strip_prefix("Depends: "))
        .and_then(|deps| deps.split([',', ' ', '|']).find(|w| !w.is_empty()))
        .map(str::to_string)
}

/// The image below an unpacked package, if it holds one with modules.
fn unpacked(dir: &Path) -> Option<KernelImage> {
    let entries = fs::read_dir(dir.join("boot")).ok()?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(release) = name.strip_prefix("vmlinuz-") else {
            continue;
        };
        let modules = ["lib/modules", "usr/lib/modules"]
            .iter()
            .any(|m| dir.join(m).join(release).is_dir());
        if modules {
            return Some(KernelImage {
                release: release.to_string(),
                vmlinuz: entry.path(),
            });
        }
    }
    None
}

/// The image of `suite`'s kernel, known as `version`, downloaded and
/// unpacked on first use.
pub fn fetch(vm_dir: &Path, version: &str, suite: &str) -> Result<KernelImage> {
    let dir = vm_dir.join("kernels").join(version);
    if let Some(image) = unpacked(&dir) {
        println!(
            "    {version}: {} (cached in {})",
            image.release,
            dir.display()
        );
        return Ok(image);
    }
    let apt_dir = vm_dir.join("apt").join(suite);
    fs::create_dir_all(apt_dir.join("lists/partial"))?;
    fs::create_dir_all(apt_dir.join("cache/archives/partial"))?;
    let archive = system_archive()?;
    fs::write(
        apt_dir.join("sources.list"),
        format!(
            "deb [signed-by={}] {} {suite} main\n",
            archive.keyring, archive.uri
        ),
    )?;
    println!(
        "    {version}: {suite}'s package lists from {}",
        archive.uri
    );
    run_cmd(private_apt("apt-get", &apt_dir).arg("update"))?;
    let show = output(private_apt("apt-cache", &apt_dir).args([
        "show",
        "--no-all-versions",
        "linux-image-amd64",
    ]))?;
    let package = image_package(&show)
        .with_context(|| format!("{suite}'s linux-image-amd64 names no image package"))?;
    let debs = vm_dir.join("debs");
    fs::create_dir_all(&debs)?;
    println!("    {version}: apt-get download {package}");
    run_cmd(
        private_apt("apt-get", &apt_dir)
            .current_dir(&debs)
            .args(["download", &package]),
    )?;
    let deb = fs::read_dir(&debs)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{package}_")) && n.ends_with(".deb"))
        })
        .with_context(|| format!("apt-get download left no {package}_*.deb"))?;
    // Unpacked beside the final place and renamed into it, so an
    // interrupted unpack is never taken for a kernel.
    let partial = dir.with_extension("partial");
    let _ = fs::remove_dir_all(&partial);
    fs::create_dir_all(&partial)?;
    run_cmd(command("dpkg-deb").arg("-x").arg(&deb).arg(&partial))?;
    let _ = fs::remove_dir_all(&dir);
    fs::rename(&partial, &dir)?;
    fs::remove_file(&deb)?;
    let image = unpacked(&dir)
        .with_context(|| format!("{} holds no kernel image with modules", deb.display()))?;
    println!(
        "    {version}: {} unpacked in {}",
        image.release,
        dir.display()
    );
    Ok(image)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deb822_sources_name_the_main_archive() {
        let text = "Types: deb\n# a comment\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\nTypes: deb\nURIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\n";
        let archive = deb822_archive(text).unwrap();
        assert_eq!(archive.uri, "http://deb.debian.org/debian");
        assert_eq!(archive.keyring, KEYRING);
        assert!(deb822_archive("Types: deb\nURIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\n").is_none());
    }

    #[test]
    fn one_line_sources_name_the_main_archive() {
        let text = "# deb http://old/debian buster main\ndeb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian/ bookworm main\n";
        let archive = one_line_archive(text).unwrap();
        assert_eq!(archive.uri, "http://mirror.example/debian");
        assert_eq!(archive.keyring, "/k.gpg");
        assert!(
            one_line_archive("deb https://packages.cloud.google.com/apt cloud-sdk main\n")
                .is_none()
        );
    }

    #[test]
    fn the_image_package_is_the_first_dependency() {
        let show = "Package: linux-image-amd64\nVersion: 6.1.176-1\nDepends: linux-image-6.1.0-50-amd64 (= 6.1.176-1)\n";
        assert_eq!(
            image_package(show).as_deref(),
            Some("linux-image-6.1.0-50-amd64")
        );
    }
}
