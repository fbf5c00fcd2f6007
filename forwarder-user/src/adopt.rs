//! Which pinned maps this build may adopt. A map is adopted only when its
//! type, key size, value size, capacity and flags equal this build's
//! definition and its recorded layout (the fingerprint of its key and value
//! types, see `forwarder_common::layout`) equals this build's. Any other
//! pin is migrated: set aside, replaced by a fresh map, its entries carried
//! over when only the capacity or flags changed (the flow table's twice:
//! when it is replaced, and again once the links run the new programs, for
//! the flows opened in between), and removed then. A start that fails
//! before any link runs its programs puts every pin back as it found it.

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::OsString,
    fmt, fs, io,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, anyhow};
use aya::maps::{HashMap, Map, MapData, MapType};
use aya_obj::maps::PinningType;
use forwarder_common::{
    layout::MapShape as Shape,
    maps::{layout_named, names},
};

use crate::{
    EBPF_OBJECT,
    flow_table::FlowTable,
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
    record_if_any(layout).unwrap_or_default()
}

fn record_if_any(layout: &PinLayout) -> Option<BTreeMap<String, u64>> {
    let data = MapData::from_pin(layout.meta.join(LAYOUTS)).ok()?;
    let map = HashMap::<MapData, [u8; 16], u64>::try_from(Map::HashMap(data)).ok()?;
    Some(
        map.iter()
            .filter_map(Result::ok)
            .map(|(key, value)| {
                let end = key.iter().position(|b| *b == 0).unwrap_or(key.len());
                (String::from_utf8_lossy(&key[..end]).into_owned(), value)
            })
            .collect(),
    )
}

/// Records this build's layouts for the next instance and for `inspect`.
pub fn record(layout: &PinLayout, defs: &[MapDef]) -> Result<()> {
    let entries = defs
        .iter()
        .map(|def| (def.name.clone(), def.layout))
        .chain(std::iter::once((IDENTITY_KEY.into(), identity(defs))));
    write_record(layout, entries)
}

