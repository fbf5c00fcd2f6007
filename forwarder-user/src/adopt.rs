//! Which pinned maps this build may adopt. A map is adopted only when its
//! type, key size, value size, capacity and flags equal this build's
//! definition and its recorded layout (the fingerprint of its key and value
//! types, see `forwarder_common::layout`) equals this build's. Any other
//! pin is migrated: set aside, replaced by a fresh map, its entries carried
//! over when only the capacity or flags changed, and removed once the links
//! run the new programs.

use std::{
    collections::BTreeMap,
    fmt, fs, io,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, anyhow};
use aya::maps::{HashMap, Map, MapData, MapType};
use aya_obj::maps::PinningType;
use forwarder_common::{layout::MapShape as Shape, maps::layout_named};

use crate::{
    EBPF_OBJECT,
    pin::{LEGACY_DIRS, PinLayout},
    raw_map::RawMap,
};

/// The build-time identity of this build's map layouts: a hash of every
/// pinned map's definition and key and value fingerprints.
pub const LAYOUT_ID: u64 = include!(concat!(env!("OUT_DIR"), "/layout_id"));

/// Name of the daemon's record of layouts in `<pin-dir>/meta`.
const LAYOUTS: &str = "LAYOUTS";
/// Key of the layout identity in the record, beside the per-map entries.
const IDENTITY_KEY: &str = "(identity)";
/// Capacity of the record; its own definition never changes.
const LAYOUTS_CAPACITY: u32 = 64;

/// A pinned map of this build.
#[derive(Clone, Debug)]
pub struct MapDef {
    pub name: String,
    pub shape: Shape,
    pub layout: u64,
}

/// This build's pinned maps, as the embedded object defines them, with
/// the capacities set at load time (`sizes`) instead of the compiled ones.
pub fn definitions(sizes: &[(&str, u32)]) -> Result<Vec<MapDef>> {
    let object =
        aya_obj::Object::parse(EBPF_OBJECT).map_err(|e| anyhow!("parsing the eBPF object: {e}"))?;
    let mut defs: Vec<MapDef> = object
        .maps
        .iter()
        .filter(|(_, map)| map.pinning() == PinningType::ByName)
        .map(|(name, map)| {
            let layout = layout_named(name)
                .ok_or_else(|| anyhow!("map {name} has no entry in MAP_LAYOUTS"))?;
            let max_entries = sizes
                .iter()
                .find(|(n, _)| n == name)
                .map_or(map.max_entries(), |(_, size)| *size);
            Ok(MapDef {
                name: name.clone(),
                shape: Shape {
                    map_type: map.map_type(),
                    key_size: map.key_size(),
                    value_size: map.value_size(),
                    max_entries,
                    flags: map.map_flags(),
                },
                layout,
            })
        })
        .collect::<Result<_>>()?;
    defs.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(defs)
}

/// The identity of a set of definitions (sorted by name), as build.rs
/// computes LAYOUT_ID from the compiled ones.
pub fn identity(defs: &[MapDef]) -> u64 {
    forwarder_common::layout::identity(defs.iter().map(|d| (d.name.as_str(), d.shape, d.layout)))
}

fn shape_of(path: &Path) -> Result<(MapData, Shape)> {
    let data = MapData::from_pin(path).with_context(|| format!("opening {}", path.display()))?;
    let info = data
        .info()
        .with_context(|| format!("reading {}", path.display()))?;
    let map_type = info.map_type().map_or(u32::MAX, |t| t as u32);
    let shape = Shape {
        map_type,
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: info.max_entries(),
        flags: info.map_flags(),
    };
    Ok((data, shape))
}

fn record_key(name: &str) -> [u8; 16] {
    let mut key = [0u8; 16];
    for (k, b) in key.iter_mut().zip(name.bytes().take(15)) {
        *k = b;
    }
    key
}

/// The layouts a previous instance recorded, by map name; empty when there
/// is no record (a build from before records were kept).
pub fn recorded(layout: &PinLayout) -> BTreeMap<String, u64> {
    let path = layout.meta.join(LAYOUTS);
    let Ok(data) = MapData::from_pin(&path) else {
        return BTreeMap::new();
    };
    let Ok(map) = HashMap::<MapData, [u8; 16], u64>::try_from(Map::HashMap(data)) else {
        return BTreeMap::new();
    };
    map.iter()
        .filter_map(Result::ok)
        .map(|(key, value)| {
            let end = key.iter().position(|b| *b == 0).unwrap_or(key.len());
            (String::from_utf8_lossy(&key[..end]).into_owned(), value)
        })
        .collect()
}

