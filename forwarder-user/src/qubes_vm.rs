//! What a Qubes VM learns from dom0 outside QubesDB's `/vm-config/`: which
//! qvm-services are on, and where its persistent configuration lives.
//!
//! qubes-sysinit creates `/run/qubes-service/NAME` at boot for every
//! `service.NAME` feature set to 1 (qubes-core-agent-linux
//! `vm-systemd/qubes-sysinit.sh`). dom0 also writes a change to
//! `/qubes-service/NAME` in the running VM's QubesDB, but nothing in the VM
//! follows it: a service enabled while the VM runs takes effect at its next
//! start, as every qvm-service does.

use std::path::{Path, PathBuf};

/// Where qubes-sysinit marks the enabled qvm-services.
pub const SERVICE_DIR: &str = "/run/qubes-service";
/// The router's qvm-service, which `qvm-forwarder` enables.
pub const ROUTER_SERVICE: &str = "forwarder";
/// The exposed VM's qvm-service, which `qvm-forwarder` enables.
pub const INPUT_SERVICE: &str = "forwarder-input";
/// The dom0 features that turn those qvm-services on.
pub const ROUTER_SERVICE_FEATURE: &str = "service.forwarder";
pub const INPUT_SERVICE_FEATURE: &str = "service.forwarder-input";
/// The features the package requests in a template to say it can run
/// them (Qubes' `supported-service.` convention, qubes-core-admin
/// `doc/qubes-features.rst`).
pub const ROUTER_SUPPORTED_FEATURE: &str = "supported-service.forwarder";
pub const INPUT_SUPPORTED_FEATURE: &str = "supported-service.forwarder-input";
/// The configuration file a Qubes VM keeps across reboots.
pub const CONFIG_FILE: &str = "/rw/config/forwarder.toml";

/// Whether qvm-service `name` is on in this VM.
pub fn service_enabled(name: &str) -> bool {
    Path::new(SERVICE_DIR).join(name).exists()
}

/// What decides how `forwarder run` configures itself in a Qubes router.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouterVm {
    /// The `forwarder` qvm-service is on.
    pub service: bool,
    /// [`CONFIG_FILE`], when it exists.
    pub config_file: Option<PathBuf>,
}

impl RouterVm {
    /// This VM as it is now.
    pub fn detect() -> Self {
        let file = Path::new(CONFIG_FILE);
        RouterVm {
            service: service_enabled(ROUTER_SERVICE),
            config_file: file.exists().then(|| file.to_path_buf()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each feature names its qvm-service, in the form Qubes gives it.
    #[test]
    fn every_feature_names_its_service() {
        for (service, feature, supported) in [
            (
                ROUTER_SERVICE,
                ROUTER_SERVICE_FEATURE,
                ROUTER_SUPPORTED_FEATURE,
            ),
            (
                INPUT_SERVICE,
                INPUT_SERVICE_FEATURE,
                INPUT_SUPPORTED_FEATURE,
            ),
        ] {
            assert_eq!(feature, format!("service.{service}"));
            assert_eq!(supported, format!("supported-service.{service}"));
        }
    }
}
