//! Edits of the user's config file for `rules add --save` and `rules del
//! --save`. Only the one rule's `[[forward]]` table is added, updated or
//! removed: every other byte (comments, layout, other keys, other rules)
//! stays as the user wrote it. The file is replaced atomically and keeps
//! its mode and owner, without following anything planted beside it (see
//! `replace_file`); a symlink to it is followed, not replaced, when root or
//! the file's owner made it.

use std::{fmt::Display, path::Path, time::SystemTime};

use toml_edit::{ArrayOfTables, DocumentMut, Item, Table, value};

use crate::{
    replace_file::Original,
    rules::Rule,
    spec::{ForwardSpec, Ports, Proto},
};

fn fail(path: &Path, e: impl Display) -> String {
    format!("saving to {}: {e}", path.display())
}

fn read(path: &Path) -> Result<(Original, DocumentMut), String> {
    let original = Original::open(path).map_err(|e| fail(path, e))?;
    let doc = original.text.parse().map_err(|e| fail(path, e))?;
    Ok((original, doc))
}

/// The file's `[[forward]]` tables, creating the array if it is missing.
fn forward_tables<'d>(
    doc: &'d mut DocumentMut,
    path: &Path,
) -> Result<&'d mut ArrayOfTables, String> {
    if !doc.contains_key("forward") {
        doc.insert("forward", Item::ArrayOfTables(ArrayOfTables::new()));
    }
    doc["forward"].as_array_of_tables_mut().ok_or_else(|| {
        fail(
            path,
            "`forward` is not written as [[forward]] tables, the only form --save edits",
        )
    })
}

/// The protocol and listen ports a table's `spec` names, if it parses.
fn listen_of(table: &Table) -> Option<(Proto, Ports)> {
    let spec: ForwardSpec = table.get("spec")?.as_str()?.parse().ok()?;
    Some((spec.proto, spec.ports))
}

/// Writes `rule` into the file: into the table that already forwards its
/// port, keeping that table's place and comments, or as a new table at the
/// end of the others.
pub fn save_rule(path: &Path, rule: &Rule) -> Result<(), String> {
    let (original, mut doc) = read(path)?;
    let tables = forward_tables(&mut doc, path)?;
    let existing = tables
        .iter()
        .position(|t| listen_of(t) == Some((rule.proto, rule.ports)));
    let table = match existing {
        Some(i) => tables.get_mut(i).expect("index found above"),
        None => {
            tables.push(Table::new());
            let last = tables.len() - 1;
            tables.get_mut(last).expect("just pushed")
        }
    };
    let spec = ForwardSpec {
        proto: rule.proto,
        ports: rule.ports,
        target: Some(rule.target),
        target_port: (rule.target_port != rule.ports.first).then_some(rule.target_port),
    };
    table["spec"] = value(spec.to_string());
    table["allow_from"] = value(rule.allow.to_string());
    match &rule.comment {
        Some(comment) => table["comment"] = value(comment.as_str()),
        None => drop(table.remove("comment")),
    }
    match rule.expires {
        Some(expires) => table["expires"] = value(rfc3339(expires).map_err(|e| fail(path, e))?),
        None => drop(table.remove("expires")),
    }
    original
        .replace(&doc.to_string())
        .map_err(|e| fail(path, e))
}

/// The last second RFC 3339 can write (9999-12-31T23:59:59Z).
const LAST_RFC3339_SECS: u64 = 253_402_300_799;

/// `expires` as the file holds it; refused, not panicking, past what
/// RFC 3339 can write.
fn rfc3339(time: SystemTime) -> Result<String, String> {
    match time.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(since) if since.as_secs() <= LAST_RFC3339_SECS => {
            Ok(humantime::format_rfc3339_seconds(time).to_string())
        }
        _ => Err("the rule's expiry is not between 1970 and 9999, which `expires` holds".into()),
    }
}

