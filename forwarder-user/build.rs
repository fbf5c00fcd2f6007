//! Compiles forwarder-ebpf for the BPF target (nightly, bpf-linker) so the
//! object can be embedded in the `forwarder` binary, and derives the layout
//! identity of its pinned maps from the compiled definitions.
use std::path::PathBuf;

use anyhow::{Context as _, anyhow};
use aya_obj::maps::PinningType;
use forwarder_common::{
    layout::{MapShape, identity},
    maps::layout_named,
};

fn main() -> anyhow::Result<()> {
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
    aya_build::build_ebpf(
        [aya_build::Package {
            name: ebpf.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )?;
    write_layout_id()
}

/// OUT_DIR/layout_id: the identity of every pinned map of the object.
fn write_layout_id() -> anyhow::Result<()> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
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