/// Records this build's layouts for the next instance and for `inspect`.
pub fn record(layout: &PinLayout, defs: &[MapDef]) -> Result<()> {
    let path = layout.meta.join(LAYOUTS);
    if MapData::from_pin(&path).is_err() {
        HashMap::<MapData, [u8; 16], u64>::create(LAYOUTS_CAPACITY, 0)?
            .pin(&path)
            .with_context(|| format!("pinning {}", path.display()))?;
    }
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    let mut map = HashMap::<MapData, [u8; 16], u64>::try_from(Map::HashMap(data))?;
    let stale: Vec<[u8; 16]> = map.keys().filter_map(Result::ok).collect();
    for key in stale {
        map.remove(&key)?;
    }
    for def in defs {
        map.insert(record_key(&def.name), def.layout, 0)?;
    }
    map.insert(record_key(IDENTITY_KEY), identity(defs), 0)?;
    Ok(())
}

/// Why a pinned map is not adopted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mismatch {
    /// This build has no map of that name.
    Unknown,
    /// Type, key or value size differ: nothing can be carried over.
    Shape { pinned: Shape, wanted: Shape },
    /// No layout was recorded for it, or another one.
    Layout,
    /// Only the capacity or flags differ: entries are carried over.
    Capacity { pinned: Shape, wanted: Shape },
}

impl Mismatch {
    pub fn carries(&self) -> bool {
        matches!(self, Mismatch::Capacity { .. })
    }
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mismatch::Unknown => f.write_str("this build has no such map"),
            Mismatch::Shape { pinned, wanted } => {
                write!(f, "pinned as {pinned}; this build defines {wanted}")
            }
            Mismatch::Layout => f.write_str(
                "its key or value layout differs from this build's (or was never recorded)",
            ),
            Mismatch::Capacity { pinned, wanted } => write!(
                f,
                "{} entries, flags {:#x} pinned; this build wants {} entries, flags {:#x}",
                pinned.max_entries, pinned.flags, wanted.max_entries, wanted.flags
            ),
        }
    }
}

/// Decides for one pinned map.
pub fn compare(pinned: Shape, recorded: Option<u64>, def: Option<&MapDef>) -> Option<Mismatch> {
    let Some(def) = def else {
        return Some(Mismatch::Unknown);
    };
    let wanted = def.shape;
    if (pinned.map_type, pinned.key_size, pinned.value_size)
        != (wanted.map_type, wanted.key_size, wanted.value_size)
    {
        return Some(Mismatch::Shape { pinned, wanted });
    }
    if recorded != Some(def.layout) {
        return Some(Mismatch::Layout);
    }
    if pinned != wanted {
        return Some(Mismatch::Capacity { pinned, wanted });
    }
    None
}

/// A pinned map set aside for a fresh one.
#[derive(Debug)]
pub struct Replaced {
    pub name: String,
    pub why: Mismatch,
    /// Where the old map is pinned until the links run the new programs.
    pub old_pin: PathBuf,
    pub carried: usize,
}

/// Where set-aside maps wait for the links to move on.
fn stale_dir(layout: &PinLayout) -> PathBuf {
    layout.root.join("stale")
}

/// Before loading: moves every pin this build may not adopt out of the way
/// (so the loader creates a fresh map under the name), together with the
/// maps and links of a release that kept a version in the path; that
/// release's links move to `links/`, to be adopted like any other.
pub fn set_aside(layout: &PinLayout, defs: &[MapDef]) -> Result<Vec<Replaced>> {
    let stale = stale_dir(layout);
    fs::create_dir_all(&stale).with_context(|| format!("creating {}", stale.display()))?;
    let recorded = recorded(layout);
    let mut replaced = Vec::new();
    let mut set_aside_one = |path: &Path, name: &str, why: Mismatch| -> Result<()> {
        let old_pin = stale.join(format!("{name}-{}", replaced.len()));
        fs::rename(path, &old_pin).with_context(|| format!("moving {} aside", path.display()))?;
        replaced.push(Replaced {
            name: name.to_string(),
            why,
            old_pin,
            carried: 0,
        });
        Ok(())
    };
    for entry in read_dir(&layout.maps)? {
        let name = entry.file_name().to_string_lossy().into_owned();
        let (_, shape) = shape_of(&entry.path())?;
        let def = defs.iter().find(|d| d.name == name);
        if let Some(why) = compare(shape, recorded.get(&name).copied(), def) {
            set_aside_one(&entry.path(), &name, why)?;
        }
    }
    for legacy in LEGACY_DIRS.iter().map(|d| layout.root.join(d)) {
        for entry in read_dir(&legacy.join("maps"))? {
            let name = entry.file_name().to_string_lossy().into_owned();
            set_aside_one(&entry.path(), &name, Mismatch::Layout)?;
        }
        for entry in read_dir(&legacy.join("links"))? {
            let to = layout.links.join(entry.file_name());
            fs::rename(entry.path(), &to)
                .with_context(|| format!("taking over {}", entry.path().display()))?;
        }
        crate::pin::remove_tree(&legacy)
            .with_context(|| format!("removing {}", legacy.display()))?;
    }
    Ok(replaced)
}

