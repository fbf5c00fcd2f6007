//! The Admin API calls `qvm-forwarder` makes, with their replies parsed as
//! qubesadmin parses them (`qubesadmin/base.py`, `app.py`, `features.py`).
//! Every reply is checked: a malformed one is an error naming the call,
//! never a guess.

use std::{cell::RefCell, net::Ipv4Addr};

use anyhow::{Context as _, Result, bail};

use super::{admin_api::CallError, transport::Transport};

/// One line of `admin.vm.List`: `NAME class=CLASS state=STATE [uuid=…]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmInfo {
    pub name: String,
    pub class: String,
    pub state: String,
}

impl VmInfo {
    pub fn is_dom0(&self) -> bool {
        self.class == "AdminVM"
    }

    pub fn is_running(&self) -> bool {
        self.state == "Running"
    }
}

/// A property's value as `admin.vm.property.Get` gives it: `default=BOOL
/// type=TYPE VALUE`, VALUE empty for none.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Property {
    pub is_default: bool,
    pub kind: String,
    pub value: Option<String>,
}

impl Property {
    pub fn parse(reply: &str) -> Result<Property, String> {
        let mut fields = reply.splitn(3, ' ');
        let (Some(default), Some(kind), Some(value)) =
            (fields.next(), fields.next(), fields.next())
        else {
            return Err(format!("{reply:?} is not \"default=… type=… VALUE\""));
        };
        let is_default = match default {
            "default=True" => true,
            "default=False" => false,
            _ => return Err(format!("{reply:?}: {default:?} is not default=True|False")),
        };
        let kind = kind
            .strip_prefix("type=")
            .ok_or_else(|| format!("{reply:?}: {kind:?} is not type=…"))?;
        Ok(Property {
            is_default,
            kind: kind.into(),
            value: Some(value.to_string()).filter(|v| !v.is_empty()),
        })
    }

    pub fn bool(&self) -> Result<bool, String> {
        match (self.kind.as_str(), self.value.as_deref()) {
            ("bool", Some("True")) => Ok(true),
            ("bool", Some("False") | None) => Ok(false),
            _ => Err(format!(
                "{:?} of type {} is not a bool",
                self.value, self.kind
            )),
        }
    }

    pub fn ipv4(&self) -> Result<Option<Ipv4Addr>, String> {
        self.value
            .as_deref()
            .map(|v| {
                v.parse()
                    .map_err(|_| format!("{v:?} is not an IPv4 address"))
            })
            .transpose()
    }
}

/// A call as made, for `--verbose` and for counting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Call {
    pub dest: String,
    pub method: &'static str,
    pub arg: String,
}

/// qubesd, through one transport.
pub struct Admin {
    transport: Transport,
    log: RefCell<Vec<Call>>,
}

impl Admin {
    pub fn new(transport: Transport) -> Self {
        Admin {
            transport,
            log: RefCell::new(Vec::new()),
        }
    }

    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    /// The calls made so far.
    pub fn calls(&self) -> Vec<Call> {
        self.log.borrow().clone()
    }

    fn call(
        &self,
        dest: &str,
        method: &'static str,
        arg: &str,
        payload: &[u8],
    ) -> Result<Vec<u8>, CallError> {
        self.log.borrow_mut().push(Call {
            dest: dest.into(),
            method,
            arg: arg.into(),
        });
        self.transport.call(dest, method, arg, payload)
    }

    /// A call whose reply is text.
    fn text(&self, dest: &str, method: &'static str, arg: &str) -> Result<String, CallError> {
        let body = self.call(dest, method, arg, b"")?;
        String::from_utf8(body).map_err(|_| {
            CallError::Failed(format!(
                "{method}+{arg} on {dest}: a reply that is not UTF-8"
            ))
        })
    }

    /// Every domain, dom0 included.
    pub fn vm_list(&self) -> Result<Vec<VmInfo>> {
        let text = self.text("dom0", "admin.vm.List", "")?;
        text.lines()
            .map(|line| parse_vm_line(line).with_context(|| format!("admin.vm.List: {line:?}")))
            .collect()
    }

