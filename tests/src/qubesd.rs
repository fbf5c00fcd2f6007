//! A stand-in qubesd on a Unix socket, with qubesd's framing written from
//! its source (qubes-core-admin `qubes/api/__init__.py`,
//! `QubesDaemonProtocol`), not from the client's: a request is
//! `METHOD+ARG SOURCE name DEST` NUL, the payload, EOF; a reply `0` NUL
//! body, or `2` NUL type NUL traceback NUL message NUL; `admin.Events`
//! streams `1` NUL subject NUL event NUL (key NUL value NUL)* NUL, starting
//! with `connection-established`.
//!
//! It answers in one of two ways:
//! - from a graph of domains with properties and features, serving the
//!   calls `qvm-forwarder` makes with qubesd's checks and reply formats
//!   (`qubes/api/admin.py`), emitting events for every change, and
//!   exporting each running VM's `vm-config.*` features to its stand-in
//!   QubesDB as `/vm-config/*`, as `qubes/ext/vm_config.py` does;
//! - from a table of expected calls and their replies, as qubesadmin's
//!   tests do (`expected_calls`): any other call is recorded as unexpected
//!   and refused.
//!
//! Every call is recorded. What stays untested here: qubesd's own code,
//! qrexec and its policy, the real QubesDB daemon and vchan.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    os::unix::net::{UnixListener, UnixStream},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
};

use anyhow::{Context as _, Result};

use crate::qubesdb_store::{self, Entries};

/// qubesd's own limit on a request.
const MAX_REQUEST: usize = 65536;
/// QubesDB's limits (qubes-core-qubesdb `include/qubesdb.h`).
const QDB_MAX_PATH: usize = 64;
const QDB_MAX_DATA: usize = 3072;

/// A call as the stand-in received it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Call {
    pub dest: String,
    pub method: String,
    pub arg: String,
    pub payload: Vec<u8>,
}

impl Call {
    pub fn new(dest: &str, method: &str, arg: &str, payload: &[u8]) -> Self {
        Call {
            dest: dest.into(),
            method: method.into(),
            arg: arg.into(),
            payload: payload.to_vec(),
        }
    }
}

/// A property as qubesd serializes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Property {
    /// `vm`, `bool`, `int`, `str` or `label`.
    pub kind: &'static str,
    pub value: Option<String>,
    pub is_default: bool,
}

impl Property {
    pub fn vm(value: Option<&str>) -> Self {
        Property {
            kind: "vm",
            value: value.map(String::from),
            is_default: false,
        }
    }

    pub fn string(value: Option<&str>) -> Self {
        Property {
            kind: "str",
            value: value.map(String::from),
            is_default: true,
        }
    }