/// Removes the tables forwarding `proto:ports`; returns whether there were
/// any. An untouched file is not rewritten.
pub fn remove_rule(path: &Path, proto: Proto, ports: Ports) -> Result<bool, String> {
    let (original, mut doc) = read(path)?;
    let Some(tables) = doc
        .get_mut("forward")
        .and_then(Item::as_array_of_tables_mut)
    else {
        return Ok(false);
    };
    let before = tables.len();
    tables.retain(|t| listen_of(t) != Some((proto, ports)));
    if tables.len() == before {
        return Ok(false);
    }
    if tables.is_empty() {
        doc.remove("forward");
    }
    original
        .replace(&doc.to_string())
        .map_err(|e| fail(path, e))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use std::{
        fs,
        net::Ipv4Addr,
        os::unix::fs::{MetadataExt as _, PermissionsExt as _},
        path::PathBuf,
        time::Duration,
    };

    use super::*;
    use crate::{config::RunConfig, rules::Origin, spec::AllowFrom};

    struct Dir(PathBuf);

    impl Dir {
        fn new(test: &str) -> Self {
            let dir = std::env::temp_dir().join(format!(
                "forwarder-config-file-{test}-{}",
                std::process::id()
            ));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            Dir(dir)
        }

        fn file(&self, text: &str) -> PathBuf {
            let path = self.0.join("forwarder.toml");
            fs::write(&path, text).unwrap();
            path
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    const USER_FILE: &str = "# sys-net, written by hand\nuplink = \"wls6f0\" # the Wi-Fi\n\n# ssh into the app VM\n[[forward]]\nspec = \"tcp:2222=10.137.0.5\"\ncomment = \"mine\"\n\n[[relay]]\nspec = \"239.255.255.250:1900=10.137.0.5\"\n";

    fn rule(port: u16) -> Rule {
        Rule::new(
            Proto::Tcp,
            Ports::one(port),
            Ipv4Addr::new(10, 137, 0, 5),
            port,
            AllowFrom::Any,
            Origin::Live,
        )
    }

    #[test]
    fn saving_a_rule_keeps_every_byte_the_user_wrote() {
        let dir = Dir::new("keep");
        let path = dir.file(USER_FILE);
        save_rule(&path, &rule(9090)).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert!(
            text.starts_with(&USER_FILE[..USER_FILE.find("[[relay]]").unwrap()]),
            "everything before the new table is untouched:\n{text}"
        );
        assert!(text.contains("[[relay]]\nspec = \"239.255.255.250:1900=10.137.0.5\""));
        let config = RunConfig::check_file(&path).unwrap();
        let ports: Vec<u16> = config.rules.iter().map(|r| r.ports.first).collect();
        assert_eq!(ports, [2222, 9090], "the user's rule stays");
    }

    #[test]
    fn saving_over_a_port_updates_its_table_in_place() {
        let dir = Dir::new("update");
        let path = dir.file(USER_FILE);
        let mut r = rule(2222);
        r.target = Ipv4Addr::new(10, 137, 0, 9);
        r.expires = Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_900_000_000));
        save_rule(&path, &r).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("# ssh into the app VM\n[[forward]]\nspec = \"tcp:2222=10.137.0.9\""),
            "{text}"
        );
        assert!(
            !text.contains("mine"),
            "the rule's new metadata replaces the old: {text}"
        );
        assert!(
            text.contains("expires = \"2030-03-17T17:46:40Z\""),
            "{text}"
        );
        assert_eq!(RunConfig::check_file(&path).unwrap().rules.len(), 1);
    }

    #[test]
    fn removing_touches_only_that_rule_and_reports_a_miss() {
        let dir = Dir::new("remove");
        let path = dir.file(USER_FILE);
        save_rule(&path, &rule(9090)).unwrap();
        assert!(remove_rule(&path, Proto::Tcp, Ports::one(9090)).unwrap());
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.contains("spec = \"tcp:2222=10.137.0.5\""));
        assert!(!text.contains("9090"));
        let before = fs::metadata(&path).unwrap().modified().unwrap();
        assert!(
            !remove_rule(&path, Proto::Udp, Ports::one(2222)).unwrap(),
            "udp:2222 was never there"
        );
        assert_eq!(
            fs::metadata(&path).unwrap().modified().unwrap(),
            before,
            "not rewritten"
        );
        assert!(remove_rule(&path, Proto::Tcp, Ports::one(2222)).unwrap());
        let text = fs::read_to_string(&path).unwrap();
        assert!(
            !text.contains("[[forward]]") && text.contains("# sys-net"),
            "{text}"
        );
    }

    #[test]
    fn mode_owner_and_symlinks_survive() {
        let dir = Dir::new("mode");
        let path = dir.file(USER_FILE);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        std::os::unix::fs::chown(&path, Some(1), Some(2)).ok();
        let owner = fs::metadata(&path).map(|m| (m.uid(), m.gid())).unwrap();
        let link = dir.0.join("link.toml");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        save_rule(&link, &rule(9090)).unwrap();
        assert!(
            fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o640);
        assert_eq!((meta.uid(), meta.gid()), owner);
        assert!(fs::read_to_string(&path).unwrap().contains("9090"));
        let leftovers: Vec<_> = fs::read_dir(&dir.0)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(leftovers.len(), 2, "no temporary file left: {leftovers:?}");
    }

    #[test]
    fn an_expiry_past_9999_is_refused_and_the_file_left_alone() {
        let dir = Dir::new("far");
        let path = dir.file(USER_FILE);
        let last = SystemTime::UNIX_EPOCH + Duration::from_secs(LAST_RFC3339_SECS);
        assert_eq!(rfc3339(last).unwrap(), "9999-12-31T23:59:59Z");
        let mut r = rule(9090);
        for far in [
            last + Duration::from_secs(1),
            SystemTime::UNIX_EPOCH - Duration::from_secs(1),
            SystemTime::UNIX_EPOCH + Duration::from_secs(1 << 40),
        ] {
            r.expires = Some(far);
            let err = save_rule(&path, &r).unwrap_err();
            assert!(err.contains("9999"), "{err}");
        }
        assert_eq!(fs::read_to_string(&path).unwrap(), USER_FILE);
    }

    #[test]
    fn an_inline_forward_array_is_refused_not_rewritten() {
        let dir = Dir::new("inline");
        let path = dir.file("uplink = \"eth0\"\nforward = [{ spec = \"tcp:1=10.0.0.1\" }]\n");
        let err = save_rule(&path, &rule(9090)).unwrap_err();
        assert!(err.contains("[[forward]]"), "{err}");
        assert!(fs::read_to_string(&path).unwrap().contains("tcp:1="));
    }
}