/// Makes the record hold exactly `entries`.
fn write_record(layout: &PinLayout, entries: impl Iterator<Item = (String, u64)>) -> Result<()> {
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
    for (name, value) in entries {
        map.insert(record_key(&name), value, 0)?;
    }
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

/// The name a map pinned in `origin` (`maps`, or a legacy directory) is
/// set aside under: `<origin>@<name>`, with a number after it when a map
/// of that name is already set aside.
fn aside_name(stale: &Path, origin: &str, name: &str) -> PathBuf {
    let mut path = stale.join(format!("{origin}@{name}"));
    let mut n = 0;
    while path.exists() {
        n += 1;
        path = stale.join(format!("{origin}@{name}.{n}"));
    }
    path
}

/// Where a set-aside map came from, by its name in `stale/`.
fn aside_origin(layout: &PinLayout, aside: &str) -> Option<PathBuf> {
    let (origin, rest) = aside.split_once('@')?;
    let name = rest.split('.').next()?;
    let dir = if origin == "maps" {
        layout.maps.clone()
    } else {
        LEGACY_DIRS
            .iter()
            .find(|d| **d == origin)
            .map(|d| layout.root.join(d).join("maps"))?
    };
    Some(dir.join(name))
}

/// Before loading: moves every pin this build may not adopt out of the way
/// (so the loader creates a fresh map under the name), together with the
/// maps and links of a release that kept a version in the path; that
/// release's links move to `links/`, to be adopted like any other.
pub fn set_aside(layout: &PinLayout, defs: &[MapDef]) -> Result<Vec<Replaced>> {
    let stale = &layout.stale;
    fs::create_dir_all(stale).with_context(|| format!("creating {}", stale.display()))?;
    let recorded = recorded(layout);
    let mut replaced = Vec::new();
    let mut set_aside_one = |path: &Path, origin: &str, name: &str, why: Mismatch| -> Result<()> {
        let old_pin = aside_name(stale, origin, name);
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
            set_aside_one(&entry.path(), "maps", &name, why)?;
        }
    }
    for dir in LEGACY_DIRS {
        let legacy = layout.root.join(dir);
        for entry in read_dir(&legacy.join("maps"))? {
            let name = entry.file_name().to_string_lossy().into_owned();
            set_aside_one(&entry.path(), dir, &name, Mismatch::Layout)?;
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

/// Once the links run the new programs: carries the flows the old
/// programs opened or changed at or after `since_ns` (when the table was
/// first copied) into the new flow table, unless it holds them fresher.
/// Returns how many, when the flow table was migrated at all.
pub fn carry_over_again(
    layout: &PinLayout,
    replaced: &[Replaced],
    since_ns: u64,
) -> Result<Option<usize>> {
    let Some(flows) = replaced
        .iter()
        .find(|r| r.name == names::FLOWS && r.why.carries())
    else {
        return Ok(None);
    };
    let (old, _) = shape_of(&flows.old_pin)?;
    let (new, _) = shape_of(&layout.maps.join(names::FLOWS))?;
    FlowTable::of(&new)
        .merge_newer(&FlowTable::of(&old), since_ns)
        .map(Some)
        .context("carrying the flows opened during the migration over")
}

/// Once the links run the new programs, nothing uses the set-aside maps.
pub fn remove_set_aside(layout: &PinLayout) -> Result<()> {
    crate::pin::remove_tree(&layout.stale)
        .with_context(|| format!("removing {}", layout.stale.display()))
}

fn names_in(dir: &Path) -> Result<BTreeSet<OsString>> {
    Ok(read_dir(dir)?.iter().map(fs::DirEntry::file_name).collect())
}

/// The pins a start found, so that a start failing before any link runs
/// its programs can leave them exactly as they were: the predecessor's
/// programs keep forwarding, and the next start adopts them.
#[derive(Debug)]
pub struct Found {
    maps: BTreeSet<OsString>,
    stale: BTreeSet<OsString>,
    layouts: Option<BTreeMap<String, u64>>,
    predecessor: bool,
}

impl Found {
    pub fn read(layout: &PinLayout) -> Result<Self> {
        let maps = names_in(&layout.maps)?;
        let legacy = LEGACY_DIRS.iter().any(|d| layout.root.join(d).exists());
        let predecessor = !maps.is_empty() || !names_in(&layout.links)?.is_empty() || legacy;
        Ok(Found {
            maps,
            stale: names_in(&layout.stale)?,
            layouts: record_if_any(layout),
            predecessor,
        })
    }

    /// Whether an instance left maps or links there.
    pub fn predecessor(&self) -> bool {
        self.predecessor
    }

    /// Puts the pins back as they were found: maps pinned since are
    /// removed, maps set aside go back, and the layout record is restored.
    /// Links are left alone: nothing attached replaced them. (The links of
    /// a release that kept a version in the path stay in `links/`, where
    /// the next start adopts them as well.)
    pub fn restore(&self, layout: &PinLayout) -> Result<()> {
        for entry in read_dir(&layout.maps)? {
            if !self.maps.contains(&entry.file_name()) {
                fs::remove_file(entry.path())
                    .with_context(|| format!("removing {}", entry.path().display()))?;
            }
        }
        for entry in read_dir(&layout.stale)? {
            if self.stale.contains(&entry.file_name()) {
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            let origin = aside_origin(layout, &name)
                .ok_or_else(|| anyhow!("{} is no map set aside", entry.path().display()))?;
            if let Some(dir) = origin.parent() {
                fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            }
            fs::rename(entry.path(), &origin)
                .with_context(|| format!("moving {} back", origin.display()))?;
        }
        if self.stale.is_empty() {
            crate::pin::remove_tree(&layout.stale)?;
        }
        match &self.layouts {
            Some(layouts) => write_record(layout, layouts.clone().into_iter())?,
            None => match fs::remove_file(layout.meta.join(LAYOUTS)) {
                Err(err) if err.kind() != io::ErrorKind::NotFound => return Err(err.into()),
                _ => {}
            },
        }
        Ok(())
    }
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
    fn a_map_set_aside_knows_where_it_goes_back() {
        let root = std::env::temp_dir().join(format!("forwarder-aside-{}", std::process::id()));
        let layout = PinLayout::new(&root);
        fs::create_dir_all(&layout.stale).unwrap();
        let first = aside_name(&layout.stale, "maps", "FLOWS");
        assert_eq!(first, layout.stale.join("maps@FLOWS"));
        fs::write(&first, b"").unwrap();
        let second = aside_name(&layout.stale, "maps", "FLOWS");
        assert_eq!(second, layout.stale.join("maps@FLOWS.1"), "the first stays");
        for aside in [first, second] {
            let name = aside.file_name().unwrap().to_str().unwrap();
            assert_eq!(aside_origin(&layout, name), Some(layout.maps.join("FLOWS")));
        }
        assert_eq!(
            aside_origin(&layout, "v1@UPLINK"),
            Some(root.join("v1/maps/UPLINK"))
        );
        assert_eq!(aside_origin(&layout, "v9@UPLINK"), None, "no such origin");
        assert_eq!(
            aside_origin(&layout, "FLOWS-0"),
            None,
            "not set aside by this build"
        );
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn capacities_set_at_load_time_count() {
        let defs = definitions(&[("FLOWS", 1024)]).unwrap();
        let flows = defs.iter().find(|d| d.name == "FLOWS").unwrap();
        assert_eq!(flows.shape.max_entries, 1024);
        assert_ne!(identity(&defs), LAYOUT_ID);
    }
}
