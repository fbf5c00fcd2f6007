//! `cargo xtask demo`: builds the release binaries (`forwarder`,
//! `qvm-forwarder`), the demo driver and the stand-in `qubesdb-*` tools,
//! then runs the driver, which owns (and removes) everything it creates.

use anyhow::{Result, bail};

use crate::{
    build::{build_driver, build_release},
    process::{command, is_root, run_cmd, step},
    setup::localsend_dir,
};

pub fn run() -> Result<()> {
    if !is_root() {
        bail!("the demo creates network namespaces and loads eBPF programs: run it as root");
    }
    build_release()?;
    build_driver("demo")?;
    build_driver("qubesdb-standin")?;
    step("running the demo");
    run_cmd(
        command("target/release/demo")
            .env("FORWARDER_BIN", "target/release/forwarder")
            .env("LOCALSENDD_DIR", localsend_dir()),
    )
}
