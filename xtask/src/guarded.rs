//! A child process that must not outlive xtask (a VM, virtme-ng, the VM
//! tier's LAN peer): killed and reaped when dropped, and killed by the
//! kernel when xtask dies (PR_SET_PDEATHSIG).

use std::{
    io,
    ops::{Deref, DerefMut},
    os::unix::process::CommandExt as _,
    process::{Child, Command, ExitStatus},
    thread,
    time::{Duration, Instant},
};

pub struct Guarded(Child);

impl Guarded {
    pub fn spawn(cmd: &mut Command) -> io::Result<Self> {
        // SAFETY: prctl is async-signal-safe and only affects the calling
        // (child) process.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd.spawn().map(Guarded)
    }

    /// Waits for the child until `deadline`; `None` when it is still
    /// running then.
    pub fn wait_until(&mut self, deadline: Instant) -> io::Result<Option<ExitStatus>> {
        loop {
            if let Some(status) = self.0.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Deref for Guarded {
    type Target = Child;

    fn deref(&self) -> &Child {
        &self.0
    }
}

impl DerefMut for Guarded {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        // A child already reaped is not signalled again (std keeps its
        // status), so an owner may stop it earlier.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
