//! Python packages the test set-up installs from PyPI with `pip --target`
//! into target/ (see xtask's setup).

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

/// The `pip --target` directory of `module`: $`env_var`, or
/// target/`default` beside the workspace.
pub fn install_dir(env_var: &str, default: &str, module: &str) -> Result<PathBuf> {
    let dir = match std::env::var_os(env_var) {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target")
            .join(default),
    };
    if !dir.join(module).exists() {
        bail!(
            "{module} is not installed in {}: run `cargo xtask setup`",
            dir.display()
        );
    }
    Ok(dir)
}