    pub fn bool(value: bool) -> Self {
        Property {
            kind: "bool",
            value: Some(if value { "True" } else { "False" }.into()),
            is_default: !value,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Domain {
    pub class: String,
    pub running: bool,
    pub properties: BTreeMap<String, Property>,
    pub features: BTreeMap<String, String>,
}

impl Domain {
    pub fn new(class: &str) -> Self {
        Domain {
            class: class.into(),
            running: false,
            properties: BTreeMap::new(),
            features: BTreeMap::new(),
        }
    }

    pub fn with_property(mut self, name: &str, property: Property) -> Self {
        self.properties.insert(name.into(), property);
        self
    }

    pub fn with_feature(mut self, name: &str, value: &str) -> Self {
        self.features.insert(name.into(), value.into());
        self
    }

    /// A template announcing the forwarder package (router and input
    /// side), as its post-install script's `qvm-features-request` makes it.
    pub fn template() -> Self {
        Domain::new("TemplateVM")
            .with_property("netvm", Property::vm(None))
            .with_property("provides_network", Property::bool(false))
            .with_property("ip", Property::string(None))
            .with_feature("os", "Linux")
            .with_feature("supported-service.forwarder", "1")
            .with_feature("supported-service.forwarder-input", "1")
    }

    /// A template-based qube behind `netvm` with address `ip`.
    pub fn app(template: &str, netvm: Option<&str>, ip: Option<&str>) -> Self {
        Domain::new("AppVM")
            .with_property("template", Property::vm(Some(template)))
            .with_property("netvm", Property::vm(netvm))
            .with_property("ip", Property::string(ip))
            .with_property("provides_network", Property::bool(false))
            .with_property("template_for_dispvms", Property::bool(false))
    }

    /// A router: provides network.
    pub fn router(template: &str, netvm: Option<&str>, ip: &str) -> Self {
        Domain::app(template, netvm, Some(ip))
            .with_property("provides_network", Property::bool(true))
    }

    pub fn running(mut self) -> Self {
        self.running = true;
        self
    }
}

/// dom0, a template, sys-net, sys-firewall and app, as a fresh Qubes 4.2
/// install has them (addresses from qid: 10.137.0.QID), all running.
pub fn standard_graph() -> BTreeMap<String, Domain> {
    let mut g = BTreeMap::new();
    g.insert("dom0".into(), Domain::new("AdminVM").running());
    g.insert("debian-12".into(), Domain::template());
    g.insert(
        "sys-net".into(),
        Domain::router("debian-12", None, "10.137.0.5").running(),
    );
    g.insert(
        "sys-firewall".into(),
        Domain::router("debian-12", Some("sys-net"), "10.137.0.6").running(),
    );
    g.insert(
        "app".into(),
        Domain::app("debian-12", Some("sys-firewall"), Some("10.137.0.12")).running(),
    );
    g
}

/// One expected call and its reply, for table mode.
struct Expected {
    call: Call,
    reply: Vec<u8>,
    called: bool,
}

enum Mode {
    Graph(BTreeMap<String, Domain>),
    Table(Vec<Expected>),
}

struct State {
    mode: Mode,
    calls: Vec<Call>,
    unexpected: Vec<Call>,
    subscribers: Vec<UnixStream>,
    qubesdb: PathBuf,
}

pub struct Qubesd {
    dir: PathBuf,
    socket: PathBuf,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Qubesd {
    /// Serves `domains`; the running ones get their QubesDB.
    pub fn graph(label: &str, domains: BTreeMap<String, Domain>) -> Result<Self> {
        let server = Self::start(label, Mode::Graph(BTreeMap::new()))?;
        {
            let mut state = server.lock();
            for (name, domain) in &domains {
                if domain.running {
                    export_all(&state.qubesdb, name, domain)?;
                }
            }
            state.mode = Mode::Graph(domains);
        }
        Ok(server)
    }

    /// Serves exactly `expected`: each `(call, reply)` as often as called.
    pub fn table(label: &str, expected: Vec<(Call, Vec<u8>)>) -> Result<Self> {
        let expected = expected
            .into_iter()
            .map(|(call, reply)| Expected {
                call,
                reply,
                called: false,
            })
            .collect();
        Self::start(label, Mode::Table(expected))
    }

    fn start(label: &str, mode: Mode) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("fwd-qubesd-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("qubesdb"))
            .with_context(|| format!("creating {}", dir.display()))?;
        let socket = dir.join("qubesd.sock");
        let listener =
            UnixListener::bind(&socket).with_context(|| format!("binding {}", socket.display()))?;
        let state = Arc::new(Mutex::new(State {
            mode,
            calls: Vec::new(),
            unexpected: Vec::new(),
            subscribers: Vec::new(),
            qubesdb: dir.join("qubesdb"),
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let state = state.clone();
            let stop = stop.clone();
            thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(stream) = stream else { continue };
                    let state = state.clone();
                    thread::spawn(move || serve(stream, &state));
                }
            })
        };
        Ok(Qubesd {
            dir,
            socket,
            state,
            stop,
            thread: Some(thread),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Where the running VMs' stand-in QubesDBs are.
    pub fn qubesdb_dir(&self) -> PathBuf {
        self.dir.join("qubesdb")
    }

    pub fn calls(&self) -> Vec<Call> {
        self.lock().calls.clone()
    }

    pub fn clear_calls(&self) {
        self.lock().calls.clear();
    }

    /// Table mode: calls no entry matched.
    pub fn unexpected(&self) -> Vec<Call> {
        self.lock().unexpected.clone()
    }

    /// Table mode: entries never called.
    pub fn uncalled(&self) -> Vec<Call> {
        match &self.lock().mode {
            Mode::Table(expected) => expected
                .iter()
                .filter(|e| !e.called)
                .map(|e| e.call.clone())
                .collect(),
            Mode::Graph(_) => Vec::new(),
        }
    }

    /// Graph mode: a domain as it is now.
    pub fn domain(&self, name: &str) -> Option<Domain> {
        match &self.lock().mode {
            Mode::Graph(domains) => domains.get(name).cloned(),
            Mode::Table(_) => None,
        }
    }

    /// Graph mode: the features of `vm` whose names start with `prefix`.
    pub fn features(&self, vm: &str, prefix: &str) -> BTreeMap<String, String> {
        self.domain(vm)
            .map(|d| {
                d.features
                    .into_iter()
                    .filter(|(k, _)| k.starts_with(prefix))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn change(&self, apply: impl FnOnce(&mut BTreeMap<String, Domain>, &Path) -> Vec<Event>) {
        let mut state = self.lock();
        let qubesdb = state.qubesdb.clone();
        let events = match &mut state.mode {
            Mode::Graph(domains) => apply(domains, &qubesdb),
            Mode::Table(_) => Vec::new(),
        };
        for event in events {
            broadcast(&mut state, &event);
        }
    }

    /// `qvm-prefs VM NAME VALUE`: `property-set:NAME`.
    pub fn set_property(&self, vm: &str, name: &str, value: Option<&str>) {
        self.change(|domains, _| {
            let domain = domains.get_mut(vm).expect("a known domain");
            let property = domain.properties.get_mut(name).expect("a known property");
            let old = property.value.clone().unwrap_or_default();
            property.value = value.map(String::from);
            property.is_default = false;
            vec![Event::new(
                Some(vm),
                &format!("property-set:{name}"),
                &[
                    ("name", name),
                    ("newvalue", value.unwrap_or("")),
                    ("oldvalue", &old),
                ],
            )]
        });
    }

    /// `qvm-clone SRC DST`: properties and features copied (qubesadmin's
    /// `clone_vm`), a new address, the clone halted; `domain-add`.
    pub fn clone_domain(&self, src: &str, dst: &str, ip: &str) {
        self.change(|domains, _| {
            let mut clone = domains.get(src).expect("a known domain").clone();
            clone.running = false;
            clone
                .properties
                .insert("ip".into(), Property::string(Some(ip)));
            domains.insert(dst.into(), clone);
            vec![Event::new(None, "domain-add", &[("vm", dst)])]
        });
    }

    /// `qvm-remove VM`: `domain-delete`.
    pub fn remove_domain(&self, vm: &str) {
        self.change(|domains, qubesdb| {
            domains.remove(vm);
            let _ = qubesdb_store::remove(qubesdb, vm);
            vec![Event::new(None, "domain-delete", &[("vm", vm)])]
        });
    }

    /// `qvm-start VM`: its QubesDB gets every `vm-config.*` feature, as
    /// vm_config.py's `domain-qdb-create` handler writes them.
    pub fn start_domain(&self, vm: &str) {
        self.change(|domains, qubesdb| {
            let domain = domains.get_mut(vm).expect("a known domain");
            domain.running = true;
            export_all(qubesdb, vm, domain).expect("writing the stand-in QubesDB");
            vec![Event::new(Some(vm), "domain-start", &[])]
        });
    }

    /// `qvm-shutdown VM`: its QubesDB is gone.
    pub fn shutdown_domain(&self, vm: &str) {
        self.change(|domains, qubesdb| {
            if let Some(domain) = domains.get_mut(vm) {
                domain.running = false;
            }
            let _ = qubesdb_store::remove(qubesdb, vm);
            vec![Event::new(Some(vm), "domain-shutdown", &[])]
        });
    }
}

impl Drop for Qubesd {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = UnixStream::connect(&self.socket);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        for subscriber in self.lock().subscribers.drain(..) {
            let _ = subscriber.shutdown(std::net::Shutdown::Both);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct Event {
    subject: Option<String>,
    name: String,
    kwargs: Vec<(String, String)>,
}

impl Event {
    fn new(subject: Option<&str>, name: &str, kwargs: &[(&str, &str)]) -> Self {
        Event {
            subject: subject.map(String::from),
            name: name.into(),
            kwargs: kwargs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    /// qubesd's `send_event`.
    fn frame(&self) -> Vec<u8> {
        let mut data = vec![0x31, 0];
        data.extend_from_slice(self.subject.as_deref().unwrap_or("").as_bytes());
        data.push(0);
        data.extend_from_slice(self.name.as_bytes());
        data.push(0);
        for (k, v) in &self.kwargs {
            data.extend_from_slice(k.as_bytes());
            data.push(0);
            data.extend_from_slice(v.as_bytes());
            data.push(0);
        }
        data.push(0);
        data
    }
}

fn broadcast(state: &mut State, event: &Event) {
    let frame = event.frame();
    state
        .subscribers
        .retain_mut(|s| s.write_all(&frame).is_ok());
}

/// qubesd's `send_response`.
fn ok(body: &str) -> Vec<u8> {
    let mut reply = vec![0x30, 0];
    reply.extend_from_slice(body.as_bytes());
    reply
}

/// qubesd's `send_exception`, without a traceback.
pub fn exception(kind: &str, message: &str) -> Vec<u8> {
    let mut reply = vec![0x32, 0];
    for field in [kind, "", message] {
        reply.extend_from_slice(field.as_bytes());
        reply.push(0);
    }
    reply
}

/// A success reply with `body`, for tables.
pub fn reply(body: &str) -> Vec<u8> {
    ok(body)
}

/// `eof_received`: the header's four fields, split as qubesd splits them.
fn parse(bytes: &[u8]) -> Option<(Call, String)> {
    let nul = bytes.iter().position(|b| *b == 0)?;
    let header = std::str::from_utf8(&bytes[..nul]).ok()?;
    let mut fields = header.splitn(4, ' ');
    let (meth_arg, src, dest_type, dest) = (
        fields.next()?,
        fields.next()?,
        fields.next()?,
        fields.next()?,
    );
    let (dest_type, dest) = if dest_type == "keyword" && dest == "adminvm" {
        ("name", "dom0")
    } else {
        (dest_type, dest)
    };
    if dest_type != "name" {
        return None;
    }
    let (method, arg) = meth_arg.split_once('+').unwrap_or((meth_arg, ""));
    Some((Call::new(dest, method, arg, &bytes[nul + 1..]), src.into()))
}

fn serve(mut stream: UnixStream, state: &Mutex<State>) {
    let mut request = Vec::new();
    if (&mut stream)
        .take(MAX_REQUEST as u64 + 1)
        .read_to_end(&mut request)
        .is_err()
        || request.len() > MAX_REQUEST
    {
        return;
    }
    // A framing error: qubesd aborts the connection without a word.
    let Some((call, _source)) = parse(&request) else {
        return;
    };
    let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
    state.calls.push(call.clone());
    let reply = match &mut state.mode {
        Mode::Table(expected) => match expected.iter_mut().find(|e| e.call == call) {
            Some(e) => {
                e.called = true;
                Some(e.reply.clone())
            }
            None => {
                state.unexpected.push(call);
                Some(exception("ProtocolError", "unexpected call"))
            }
        },
        Mode::Graph(_) if call.method == "admin.Events" => {
            let established = Event::new(None, "connection-established", &[]);
            if let Ok(subscriber) = stream.try_clone()
                && subscriber
                    .set_write_timeout(Some(std::time::Duration::from_secs(1)))
                    .is_ok()
                && stream.write_all(&established.frame()).is_ok()
            {
                state.subscribers.push(subscriber);
            }
            return;
        }
        Mode::Graph(_) => {
            let (reply, events) = answer(&mut state, &call);
            for event in events {
                broadcast(&mut state, &event);
            }
            reply
        }
    };
    drop(state);
    // `None`: an exception outside QubesException, which qubesd logs and
    // answers by closing the connection.
    if let Some(reply) = reply {
        let _ = stream.write_all(&reply);
    }
    let _ = stream.shutdown(std::net::Shutdown::Write);
}

/// A graph-mode call: its reply and the events it fires.
fn answer(state: &mut State, call: &Call) -> (Option<Vec<u8>>, Vec<Event>) {
    let qubesdb = state.qubesdb.clone();
    let Mode::Graph(domains) = &mut state.mode else {
        unreachable!("graph mode")
    };
    let Some(domain) = domains.get(&call.dest) else {
        let message = format!("No such domain: '{}'", call.dest);
        return (
            Some(exception("QubesVMNotFoundError", &message)),
            Vec::new(),
        );
    };
    let not_found = |vm: &str, feature: &str| {
        exception(
            "QubesFeatureNotFoundError",
            &format!("Feature not set for domain {vm}: {feature}"),
        )
    };
    let reply = match call.method.as_str() {
        "admin.vm.List" if call.dest == "dom0" => ok(&domains
            .iter()
            .map(|(name, d)| {
                let state = if d.running { "Running" } else { "Halted" };
                format!("{name} class={} state={state}\n", d.class)
            })
            .collect::<String>()),
        "admin.vm.property.Get" => match domain.properties.get(&call.arg) {
            Some(p) => ok(&format!(
                "default={} type={} {}",
                if p.is_default { "True" } else { "False" },
                p.kind,
                p.value.as_deref().unwrap_or("")
            )),
            None => exception(
                "QubesNoSuchPropertyError",
                &format!("Invalid property '{}' of {}", call.arg, call.dest),
            ),
        },
        "admin.vm.feature.List" => ok(&domain
            .features
            .keys()
            .map(|k| format!("{k}\n"))
            .collect::<String>()),
        "admin.vm.feature.Get" => match domain.features.get(&call.arg) {
            Some(value) => ok(value),
            None => not_found(&call.dest, &call.arg),
        },
        "admin.vm.feature.CheckWithTemplate" => {
            let mut at = Some(call.dest.clone());
            let mut found = None;
            while let Some(vm) = at {
                let Some(d) = domains.get(&vm) else { break };
                if let Some(value) = d.features.get(&call.arg) {
                    found = Some(value.clone());
                    break;
                }
                at = d.properties.get("template").and_then(|p| p.value.clone());
            }
            match found {
                Some(value) => ok(&value),
                None => not_found(&call.dest, &call.arg),
            }
        }
        "admin.vm.feature.Set" => return set_feature(domains, &qubesdb, call),
        "admin.vm.feature.Remove" => {
            let domain = domains.get_mut(&call.dest).expect("checked above");
            if domain.features.remove(&call.arg).is_none() {
                not_found(&call.dest, &call.arg)
            } else {
                if domain.running && call.arg.starts_with("vm-config.") {
                    export_all(&qubesdb, &call.dest, domain).expect("writing the stand-in QubesDB");
                }
                let event = Event::new(
                    Some(&call.dest),
                    &format!("domain-feature-delete:{}", call.arg),
                    &[("feature", &call.arg)],
                );
                return (Some(ok("")), vec![event]);
            }
        }
        _ => exception(
            "ProtocolError",
            &format!("no such method: {:?}", call.method),
        ),
    };
    (Some(reply), Vec::new())
}

/// `admin.vm.feature.Set` with qubesd's checks (`qubes/api/admin.py`) and
/// vm_config.py's handler.
fn set_feature(
    domains: &mut BTreeMap<String, Domain>,
    qubesdb: &Path,
    call: &Call,
) -> (Option<Vec<u8>>, Vec<Event>) {
    let Ok(value) = std::str::from_utf8(&call.payload).map(String::from) else {
        return (
            Some(exception(
                "ProtocolError",
                "Feature value contains non-ASCII characters",
            )),
            Vec::new(),
        );
    };
    let name_ok = !call.arg.is_empty()
        && call
            .arg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if !name_ok {
        let reply = exception("ProtocolError", "feature name contains illegal characters");
        return (Some(reply), Vec::new());
    }
    if !value.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
        let message = format!("{} value contains illegal characters", call.arg);
        return (Some(exception("ProtocolError", &message)), Vec::new());
    }
    let domain = domains.get_mut(&call.dest).expect("checked by the caller");
    let old = domain.features.insert(call.arg.clone(), value.clone());
    let mut kwargs = vec![("feature", call.arg.as_str()), ("value", value.as_str())];
    if let Some(old) = &old {
        kwargs.push(("oldvalue", old));
    }
    let event = Event::new(
        Some(&call.dest),
        &format!("domain-feature-set:{}", call.arg),
        &kwargs,
    );
    // The feature is set before vm_config.py's handler runs, and stays
    // set when the handler raises.
    if let Some(config) = call.arg.strip_prefix("vm-config.") {
        if config.len() > QDB_MAX_PATH - 1 - "/vm-config/".len()
            || !config.as_bytes()[0].is_ascii_alphabetic()
        {
            let reply = exception("QubesValueError", "VM config name must not exceed 46 bytes");
            return (Some(reply), vec![event]);
        }
        if domain.running {
            if value.len() > QDB_MAX_DATA {
                // qubesdb's write fails, an exception qubesd does not
                // answer: the connection just closes.
                return (None, vec![event]);
            }
            export_all(qubesdb, &call.dest, domain).expect("writing the stand-in QubesDB");
        }
    }
    (Some(ok("")), vec![event])
}

/// The VM's whole `/vm-config/` tree from its features.
fn export_all(qubesdb: &Path, vm: &str, domain: &Domain) -> std::io::Result<()> {
    let entries: Entries = domain
        .features
        .iter()
        .filter_map(|(k, v)| {
            let config = k.strip_prefix("vm-config.")?;
            let fits = !config.is_empty()
                && config.len() <= QDB_MAX_PATH - 1 - "/vm-config/".len()
                && v.len() <= QDB_MAX_DATA;
            fits.then(|| (format!("/vm-config/{config}"), v.as_bytes().to_vec()))
        })
        .collect();
    qubesdb_store::write(qubesdb, vm, &entries)
}
