//! A map read and written as bytes: carrying entries from a pinned map of
//! an older definition into its replacement, whose key and value types
//! this build knows only by their sizes.

use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd},
};

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;

/// The `bpf_attr` of the element commands.
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    pad: u32,
    key: u64,
    value_or_next_key: u64,
    flags: u64,
}

fn bpf(cmd: libc::c_long, attr: &mut ElemAttr) -> io::Result<()> {
    // SAFETY: attr is a valid bpf_attr prefix for the element commands, its
    // pointers point at buffers of the sizes the map was created with.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut ElemAttr,
            size_of::<ElemAttr>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

pub struct RawMap<'a> {
    fd: BorrowedFd<'a>,
    key_size: usize,
    /// Per-CPU maps hold one 8-byte aligned value per possible CPU.
    value_len: usize,
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
        }
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

    /// Every key, in the kernel's order.
    pub fn keys(&self) -> io::Result<Vec<Vec<u8>>> {
        let mut keys = Vec::new();
        let mut next = vec![0u8; self.key_size];
        let mut attr = ElemAttr {
            key: 0,
            ..self.attr(&[], next.as_mut_ptr())
        };
        loop {
            match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
                Ok(()) => {}
                Err(err) if err.raw_os_error() == Some(libc::ENOENT) => return Ok(keys),
                Err(err) => return Err(err),
            }
            keys.push(next.clone());
            let last = keys.last().expect("just pushed");
            attr = self.attr(last, next.as_mut_ptr());
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

    /// Copies every entry of `self` into `to` (same key and value sizes),
    /// until `to` is full. Returns how many were carried.
    pub fn copy_into(&self, to: &RawMap<'_>) -> io::Result<usize> {
        let mut carried = 0;
        for key in self.keys()? {
            let Some(value) = self.get(&key)? else {
                continue;
            };
            match to.set(&key, &value) {
                Ok(()) => carried += 1,
                // An array index past the new size, or a full hash map.
                Err(err) if matches!(err.raw_os_error(), Some(libc::E2BIG)) => {}
                Err(err) => return Err(err),
            }
        }
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
    }
}
