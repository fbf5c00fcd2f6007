//! What qubesd says about the domains, each fact asked once per command:
//! the list (names, classes, states) up front, properties and features
//! when first needed.

use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
};

use anyhow::{Result, anyhow};

use super::{
    admin::{Admin, Property, VmInfo},
    chain::Domains,
};

pub struct Graph<'a> {
    admin: &'a Admin,
    vms: BTreeMap<String, VmInfo>,
    properties: HashMap<(String, String), Property>,
    features: HashMap<String, Vec<String>>,
    values: HashMap<(String, String), Option<String>>,
    inherited: HashMap<(String, String), Option<String>>,
}

impl<'a> Graph<'a> {
    /// Starts with `admin.vm.List`.
    pub fn load(admin: &'a Admin) -> Result<Self> {
        let vms = admin
            .vm_list()?
            .into_iter()
            .map(|vm| (vm.name.clone(), vm))
            .collect();
        Ok(Graph {
            admin,
            vms,
            properties: HashMap::new(),
            features: HashMap::new(),
            values: HashMap::new(),
            inherited: HashMap::new(),
        })
    }

    pub fn admin(&self) -> &'a Admin {
        self.admin
    }

    /// Every domain but dom0, by name.
    pub fn qubes(&self) -> impl Iterator<Item = &VmInfo> {
        self.vms.values().filter(|vm| !vm.is_dom0())
    }

    pub fn info(&self, vm: &str) -> Option<&VmInfo> {
        self.vms.get(vm)
    }

    pub fn property(&mut self, vm: &str, name: &str) -> Result<&Property> {
        let key = (vm.to_string(), name.to_string());
        if !self.properties.contains_key(&key) {
            let value = self.admin.property(vm, name)?;
            self.properties.insert(key.clone(), value);
        }
        Ok(&self.properties[&key])
    }

    /// The names of the VM's features.
    pub fn features(&mut self, vm: &str) -> Result<&[String]> {
        if !self.features.contains_key(vm) {
            let names = self.admin.features(vm)?;
            self.features.insert(vm.to_string(), names);
        }
        Ok(&self.features[vm])
    }

    /// A feature's value; asked only when the VM's list has it, if the list
    /// was already read.
    pub fn feature(&mut self, vm: &str, name: &str) -> Result<Option<String>> {
        if let Some(names) = self.features.get(vm)
            && !names.iter().any(|n| n == name)
        {
            return Ok(None);
        }
        let key = (vm.to_string(), name.to_string());
        if !self.values.contains_key(&key) {
            let value = self.admin.feature(vm, name)?;
            self.values.insert(key.clone(), value);
        }
        Ok(self.values[&key].clone())
    }

    fn with_err<T>(
        &mut self,
        vm: &str,
        name: &str,
        read: impl Fn(&Property) -> Result<T, String>,
    ) -> Result<T> {
        let property = self.property(vm, name)?;
        read(property).map_err(|e| anyhow!("{name} of {vm}: {e}"))
    }
}

impl Domains for Graph<'_> {
    fn class(&mut self, vm: &str) -> Result<Option<String>> {
        Ok(self.vms.get(vm).map(|info| info.class.clone()))
    }

    fn netvm(&mut self, vm: &str) -> Result<Option<String>> {
        self.with_err(vm, "netvm", |p| Ok(p.value.clone()))
    }

    fn ip(&mut self, vm: &str) -> Result<Option<Ipv4Addr>> {
        self.with_err(vm, "ip", Property::ipv4)
    }

    fn provides_network(&mut self, vm: &str) -> Result<bool> {
        self.with_err(vm, "provides_network", Property::bool)
    }

    fn feature_with_template(&mut self, vm: &str, name: &str) -> Result<Option<String>> {
        let key = (vm.to_string(), name.to_string());
        if !self.inherited.contains_key(&key) {
            let value = self.admin.feature_with_template(vm, name)?;
            self.inherited.insert(key.clone(), value);
        }
        Ok(self.inherited[&key].clone())
    }
}
