//! The netvm chain of an exposed VM: every router between it and the LAN,
//! each with the address its forwards target.
//!
//! A router's target is the `ip` property of the VM one step down, never
//! its `visible_ip`. `visible_ip` is what a VM with the `net.fake-ip`
//! feature believes its address is; its netvm routes the real `ip` to the
//! VM's vif and translates it to the fake address in a namespace of its own
//! (qubes-core-agent-linux `vif-route-qubes`, `vif-qubes-nat.sh`). Without
//! the feature the two are the same.

use std::{fmt, net::Ipv4Addr};

use anyhow::Result;

/// What the chain needs to know about domains. `Ok(None)` where Qubes has
/// no value; `Err` where asking failed.
pub trait Domains {
    /// The domain's class (`AppVM`, `DispVM`, `AdminVM`…); `None` when no
    /// such domain exists.
    fn class(&mut self, vm: &str) -> Result<Option<String>>;
    fn netvm(&mut self, vm: &str) -> Result<Option<String>>;
    fn ip(&mut self, vm: &str) -> Result<Option<Ipv4Addr>>;
    fn provides_network(&mut self, vm: &str) -> Result<bool>;
    /// A feature of the VM or, unset there, of its template.
    fn feature_with_template(&mut self, vm: &str, name: &str) -> Result<Option<String>>;
}

/// The feature the forwarder package requests in a router's template.
pub const SUPPORTED_SERVICE: &str = crate::qubes_vm::ROUTER_SUPPORTED_FEATURE;
/// The same for the exposed VM's side, `forwarder input`.
pub const SUPPORTED_INPUT_SERVICE: &str = crate::qubes_vm::INPUT_SUPPORTED_FEATURE;

/// No chain is longer: a deeper one is a graph gone wrong.
pub const MAX_HOPS: usize = 16;

/// One router of a chain.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Hop {
    pub router: String,
    /// The VM one step down, which the router forwards to.
    pub below: String,
    /// `below`'s `ip`.
    pub target: Ipv4Addr,
    /// Whether the router's template announced the forwarder package.
    pub advertised: bool,
}

/// The routers from the VM's own netvm up to the one with no netvm.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Chain {
    pub vm: String,
    pub hops: Vec<Hop>,
}

impl Chain {
    /// `app <- sys-firewall <- sys-net`.
    pub fn path(&self) -> String {
        let mut path = self.vm.clone();
        for hop in &self.hops {
            path.push_str(" <- ");
            path.push_str(&hop.router);
        }
        path
    }
}

/// Why a VM cannot be exposed; each names the hop at fault.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    NoSuchVm(String),
    Dom0,
    NoNetvm(String),
    /// A netvm naming a domain that does not exist.
    Dangling {
        vm: String,
        netvm: String,
    },
    Loop(Vec<String>),
    TooLong(String),
    NoIp(String),
    CannotRoute {
        router: String,
        reason: String,
    },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::NoSuchVm(vm) => write!(f, "{vm}: no such qube"),
            Refusal::Dom0 => write!(f, "dom0 has no network and cannot be exposed"),
            Refusal::NoNetvm(vm) => write!(
                f,
                "{vm}: no netvm, so nothing can reach it (qvm-prefs {vm} netvm sys-firewall)"
            ),
            Refusal::Dangling { vm, netvm } => {
                write!(f, "{vm}: its netvm {netvm} does not exist")
            }
            Refusal::Loop(path) => write!(f, "a netvm loop: {}", path.join(" -> ")),
            Refusal::TooLong(vm) => write!(f, "{vm}: more than {MAX_HOPS} routers up its chain"),
            Refusal::NoIp(vm) => write!(
                f,
                "{vm}: no IPv4 address (ip property), so its netvm has nothing to forward to"
            ),
            Refusal::CannotRoute { router, reason } => {
                write!(f, "{router} cannot run the forwarder: {reason}")
            }
        }
    }
}