    pub fn property(&self, vm: &str, name: &str) -> Result<Property> {
        let text = self.text(vm, "admin.vm.property.Get", name)?;
        Property::parse(&text)
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("admin.vm.property.Get+{name} on {vm}"))
    }

    /// A feature's value; `None` when it is not set.
    pub fn feature(&self, vm: &str, name: &str) -> Result<Option<String>> {
        self.optional(self.text(vm, "admin.vm.feature.Get", name))
    }

    /// A feature's value on the VM or else its template's (and theirs),
    /// as `vm.features.check_with_template` reads it.
    pub fn feature_with_template(&self, vm: &str, name: &str) -> Result<Option<String>> {
        self.optional(self.text(vm, "admin.vm.feature.CheckWithTemplate", name))
    }

    fn optional(&self, reply: Result<String, CallError>) -> Result<Option<String>> {
        match reply {
            Ok(value) => Ok(Some(value)),
            Err(e) if e.is("QubesFeatureNotFoundError") => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    pub fn features(&self, vm: &str) -> Result<Vec<String>> {
        Ok(self
            .text(vm, "admin.vm.feature.List", "")?
            .lines()
            .map(String::from)
            .collect())
    }

    pub fn set_feature(&self, vm: &str, name: &str, value: &str) -> Result<()> {
        self.call(vm, "admin.vm.feature.Set", name, value.as_bytes())
            .with_context(|| format!("setting {name} on {vm}"))?;
        Ok(())
    }

    /// Removes a feature; one already gone is no error.
    pub fn remove_feature(&self, vm: &str, name: &str) -> Result<()> {
        match self.call(vm, "admin.vm.feature.Remove", name, b"") {
            Ok(_) => Ok(()),
            Err(e) if e.is("QubesFeatureNotFoundError") => Ok(()),
            Err(e) => Err(anyhow::Error::from(e).context(format!("removing {name} from {vm}"))),
        }
    }
}

fn parse_vm_line(line: &str) -> Result<VmInfo> {
    let mut words = line.split(' ');
    let name = words.next().unwrap_or_default();
    if !is_vm_name(name) {
        bail!("{name:?} is not a VM name");
    }
    let (mut class, mut state) = (None, None);
    for word in words {
        match word.split_once('=') {
            Some(("class", v)) => class = Some(v),
            Some(("state", v)) => state = Some(v),
            Some(_) => {}
            None => bail!("{word:?} is not KEY=VALUE"),
        }
    }
    match (class, state) {
        (Some(class), Some(state)) => Ok(VmInfo {
            name: name.into(),
            class: class.into(),
            state: state.into(),
        }),
        _ => bail!("no class= or state="),
    }
}

/// Qubes' rule for VM names (`qubes/vm/__init__.py`, `validate_name`): a
/// letter, then letters, digits, `_.-`, at most 31 characters.
pub fn is_vm_name(name: &str) -> bool {
    name.len() <= 31
        && name.as_bytes().first().is_some_and(u8::is_ascii_alphabetic)
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_parse_as_qubesd_serializes_them() {
        let p = Property::parse("default=True type=vm sys-firewall").unwrap();
        assert_eq!(
            p,
            Property {
                is_default: true,
                kind: "vm".into(),
                value: Some("sys-firewall".into())
            }
        );
        let none = Property::parse("default=False type=vm ").unwrap();
        assert_eq!(none.value, None);
        assert_eq!(
            Property::parse("default=True type=str 10.137.0.5")
                .unwrap()
                .ipv4(),
            Ok(Some(Ipv4Addr::new(10, 137, 0, 5)))
        );
        assert_eq!(
            Property::parse("default=False type=bool True")
                .unwrap()
                .bool(),
            Ok(true)
        );
        assert!(
            Property::parse("default=False type=str x")
                .unwrap()
                .bool()
                .is_err()
        );
        assert!(
            Property::parse("default=False type=str 10.0.0.300")
                .unwrap()
                .ipv4()
                .is_err()
        );
        for bad in [
            "",
            "default=True",
            "default=yes type=vm x",
            "default=True kind=vm x",
        ] {
            assert!(Property::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn vm_list_lines_of_4_2_and_4_3_parse() {
        assert_eq!(
            parse_vm_line("sys-net class=AppVM state=Running").unwrap(),
            VmInfo {
                name: "sys-net".into(),
                class: "AppVM".into(),
                state: "Running".into()
            }
        );
        let with_uuid = parse_vm_line(
            "dom0 class=AdminVM state=Running uuid=00000000-0000-0000-0000-000000000000",
        )
        .unwrap();
        assert!(with_uuid.is_dom0() && with_uuid.is_running());
        for bad in [
            "",
            "-x class=AppVM state=Halted",
            "app class=AppVM",
            "app class=AppVM state=Halted junk",
        ] {
            assert!(parse_vm_line(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn vm_names_follow_qubes_rules() {
        for good in ["app", "sys-net", "disp1234", "a_b.c"] {
            assert!(is_vm_name(good), "{good}");
        }
        for bad in ["", "1app", "-app", "a b", "a/b", &"x".repeat(32)] {
            assert!(!is_vm_name(bad), "{bad}");
        }
    }
}
