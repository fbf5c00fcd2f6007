//! A map read and written as bytes, through the bpf syscall itself: whole
//! tables walked and filled in batches (BPF_MAP_LOOKUP_BATCH and
//! BPF_MAP_UPDATE_BATCH, which aya does not wrap, with a key-by-key
//! fallback for kernels or map types without them), and the entries of a
//! pinned map of an older definition carried into its replacement, whose
//! key and value types this build knows only by their sizes.

use std::{
    io,
    ops::ControlFlow,
    os::fd::{AsRawFd as _, BorrowedFd},
};

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// The kernel's internal "not supported" errno, which the batch commands
/// return for map types that lack them.
const ENOTSUPP: i32 = 524;

/// Entries per batch: a few hundred KiB of buffers for the flow table,
/// and short enough that a walk can be stopped between two batches.
pub const CHUNK: usize = 4096;

/// The `bpf_attr` of the element commands.
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    pad: u32,
    key: u64,
    value_or_next_key: u64,
    flags: u64,
}

/// The `bpf_attr` of the batch commands.
#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

fn bpf<A>(cmd: libc::c_long, attr: &mut A) -> io::Result<()> {
    // SAFETY: attr is the bpf_attr prefix `cmd` reads, and its pointers
    // point at buffers of the sizes the map was created with.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut A,
            size_of::<A>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A batch command the kernel does not have for this map.
fn unsupported(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EINVAL | libc::EOPNOTSUPP | libc::ENOSYS | ENOTSUPP)
    )
}

/// Entries as the kernel returned them: keys back to back, then values.
pub struct Chunk<'b> {
    keys: &'b [u8],
    values: &'b [u8],
    key_size: usize,
    value_len: usize,
    len: usize,
}

impl Chunk<'_> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn key(&self, i: usize) -> &[u8] {
        &self.keys[i * self.key_size..(i + 1) * self.key_size]
    }

    pub fn value(&self, i: usize) -> &[u8] {
        &self.values[i * self.value_len..(i + 1) * self.value_len]
    }
}

pub struct RawMap<'a> {
    fd: BorrowedFd<'a>,
    key_size: usize,
    /// Per-CPU maps hold one 8-byte aligned value per possible CPU.
    value_len: usize,
    batch_ops: bool,
}

impl<'a> RawMap<'a> {
    pub fn new(fd: BorrowedFd<'a>, key_size: u32, value_size: u32, per_cpu: bool) -> Self {
        let value_len = if per_cpu {
            let cpus = aya::util::nr_cpus().map_or(1, |n| n);
            (value_size as usize).div_ceil(8) * 8 * cpus
        } else {
            value_size as usize
        };
        RawMap {
            fd,
            key_size: key_size as usize,
            value_len,
            batch_ops: true,
        }
    }

    /// The same map, walked and filled key by key as on a kernel without
    /// the batch commands.
    #[cfg(test)]
    fn without_batch_ops(self) -> Self {
        RawMap {
            batch_ops: false,
            ..self
        }
    }

    pub fn value_len(&self) -> usize {
        self.value_len
    }

    fn attr(&self, key: &[u8], value: *mut u8) -> ElemAttr {
        ElemAttr {
            map_fd: self.fd.as_raw_fd() as u32,
            pad: 0,
            key: key.as_ptr() as u64,
            value_or_next_key: value as u64,
            flags: 0,
        }
    }

