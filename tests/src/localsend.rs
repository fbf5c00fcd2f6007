//! Real LocalSend peers: localsendd from PyPI (installed by `cargo xtask
//! setup` under target/localsend), run in a namespace in HTTP mode,
//! accepting files unattended, driven through localsendctl.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use crate::{
    child,
    netns::{DieWithParent as _, Netns},
    wait::wait_until,
};

/// The `pip --target` directory holding localsendd.
pub fn install_dir() -> Result<PathBuf> {
    crate::pip::install_dir("LOCALSENDD_DIR", "localsend", "localsendd")
}

fn python() -> Result<String> {
    let out = Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .context("python3")?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// One localsendd with its own state, config, socket and download directory.
pub struct Peer {
    pub alias: String,
    pub dir: PathBuf,
    child: Child,
    python: String,
    lib: PathBuf,
}

#[derive(Clone, Debug)]
pub struct Device {
    pub alias: String,
    pub ip: String,
}

impl Peer {
    pub fn start(ns: &Netns, alias: &str) -> Result<Self> {
        let lib = install_dir()?;
        let python = python()?;
        let dir = std::env::temp_dir().join(format!("{}-{alias}", ns.name()));
        let _ = std::fs::remove_dir_all(&dir);
        for sub in ["home", "config", "state", "run", "downloads"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        let log = std::fs::File::create(dir.join("daemon.log"))?;
        let child = ns
            .command(&python)
            .args([
                "-m",
                "localsendd",
                "--no-encryption",
                "--unattended",
                "--alias",
                alias,
            ])
            .arg("--config")
            .arg(dir.join("config/none.toml"))
            .arg("--download-dir")
            .arg(dir.join("downloads"))
            .arg("--socket")
            .arg(dir.join("run/localsendd.sock"))
            .env("PYTHONPATH", &lib)
            .env("HOME", dir.join("home"))
            .env("XDG_CONFIG_HOME", dir.join("config"))
            .env("XDG_STATE_HOME", dir.join("state"))
            .env("XDG_RUNTIME_DIR", dir.join("run"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .die_with_parent()
            .spawn()
            .context("starting localsendd")?;
        let peer = Peer {
            alias: alias.into(),
            dir,
            child,
            python,
            lib,
        };
        if !wait_until(Duration::from_secs(15), || {
            peer.log().contains(" localsendd: alias=")
        }) {
            bail!("localsendd {alias} did not start; log:\n{}", peer.log());
        }
        if peer.log().contains("multicast unavailable") {
            bail!(
                "localsendd {alias} fell back to a subnet scan; log:\n{}",
                peer.log()
            );
        }
        Ok(peer)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    fn ctl(&self, args: &[&str]) -> Result<std::process::Output> {
        Command::new(&self.python)
            .args([
                "-c",
                "import sys; from localsendd.cli import main; sys.exit(main())",
            ])
            .arg("--socket")
            .arg(self.dir.join("run/localsendd.sock"))
            .args(args)
            .env("PYTHONPATH", &self.lib)
            .output()
            .context("localsendctl")
    }

    /// The peers this daemon has discovered.
    pub fn devices(&self) -> Result<Vec<Device>> {
        let out = self.ctl(&["devices", "--json"])?;
        let list: serde_json::Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("devices: {}", String::from_utf8_lossy(&out.stderr)))?;
        Ok(list
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|d| Device {
                        alias: d["alias"].as_str().unwrap_or_default().into(),
                        ip: d["ip"].as_str().unwrap_or_default().into(),
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    pub fn knows(&self, alias: &str) -> Option<Device> {
        self.devices().ok()?.into_iter().find(|d| d.alias == alias)
    }

    /// Sends `file` to the peer called `to` and waits for the outcome.
    pub fn send(&self, file: &Path, to: &str) -> Result<()> {
        let out = self.ctl(&[
            "send",
            file.to_str().context("path")?,
            "--to",
            to,
            "--wait",
            "--quiet",
        ])?;
        if !out.status.success() {
            bail!(
                "send to {to} failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    pub fn downloaded(&self, name: &str) -> Option<Vec<u8>> {
        std::fs::read(self.dir.join("downloads").join(name)).ok()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        child::terminate(&mut self.child, Duration::from_secs(5));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
