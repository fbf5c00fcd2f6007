//! Compiles forwarder-ebpf for the BPF target (nightly, bpf-linker) so the
//! object can be embedded in the `forwarder` binary, and derives the layout
//! identity of its pinned maps from the compiled definitions.
//!
//! The inner cargo runs as aya-build 0.2 runs it, but with its output
//! captured: aya-build relays every line of it as a `cargo:warning`, which
//! cargo then replays on every build. Here a build that works says one
//! line (plus the compiler's warnings about the eBPF code, if it has any),
//! and one that fails shows everything the inner cargo printed.
use std::{
    io::Read as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, anyhow, bail};
use aya_obj::maps::PinningType;
use cargo_metadata::{Artifact, CompilerMessage, Message, diagnostic::DiagnosticLevel};
use forwarder_common::{
    layout::{MapShape, identity},
    maps::layout_named,
};

/// The toolchain the eBPF crate is built with (`-Z build-std` needs it).
const TOOLCHAIN: &str = "nightly";

/// A failure says what went wrong, without the backtrace an `anyhow`
/// error returned from main would print whenever RUST_BACKTRACE is set.
fn main() {
    if let Err(err) = run() {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

fn run() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "forwarder-ebpf")
        .ok_or_else(|| anyhow!("forwarder-ebpf package not found"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", ebpf.manifest_path))?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    build_ebpf(ebpf.name.as_str(), root_dir.as_std_path(), &out_dir)?;
    write_layout_id(&out_dir)
}

/// The BPF target of the host's byte order, and the architecture the
/// programs read kernel structures of.
fn bpf_target() -> anyhow::Result<(String, String)> {
    let endian = std::env::var("CARGO_CFG_TARGET_ENDIAN")?;
    let target = match endian.as_str() {
        "little" => "bpfel-unknown-none",
        "big" => "bpfeb-unknown-none",
        other => bail!("unsupported byte order {other}"),
    };
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH")?;
    let arch = if arch.starts_with("riscv64") {
        "riscv64".into()
    } else {
        arch
    };
    Ok((target.into(), arch))
}

/// Builds `package`'s binaries for the BPF target and copies them to
/// `out_dir`.
fn build_ebpf(package: &str, root_dir: &Path, out_dir: &Path) -> anyhow::Result<()> {
    // The build-dependency on the package reruns this script when its
    // library or dependencies change; this covers its binary's sources.
    println!("cargo:rerun-if-changed={}", root_dir.display());
    let (target, arch) = bpf_target()?;
    // Apart from OUT_DIR itself, so a binary named like the package can be
    // copied there.
    let target_dir = out_dir.join("aya-build").join("target").join(package);
    let mut cmd = Command::new("rustup");
    cmd.args(["run", TOOLCHAIN, "cargo", "build", "--package", package])
        .args(["--bins", "--release", "--message-format=json"])
        .args(["--target", &target, "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(&target_dir)
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            format!("--cfg=bpf_target_arch=\"{arch}\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf"),
        )
        // The outer build's compiler is not the nightly one.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("running {cmd:?} (is rustup installed?)"))?;
    let mut stderr = child.stderr.take().context("stderr")?;
    let stderr = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let stdout = std::io::BufReader::new(child.stdout.take().context("stdout")?);
    let mut executables = Vec::new();
    let mut diagnostics = Vec::new();
    let mut warnings = Vec::new();
    for message in Message::parse_stream(stdout) {
        match message.context("the inner cargo's JSON output")? {
            Message::CompilerArtifact(Artifact {
                executable: Some(executable),
                target,
                ..
            }) => executables.push((target.name, executable.into_std_path_buf())),
            Message::CompilerMessage(CompilerMessage { message, .. }) => {
                let rendered = message.rendered.unwrap_or(message.message);
                // The "N warnings emitted" summary has no span.
                if message.level == DiagnosticLevel::Warning && !message.spans.is_empty() {
                    warnings.push(rendered.clone());
                }
                diagnostics.push(rendered);
            }
            Message::TextLine(line) => diagnostics.push(line),
            _ => {}
        }
    }
    let status = child
        .wait()
        .with_context(|| format!("waiting for {cmd:?}"))?;
    let stderr = stderr.join().unwrap_or_default();
    if !status.success() {
        // Cargo shows a failed build script's output in full.
        for text in &diagnostics {
            eprintln!("{text}");
        }
        eprintln!("{stderr}");
        bail!("building the eBPF programs failed ({status}): {cmd:?}");
    }
    for (name, binary) in executables {
        let dst = out_dir.join(name);
        std::fs::copy(&binary, &dst)
            .with_context(|| format!("copying {} to {}", binary.display(), dst.display()))?;
    }
    println!(
        "cargo:warning=eBPF programs built: {package} for {target} ({TOOLCHAIN}, release){}",
        match warnings.len() {
            0 => String::new(),
            n => format!(", {n} compiler warning(s) below"),
        }
    );
    for line in warnings.iter().flat_map(|w| w.trim_end().lines()) {
        println!("cargo:warning={line}");
    }
    Ok(())
}

/// OUT_DIR/layout_id: the identity of every pinned map of the object.
fn write_layout_id(out_dir: &Path) -> anyhow::Result<()> {
    let bytes = std::fs::read(out_dir.join("forwarder-ebpf")).context("reading the eBPF object")?;
    let object =
        aya_obj::Object::parse(&bytes).map_err(|e| anyhow!("parsing the eBPF object: {e}"))?;
    let mut maps: Vec<(&str, MapShape, u64)> = object
        .maps
        .iter()
        .filter(|(_, map)| map.pinning() == PinningType::ByName)
        .map(|(name, map)| {
            let layout = layout_named(name).ok_or_else(|| {
                anyhow!("map {name} has no entry in forwarder_common::maps::MAP_LAYOUTS")
            })?;
            let shape = MapShape {
                map_type: map.map_type(),
                key_size: map.key_size(),
                value_size: map.value_size(),
                max_entries: map.max_entries(),
                flags: map.map_flags(),
            };
            Ok((name.as_str(), shape, layout))
        })
        .collect::<anyhow::Result<_>>()?;
    maps.sort_by(|a, b| a.0.cmp(b.0));
    std::fs::write(
        out_dir.join("layout_id"),
        format!("{:#018x}", identity(maps)),
    )?;
    Ok(())
}
