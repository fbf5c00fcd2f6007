//! A flow table filled to the brim, straight through an instance's pin:
//! what a flood of peers would leave, without sending a million packets.

use std::path::Path;

use anyhow::{Context as _, Result};
use aya::maps::MapData;
use forwarder::{flow_table::FlowTable, pin::PinLayout};
use forwarder_common::maps::{FlowEntry, FlowKey, names};

/// The flow table of the instance pinned at `pin_dir`.
pub fn flow_map(pin_dir: &Path) -> Result<MapData> {
    let path = PinLayout::new(pin_dir).maps.join(names::FLOWS);
    MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))
}

/// `n` flows of distinct peers (100.64.0.0/10, ports 1024 and up) to
/// `proto` port `listen_port`, each `entry` as given, numbered from
/// `first`: flows `first..first + n`.
pub fn flows(
    first: u32,
    n: u32,
    proto: u8,
    listen_port: u16,
    entry: FlowEntry,
) -> Vec<(FlowKey, FlowEntry)> {
    (first..first + n)
        .map(|i| {
            let peer = u32::from_be_bytes([100, 64, 0, 0]) + i / 50_000;
            let port = 1024 + (i % 50_000) as u16;
            (
                FlowKey::new(peer.to_be(), port.to_be(), proto, listen_port.to_be()),
                entry,
            )
        })
        .collect()
}

/// Writes `flows` into the table of the instance at `pin_dir`.
pub fn fill(pin_dir: &Path, flows: &[(FlowKey, FlowEntry)]) -> Result<usize> {
    let map = flow_map(pin_dir)?;
    FlowTable::of(&map).set_many(flows)
}
