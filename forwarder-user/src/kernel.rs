//! Facts about the running kernel that decide how the datapath is loaded
//! and attached: its version, the floor the datapath needs, and what the
//! self-test found it supports. Below both `datapath` and `selftest`,
//! which share them.

use std::fmt;

/// The oldest kernel the datapath is built for: `bpf_redirect_neigh` with a
/// next hop arrived in 5.10.
pub const FLOOR: (u32, u32) = (5, 10);
/// `bpf_fib_lookup` reports the route MTU from 5.12 on.
pub const MTU_RESULT_SINCE: (u32, u32) = (5, 12);
/// TCX links arrived in 6.6.
pub const TCX_SINCE: (u32, u32) = (6, 6);

/// The running kernel, as uname reports it.
#[derive(Clone, Debug)]
pub struct Kernel {
    pub release: String,
    pub version: (u32, u32),
}

impl Kernel {
    pub fn running() -> Self {
        // SAFETY: utsname is plain data; uname fills it.
        let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
        // SAFETY: uts is valid for writing.
        unsafe { libc::uname(&mut uts) };
        // SAFETY: uname NUL-terminates release.
        let release = unsafe { std::ffi::CStr::from_ptr(uts.release.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        let version = parse_version(&release).unwrap_or((0, 0));
        Kernel { release, version }
    }
}

impl fmt::Display for Kernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Linux {}", self.release)
    }
}

/// "6.1.0-28-amd64" -> (6, 1).
pub fn parse_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// What the self-test found the kernel to support.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Support {
    /// BPF_FIB_LOOKUP_SKIP_NEIGH (6.3+; some stable kernels have it).
    pub fib_skip_neigh: bool,
    /// The route MTU in the lookup's answer (5.12+).
    pub fib_mtu_result: bool,
}

impl Support {
    /// What the newest kernels support; what the object is compiled for.
    pub const NEWEST: Support = Support {
        fib_skip_neigh: true,
        fib_mtu_result: true,
    };

    /// The fallbacks in use, for the log.
    pub fn fallbacks(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if !self.fib_skip_neigh {
            out.push("lookups resolve neighbours (no BPF_FIB_LOOKUP_SKIP_NEIGH)");
        }
        if !self.fib_mtu_result {
            out.push("every lookup checks the packet length itself (no route MTU in the answer), so forwarded routes are not cached");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions_parse() {
        assert_eq!(parse_version("6.1.0-28-amd64"), Some((6, 1)));
        assert_eq!(parse_version("5.10.0-35-cloud-amd64"), Some((5, 10)));
        assert_eq!(parse_version("6.18.2"), Some((6, 18)));
        assert_eq!(parse_version("garbage"), None);
        assert!((5, 10) < (6, 1) && (5, 9) < FLOOR && (6, 12) >= MTU_RESULT_SINCE);
        assert!(FLOOR < MTU_RESULT_SINCE && MTU_RESULT_SINCE < TCX_SINCE);
    }
}