/// The chain of `vm`: `Ok(Err(_))` when Qubes' graph refuses it.
pub fn resolve(d: &mut impl Domains, vm: &str) -> Result<Result<Chain, Refusal>> {
    match d.class(vm)?.as_deref() {
        None => return Ok(Err(Refusal::NoSuchVm(vm.into()))),
        Some("AdminVM") => return Ok(Err(Refusal::Dom0)),
        Some(_) => {}
    }
    let mut visited = vec![vm.to_string()];
    let mut hops = Vec::new();
    let mut below = vm.to_string();
    while let Some(router) = d.netvm(&below)? {
        if visited.contains(&router) {
            visited.push(router);
            let start = visited
                .iter()
                .position(|v| *v == visited[visited.len() - 1]);
            return Ok(Err(Refusal::Loop(visited[start.unwrap_or(0)..].to_vec())));
        }
        if hops.len() == MAX_HOPS {
            return Ok(Err(Refusal::TooLong(vm.into())));
        }
        let class = match d.class(&router)? {
            None => {
                return Ok(Err(Refusal::Dangling {
                    vm: below,
                    netvm: router,
                }));
            }
            Some(class) => class,
        };
        let advertised = match check_router(d, &router, &class)? {
            Ok(advertised) => advertised,
            Err(reason) => return Ok(Err(Refusal::CannotRoute { router, reason })),
        };
        let Some(target) = d.ip(&below)? else {
            return Ok(Err(Refusal::NoIp(below)));
        };
        hops.push(Hop {
            router: router.clone(),
            below,
            target,
            advertised,
        });
        visited.push(router.clone());
        below = router;
    }
    if hops.is_empty() {
        return Ok(Err(Refusal::NoNetvm(vm.into())));
    }
    Ok(Ok(Chain {
        vm: vm.into(),
        hops,
    }))
}