    /// The value under `key`, if there is one.
    pub fn get(&self, key: &[u8]) -> io::Result<Option<Vec<u8>>> {
        let mut value = vec![0u8; self.value_len];
        let mut attr = self.attr(key, value.as_mut_ptr());
        match bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
            Ok(()) => Ok(Some(value)),
            Err(err) if err.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(err) => Err(err),
        }
    }

    pub fn set(&self, key: &[u8], value: &[u8]) -> io::Result<()> {
        let mut value = value.to_vec();
        let mut attr = self.attr(key, value.as_mut_ptr());
        bpf(BPF_MAP_UPDATE_ELEM, &mut attr)
    }

    /// Removes `key`; false when it was not there (any more).
    pub fn delete(&self, key: &[u8]) -> io::Result<bool> {
        let mut attr = self.attr(key, std::ptr::null_mut());
        match bpf(BPF_MAP_DELETE_ELEM, &mut attr) {
            Ok(()) => Ok(true),
            Err(err) if err.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(err) => Err(err),
        }
    }

    /// Hands every entry to `each`, a chunk at a time, until it breaks.
    /// `each` may delete entries of the chunk it holds. Entries added or
    /// removed meanwhile by others may or may not be seen, as with any
    /// walk of a live map.
    pub fn for_each_chunk(
        &self,
        mut each: impl FnMut(&Chunk<'_>) -> io::Result<ControlFlow<()>>,
    ) -> io::Result<()> {
        if self.batch_ops {
            match self.walk_batches(&mut each) {
                Err(err) if unsupported(&err) => {}
                done => return done.map(drop),
            }
        }
        self.walk_keys(&mut each)
    }

    /// BPF_MAP_LOOKUP_BATCH: one syscall per chunk. Fails with the batch
    /// command's error, before anything was handed out, where the kernel
    /// lacks it.
    fn walk_batches(
        &self,
        each: &mut impl FnMut(&Chunk<'_>) -> io::Result<ControlFlow<()>>,
    ) -> io::Result<()> {
        let mut capacity = CHUNK;
        let mut keys = vec![0u8; capacity * self.key_size];
        let mut values = vec![0u8; capacity * self.value_len];
        // The position token: a bucket index for hash maps, a key for the
        // others.
        let token_len = self.key_size.max(8);
        let mut position = vec![0u8; token_len];
        let mut next = vec![0u8; token_len];
        let mut first = true;
        loop {
            let mut attr = BatchAttr {
                in_batch: if first { 0 } else { position.as_ptr() as u64 },
                out_batch: next.as_mut_ptr() as u64,
                keys: keys.as_mut_ptr() as u64,
                values: values.as_mut_ptr() as u64,
                count: capacity as u32,
                map_fd: self.fd.as_raw_fd() as u32,
                elem_flags: 0,
                flags: 0,
            };
            let last = match bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) {
                Ok(()) => false,
                Err(err) if err.raw_os_error() == Some(libc::ENOENT) => true,
                // One hash bucket holds more entries than the buffer.
                Err(err) if err.raw_os_error() == Some(libc::ENOSPC) => {
                    capacity *= 2;
                    keys.resize(capacity * self.key_size, 0);
                    values.resize(capacity * self.value_len, 0);
                    continue;
                }
                Err(err) => return Err(err),
            };
            let chunk = Chunk {
                keys: &keys,
                values: &values,
                key_size: self.key_size,
                value_len: self.value_len,
                len: attr.count as usize,
            };
            if each(&chunk)?.is_break() || last {
                return Ok(());
            }
            std::mem::swap(&mut position, &mut next);
            first = false;
        }
    }

    /// BPF_MAP_GET_NEXT_KEY and a lookup per entry. The last key read is
    /// handed out only with the next chunk: `each` may delete what it
    /// holds, and a walk continued from a deleted key starts over.
    fn walk_keys(
        &self,
        each: &mut impl FnMut(&Chunk<'_>) -> io::Result<ControlFlow<()>>,
    ) -> io::Result<()> {
        let mut cursor: Option<Vec<u8>> = None;
        loop {
            let mut keys: Vec<u8> = Vec::with_capacity((CHUNK + 1) * self.key_size);
            let mut from = cursor.take();
            let mut ended = false;
            if let Some(key) = &from {
                keys.extend_from_slice(key);
            }
            while keys.len() < (CHUNK + 1) * self.key_size {
                let mut next = vec![0u8; self.key_size];
                let mut attr = match &from {
                    Some(key) => self.attr(key, next.as_mut_ptr()),
                    None => ElemAttr {
                        key: 0,
                        ..self.attr(&[], next.as_mut_ptr())
                    },
                };
                match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
                    Ok(()) => {}
                    Err(err) if err.raw_os_error() == Some(libc::ENOENT) => {
                        ended = true;
                        break;
                    }
                    Err(err) => return Err(err),
                }
                keys.extend_from_slice(&next);
                from = Some(next);
            }
            if !ended {
                cursor = from;
                keys.truncate(CHUNK * self.key_size);
            }
            let mut found_keys = Vec::with_capacity(keys.len());
            let mut values = Vec::with_capacity(keys.len() / self.key_size * self.value_len);
            for key in keys.chunks_exact(self.key_size) {
                // Gone since its key was read.
                if let Some(value) = self.get(key)? {
                    found_keys.extend_from_slice(key);
                    values.extend_from_slice(&value);
                }
            }
            let chunk = Chunk {
                keys: &found_keys,
                values: &values,
                key_size: self.key_size,
                value_len: self.value_len,
                len: found_keys.len() / self.key_size,
            };
            if each(&chunk)?.is_break() || ended {
                return Ok(());
            }
        }
    }

    /// Writes entries given back to back (`keys`, and `values` in the same
    /// order) with `flags` (BPF_ANY, BPF_NOEXIST...), in batches where the
    /// kernel has them. An entry the map has no room for (an array index
    /// past its end, a full hash map) is skipped. Returns how many were
    /// written.
    pub fn set_many(&self, keys: &[u8], values: &[u8], flags: u64) -> io::Result<usize> {
        let total = keys.len() / self.key_size;
        let mut done = 0;
        let mut written = 0;
        while self.batch_ops && done < total {
            let take = (total - done).min(CHUNK);
            let mut attr = BatchAttr {
                in_batch: 0,
                out_batch: 0,
                keys: keys[done * self.key_size..].as_ptr() as u64,
                values: values[done * self.value_len..].as_ptr() as u64,
                count: take as u32,
                map_fd: self.fd.as_raw_fd() as u32,
                elem_flags: flags,
                flags: 0,
            };
            match bpf(BPF_MAP_UPDATE_BATCH, &mut attr) {
                Ok(()) => {
                    written += take;
                    done += take;
                }
                // `count` says how many went in before the one refused.
                Err(err) if err.raw_os_error() == Some(libc::E2BIG) => {
                    written += attr.count as usize;
                    done += attr.count as usize + 1;
                }
                Err(err) if done == 0 && unsupported(&err) => break,
                Err(err) => return Err(err),
            }
        }
        for i in done..total {
            let key = &keys[i * self.key_size..(i + 1) * self.key_size];
            let mut value = values[i * self.value_len..(i + 1) * self.value_len].to_vec();
            let mut attr = ElemAttr {
                flags,
                ..self.attr(key, value.as_mut_ptr())
            };
            match bpf(BPF_MAP_UPDATE_ELEM, &mut attr) {
                Ok(()) => written += 1,
                Err(err) if err.raw_os_error() == Some(libc::E2BIG) => {}
                Err(err) => return Err(err),
            }
        }
        Ok(written)
    }

    /// Copies every entry of `self` into `to` (same key and value sizes),
    /// until `to` is full. Returns how many were carried.
    pub fn copy_into(&self, to: &RawMap<'_>) -> io::Result<usize> {
        let mut carried = 0;
        self.for_each_chunk(|chunk| {
            let keys = &chunk.keys[..chunk.len * self.key_size];
            let values = &chunk.values[..chunk.len * self.value_len];
            carried += to.set_many(keys, values, 0)?;
            Ok(ControlFlow::Continue(()))
        })?;
        Ok(carried)
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd as _;

    use aya::maps::{HashMap, IterableMap as _, MapData, PerCpuArray, PerCpuValues};

    use super::*;

    fn root() -> bool {
        // SAFETY: plain libc call.
        unsafe { libc::geteuid() == 0 }
    }

    #[test]
    fn hash_entries_carry_over_until_the_new_map_is_full() {
        if !root() {
            eprintln!("skipped: creating maps needs root");
            return;
        }
        let mut old: HashMap<MapData, u32, u64> = HashMap::create(8, 0).unwrap();
        for k in 0..5u32 {
            old.insert(k, u64::from(k) * 10, 0).unwrap();
        }
        let new: HashMap<MapData, u32, u64> = HashMap::create(3, 0).unwrap();
        let from = RawMap::new(old.map().fd().as_fd(), 4, 8, false);
        let to = RawMap::new(new.map().fd().as_fd(), 4, 8, false);
        assert_eq!(from.copy_into(&to).unwrap(), 3, "the new map holds 3");
        for entry in new.iter() {
            let (k, v) = entry.unwrap();
            assert_eq!(v, u64::from(k) * 10);
        }
    }

    #[test]
    fn per_cpu_arrays_carry_every_cpu_and_stop_at_the_new_size() {
        if !root() {
            eprintln!("skipped: creating maps needs root");
            return;
        }
        let cpus = aya::util::nr_cpus().unwrap();
        let mut old: PerCpuArray<MapData, u64> = PerCpuArray::create(3, 0).unwrap();
        for i in 0..3u32 {
            let values: Vec<u64> = (0..cpus as u64).map(|c| u64::from(i) * 100 + c).collect();
            old.set(i, PerCpuValues::try_from(values).unwrap(), 0)
                .unwrap();
        }
        let new: PerCpuArray<MapData, u64> = PerCpuArray::create(30, 0).unwrap();
        let from = RawMap::new(old.map().fd().as_fd(), 4, 8, true);
        let to = RawMap::new(new.map().fd().as_fd(), 4, 8, true);
        assert_eq!(from.copy_into(&to).unwrap(), 3);
        let two = new.get(&2, 0).unwrap();
        assert_eq!(
            two.iter().copied().collect::<Vec<_>>()[cpus - 1],
            200 + cpus as u64 - 1
        );
        assert!(new.get(&3, 0).unwrap().iter().all(|v| *v == 0));
        let smaller: PerCpuArray<MapData, u64> = PerCpuArray::create(2, 0).unwrap();
        let to = RawMap::new(smaller.map().fd().as_fd(), 4, 8, true);
        assert_eq!(from.copy_into(&to).unwrap(), 2, "index 2 is past its end");
    }

    /// Fills a hash map with `n` entries (key i, value 3i) in one call.
    fn filled(n: u32) -> HashMap<MapData, u32, u64> {
        let map: HashMap<MapData, u32, u64> = HashMap::create(n + 16, 0).unwrap();
        let raw = RawMap::new(map.map().fd().as_fd(), 4, 8, false);
        let keys: Vec<u8> = (0..n).flat_map(u32::to_ne_bytes).collect();
        let values: Vec<u8> = (0..n)
            .flat_map(|k| (u64::from(k) * 3).to_ne_bytes())
            .collect();
        assert_eq!(raw.set_many(&keys, &values, 0).unwrap(), n as usize);
        map
    }

    /// Walks the map, deleting the odd keys as it goes; returns every key
    /// seen and checks each value.
    fn walk_deleting_odd_keys(raw: &RawMap<'_>) -> Vec<u32> {
        let mut seen = Vec::new();
        raw.for_each_chunk(|chunk| {
            for i in 0..chunk.len() {
                let key = u32::from_ne_bytes(chunk.key(i).try_into().unwrap());
                let value = u64::from_ne_bytes(chunk.value(i).try_into().unwrap());
                assert_eq!(value, u64::from(key) * 3);
                seen.push(key);
                if key % 2 == 1 {
                    assert!(raw.delete(chunk.key(i)).unwrap());
                }
            }
            Ok(ControlFlow::Continue(()))
        })
        .unwrap();
        seen.sort_unstable();
        seen
    }

    #[test]
    fn walks_see_every_entry_once_while_entries_are_deleted() {
        if !root() {
            eprintln!("skipped: creating maps needs root");
            return;
        }
        let n = 3 * CHUNK as u32 + 17;
        for batch_ops in [true, false] {
            let map = filled(n);
            let mut raw = RawMap::new(map.map().fd().as_fd(), 4, 8, false);
            if !batch_ops {
                raw = raw.without_batch_ops();
            }
            let seen = walk_deleting_odd_keys(&raw);
            assert_eq!(seen, (0..n).collect::<Vec<_>>(), "batch ops: {batch_ops}");
            let left: Vec<u32> = map.keys().map(Result::unwrap).collect();
            assert_eq!(left.len(), n as usize / 2 + 1, "batch ops: {batch_ops}");
            assert!(left.iter().all(|k| k % 2 == 0));
        }
    }

    #[test]
    fn a_walk_stops_when_told() {
        if !root() {
            eprintln!("skipped: creating maps needs root");
            return;
        }
        let map = filled(2 * CHUNK as u32);
        let raw = RawMap::new(map.map().fd().as_fd(), 4, 8, false);
        let mut chunks = 0;
        raw.for_each_chunk(|chunk| {
            assert!(!chunk.is_empty());
            chunks += 1;
            Ok(ControlFlow::Break(()))
        })
        .unwrap();
        assert_eq!(chunks, 1);
    }
}