fn read_dir(dir: &Path) -> Result<Vec<fs::DirEntry>> {
    match fs::read_dir(dir) {
        Ok(entries) => Ok(entries.collect::<io::Result<_>>()?),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(err) => Err(err).with_context(|| format!("reading {}", dir.display())),
    }
}

fn per_cpu(map_type: u32) -> bool {
    [
        MapType::PerCpuArray,
        MapType::PerCpuHash,
        MapType::LruPerCpuHash,
    ]
    .iter()
    .any(|t| *t as u32 == map_type)
}

/// After loading: carries the entries of every replaced map that allows it
/// into the new map pinned under its name.
pub fn carry_over(layout: &PinLayout, replaced: &mut [Replaced]) -> Result<()> {
    for r in replaced.iter_mut().filter(|r| r.why.carries()) {
        let (old, shape) = shape_of(&r.old_pin)?;
        let (new, _) = shape_of(&layout.maps.join(&r.name))?;
        let is_per_cpu = per_cpu(shape.map_type);
        let from = RawMap::new(
            old.fd().as_fd(),
            shape.key_size,
            shape.value_size,
            is_per_cpu,
        );
        let to = RawMap::new(
            new.fd().as_fd(),
            shape.key_size,
            shape.value_size,
            is_per_cpu,
        );
        r.carried = from
            .copy_into(&to)
            .with_context(|| format!("carrying the entries of {} over", r.name))?;
    }
    Ok(())
}

/// Once the links run the new programs, nothing uses the set-aside maps.
pub fn remove_set_aside(layout: &PinLayout) -> Result<()> {
    let stale = stale_dir(layout);
    crate::pin::remove_tree(&stale).with_context(|| format!("removing {}", stale.display()))
}

/// For readers of the pins (`inspect`, `flows`): an error naming the first
/// map whose recorded layout is not this build's.
pub fn check_readable(layout: &PinLayout, names: &[&str]) -> Result<()> {
    let recorded = recorded(layout);
    if recorded.get(IDENTITY_KEY) == Some(&LAYOUT_ID) {
        return Ok(());
    }
    for name in names {
        let wanted = layout_named(name);
        if recorded.get(*name).copied() != wanted {
            return Err(anyhow!(
                "the pinned map {name} in {} was written by a forwarder build with another map \
                 layout (this build's is {LAYOUT_ID:016x}): read it with that build's `forwarder`, \
                 or restart the daemon with this build, which migrates the pins",
                layout.maps.display()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(max_entries: u32) -> MapDef {
        MapDef {
            name: "REASON_COUNTERS".into(),
            shape: Shape {
                map_type: MapType::PerCpuArray as u32,
                key_size: 4,
                value_size: 8,
                max_entries,
                flags: 0,
            },
            layout: 7,
        }
    }

    #[test]
    fn only_an_exact_match_is_adopted() {
        let wanted = def(33);
        assert_eq!(compare(wanted.shape, Some(7), Some(&wanted)), None);
        let smaller = def(3);
        let why = compare(smaller.shape, Some(7), Some(&wanted)).unwrap();
        assert!(why.carries(), "{why}");
        assert_eq!(
            compare(smaller.shape, None, Some(&wanted)),
            Some(Mismatch::Layout),
            "no record: nothing is known of its entries"
        );
        let mut wider = wanted.shape;
        wider.value_size = 16;
        assert!(matches!(
            compare(wider, Some(7), Some(&wanted)),
            Some(Mismatch::Shape { .. })
        ));
        assert_eq!(
            compare(wanted.shape, Some(7), None),
            Some(Mismatch::Unknown)
        );
    }

    #[test]
    fn the_build_time_identity_is_the_object_s() {
        let defs = definitions(&[]).unwrap();
        assert!(defs.iter().any(|d| d.name == "FLOWS"));
        assert_eq!(identity(&defs), LAYOUT_ID);
    }

    #[test]
    fn capacities_set_at_load_time_count() {
        let defs = definitions(&[("FLOWS", 1024)]).unwrap();
        let flows = defs.iter().find(|d| d.name == "FLOWS").unwrap();
        assert_eq!(flows.shape.max_entries, 1024);
        assert_ne!(identity(&defs), LAYOUT_ID);
    }
}