/// Whether `router` can run the forwarder: `Ok(true)` when its template
/// announced the package, `Ok(false)` when it may (a Linux qube that has
/// not announced it: the package may not be installed yet, and the
/// features wait for it), `Err` when it cannot: dom0, a qube that does not
/// provide network, or one whose template reports another OS than Linux.
fn check_router(d: &mut impl Domains, router: &str, class: &str) -> Result<Result<bool, String>> {
    if class == "AdminVM" {
        return Ok(Err("it is dom0".into()));
    }
    if !d.provides_network(router)? {
        return Ok(Err("its provides_network property is False".into()));
    }
    if d.feature_with_template(router, SUPPORTED_SERVICE)?
        .as_deref()
        == Some("1")
    {
        return Ok(Ok(true));
    }
    match d.feature_with_template(router, "os")? {
        Some(os) if os != "Linux" => Ok(Err(format!(
            "its template reports os={os}; the forwarder runs on Linux"
        ))),
        _ => Ok(Ok(false)),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// A graph of domains, as qubesd would describe it.
    #[derive(Default)]
    struct Graph {
        vms: BTreeMap<String, Vm>,
        asked: Vec<String>,
    }

    #[derive(Clone, Default)]
    struct Vm {
        class: &'static str,
        netvm: Option<&'static str>,
        ip: Option<Ipv4Addr>,
        provides_network: bool,
        features: BTreeMap<&'static str, &'static str>,
        template: Option<&'static str>,
    }

    impl Graph {
        fn vm(
            &mut self,
            name: &str,
            class: &'static str,
            netvm: Option<&'static str>,
            ip: [u8; 4],
        ) -> &mut Vm {
            self.vms.insert(
                name.into(),
                Vm {
                    class,
                    netvm,
                    ip: netvm.map(|_| Ipv4Addr::from(ip)),
                    ..Vm::default()
                },
            );
            self.vms.get_mut(name).unwrap()
        }

        fn router(&mut self, name: &str, netvm: Option<&'static str>, ip: [u8; 4]) -> &mut Vm {
            let vm = self.vm(name, "AppVM", netvm, ip);
            vm.provides_network = true;
            vm.template = Some("debian-12");
            vm
        }

        /// sys-net <- sys-firewall <- app, the template announcing the
        /// package.
        fn standard() -> Graph {
            let mut g = Graph::default();
            g.vm("dom0", "AdminVM", None, [0; 4]);
            g.vm("debian-12", "TemplateVM", None, [0; 4])
                .features
                .extend([(SUPPORTED_SERVICE, "1"), ("os", "Linux")]);
            g.router("sys-net", None, [10, 137, 0, 5]);
            g.router("sys-firewall", Some("sys-net"), [10, 137, 0, 6]);
            g.vm("app", "AppVM", Some("sys-firewall"), [10, 137, 0, 12]);
            g
        }

        fn get(&mut self, vm: &str, what: &str) -> Result<&Vm> {
            self.asked.push(format!("{vm}.{what}"));
            self.vms
                .get(vm)
                .ok_or_else(|| anyhow::anyhow!("no such domain {vm}"))
        }
    }

    impl Domains for Graph {
        fn class(&mut self, vm: &str) -> Result<Option<String>> {
            self.asked.push(format!("{vm}.class"));
            Ok(self.vms.get(vm).map(|v| v.class.to_string()))
        }
        fn netvm(&mut self, vm: &str) -> Result<Option<String>> {
            Ok(self.get(vm, "netvm")?.netvm.map(String::from))
        }
        fn ip(&mut self, vm: &str) -> Result<Option<Ipv4Addr>> {
            Ok(self.get(vm, "ip")?.ip)
        }
        fn provides_network(&mut self, vm: &str) -> Result<bool> {
            Ok(self.get(vm, "provides_network")?.provides_network)
        }
        fn feature_with_template(&mut self, vm: &str, name: &str) -> Result<Option<String>> {
            let mut at = self.get(vm, name)?.clone();
            loop {
                if let Some(v) = at.features.get(name) {
                    return Ok(Some(v.to_string()));
                }
                match at.template {
                    Some(t) => at = self.vms[t].clone(),
                    None => return Ok(None),
                }
            }
        }
    }

    fn hops(chain: &Chain) -> Vec<(&str, &str, String)> {
        chain
            .hops
            .iter()
            .map(|h| (h.router.as_str(), h.below.as_str(), h.target.to_string()))
            .collect()
    }

    #[test]
    fn direct_netvm() {
        let mut g = Graph::standard();
        g.vm("work", "AppVM", Some("sys-net"), [10, 137, 0, 20]);
        let chain = resolve(&mut g, "work").unwrap().unwrap();
        assert_eq!(hops(&chain), [("sys-net", "work", "10.137.0.20".into())]);
        assert!(chain.hops[0].advertised);
        assert_eq!(chain.path(), "work <- sys-net");
    }

    #[test]
    fn sys_firewall_then_sys_net() {
        let mut g = Graph::standard();
        let chain = resolve(&mut g, "app").unwrap().unwrap();
        assert_eq!(
            hops(&chain),
            [
                ("sys-firewall", "app", "10.137.0.12".into()),
                ("sys-net", "sys-firewall", "10.137.0.6".into())
            ]
        );
        assert_eq!(chain.path(), "app <- sys-firewall <- sys-net");
        // The top router's own address is never needed.
        assert!(
            !g.asked.contains(&"sys-net.ip".to_string()),
            "{:?}",
            g.asked
        );
    }

    #[test]
    fn a_vpn_chain_of_three_routers() {
        let mut g = Graph::standard();
        g.router("sys-vpn", Some("sys-firewall"), [10, 137, 0, 30]);
        g.vm("app", "AppVM", Some("sys-vpn"), [10, 137, 0, 12]);
        let chain = resolve(&mut g, "app").unwrap().unwrap();
        assert_eq!(
            hops(&chain),
            [
                ("sys-vpn", "app", "10.137.0.12".into()),
                ("sys-firewall", "sys-vpn", "10.137.0.30".into()),
                ("sys-net", "sys-firewall", "10.137.0.6".into())
            ]
        );
    }

    #[test]
    fn a_fake_ip_is_not_the_target() {
        let mut g = Graph::standard();
        g.vms
            .get_mut("app")
            .unwrap()
            .features
            .insert("net.fake-ip", "192.168.1.128");
        g.vms
            .get_mut("sys-firewall")
            .unwrap()
            .features
            .insert("net.fake-ip", "192.168.1.1");
        let chain = resolve(&mut g, "app").unwrap().unwrap();
        assert_eq!(
            hops(&chain),
            [
                ("sys-firewall", "app", "10.137.0.12".into()),
                ("sys-net", "sys-firewall", "10.137.0.6".into())
            ]
        );
    }

    #[test]
    fn a_loop_is_refused_naming_it() {
        let mut g = Graph::standard();
        g.router("sys-a", Some("sys-b"), [10, 137, 0, 40]);
        g.router("sys-b", Some("sys-a"), [10, 137, 0, 41]);
        g.vm("app", "AppVM", Some("sys-a"), [10, 137, 0, 12]);
        let refusal = resolve(&mut g, "app").unwrap().unwrap_err();
        assert_eq!(
            refusal,
            Refusal::Loop(vec!["sys-a".into(), "sys-b".into(), "sys-a".into()])
        );
        assert_eq!(refusal.to_string(), "a netvm loop: sys-a -> sys-b -> sys-a");
        g.router("sys-self", Some("sys-self"), [10, 137, 0, 42]);
        g.vm("app", "AppVM", Some("sys-self"), [10, 137, 0, 12]);
        assert!(matches!(
            resolve(&mut g, "app").unwrap(),
            Err(Refusal::Loop(_))
        ));
    }

    #[test]
    fn no_netvm_and_other_refusals_name_the_hop() {
        let mut g = Graph::standard();
        g.vm("offline", "AppVM", None, [0; 4]);
        let refusal = resolve(&mut g, "offline").unwrap().unwrap_err();
        assert_eq!(refusal, Refusal::NoNetvm("offline".into()));
        assert!(refusal.to_string().contains("qvm-prefs offline netvm"));

        assert_eq!(
            resolve(&mut g, "nope").unwrap(),
            Err(Refusal::NoSuchVm("nope".into()))
        );
        assert_eq!(resolve(&mut g, "dom0").unwrap(), Err(Refusal::Dom0));

        g.vm("orphan", "AppVM", Some("sys-gone"), [10, 137, 0, 50]);
        assert_eq!(
            resolve(&mut g, "orphan").unwrap(),
            Err(Refusal::Dangling {
                vm: "orphan".into(),
                netvm: "sys-gone".into()
            })
        );

        g.vm("app", "AppVM", Some("sys-firewall"), [10, 137, 0, 12])
            .ip = None;
        assert_eq!(
            resolve(&mut g, "app").unwrap(),
            Err(Refusal::NoIp("app".into()))
        );
    }

    #[test]
    fn routers_that_cannot_run_the_forwarder_are_refused() {
        let mut g = Graph::standard();
        g.vms.get_mut("sys-firewall").unwrap().provides_network = false;
        let refusal = resolve(&mut g, "app").unwrap().unwrap_err();
        assert_eq!(
            refusal.to_string(),
            "sys-firewall cannot run the forwarder: its provides_network property is False"
        );

        let mut g = Graph::standard();
        g.vm("win-template", "TemplateVM", None, [0; 4])
            .features
            .insert("os", "Windows");
        g.router("sys-win", Some("sys-net"), [10, 137, 0, 60])
            .template = Some("win-template");
        g.vm("app", "AppVM", Some("sys-win"), [10, 137, 0, 12]);
        let refusal = resolve(&mut g, "app").unwrap().unwrap_err();
        assert!(
            refusal
                .to_string()
                .contains("sys-win cannot run the forwarder: its template reports os=Windows"),
            "{refusal}"
        );

        let mut g = Graph::standard();
        g.vm("dom0", "AdminVM", None, [0; 4]).provides_network = true;
        g.vm("app", "AppVM", Some("dom0"), [10, 137, 0, 12]);
        assert_eq!(
            resolve(&mut g, "app").unwrap().unwrap_err().to_string(),
            "dom0 cannot run the forwarder: it is dom0"
        );
    }

    #[test]
    fn a_router_without_the_package_announced_is_configured_and_flagged() {
        let mut g = Graph::standard();
        g.vm("fedora-40", "TemplateVM", None, [0; 4])
            .features
            .insert("os", "Linux");
        g.router("sys-firewall", Some("sys-net"), [10, 137, 0, 6])
            .template = Some("fedora-40");
        let chain = resolve(&mut g, "app").unwrap().unwrap();
        assert_eq!(
            chain.hops.iter().map(|h| h.advertised).collect::<Vec<_>>(),
            [false, true]
        );
    }

    #[test]
    fn a_disposable_router() {
        let mut g = Graph::standard();
        g.vm("default-dvm", "AppVM", None, [0; 4]).template = Some("debian-12");
        let net = g.router("sys-net", None, [10, 138, 12, 34]);
        net.class = "DispVM";
        net.template = Some("default-dvm");
        let fw = g.router("sys-firewall", Some("sys-net"), [10, 138, 20, 1]);
        fw.class = "DispVM";
        fw.template = Some("default-dvm");
        let chain = resolve(&mut g, "app").unwrap().unwrap();
        assert_eq!(
            hops(&chain),
            [
                ("sys-firewall", "app", "10.137.0.12".into()),
                ("sys-net", "sys-firewall", "10.138.20.1".into())
            ]
        );
        assert!(chain.hops.iter().all(|h| h.advertised));
    }

    #[test]
    fn a_clone_gets_its_own_ip() {
        let mut g = Graph::standard();
        let original = resolve(&mut g, "app").unwrap().unwrap();
        g.vm("app-clone", "AppVM", Some("sys-firewall"), [10, 137, 0, 13]);
        let clone = resolve(&mut g, "app-clone").unwrap().unwrap();
        assert_eq!(clone.hops[0].target, Ipv4Addr::new(10, 137, 0, 13));
        assert_eq!(clone.hops[1], original.hops[1]);
        assert_eq!(resolve(&mut g, "app").unwrap().unwrap(), original);
    }
}
