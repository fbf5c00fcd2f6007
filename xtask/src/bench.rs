//! `cargo xtask bench`: builds the release binary and the benchmark driver,
//! runs the driver, and with --update-docs refreshes docs/benchmarks.md
//! from a run whose every stage completed.

use anyhow::{Context as _, Result, bail};

use crate::{
    build::{build_driver, build_release},
    process::{command, is_root, run_cmd, step, workspace_root},
};

pub fn run(quick: bool, json: bool, update_docs: bool) -> Result<()> {
    if !is_root() {
        bail!("the benchmark creates network namespaces and loads eBPF programs: run it as root");
    }
    build_release()?;
    build_driver("bench")?;
    step("running the benchmark");
    let root = workspace_root();
    let out = root.join("target/bench");
    let mut bench = command(
        root.join("target/release/bench")
            .to_str()
            .unwrap_or("target/release/bench"),
    );
    bench
        .env("FORWARDER_BIN", root.join("target/release/forwarder"))
        .arg("--out")
        .arg(&out);
    if quick {
        bench.arg("--quick");
    }
    if json {
        bench.arg("--json");
    }
    run_cmd(&mut bench).with_context(|| {
        format!(
            "the benchmark did not complete: what it measured, and which stages failed, is in {}",
            out.display()
        )
    })?;
    if update_docs {
        std::fs::copy(out.join("benchmarks.md"), root.join("docs/benchmarks.md"))?;
        std::fs::copy(out.join("chart.svg"), root.join("docs/benchmarks.svg"))?;
        println!("    updated docs/benchmarks.md and docs/benchmarks.svg");
    }
    Ok(())
}
