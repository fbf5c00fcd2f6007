//! Stand-ins of `qubesdb-read`, `qubesdb-multiread` and `qubesdb-watch`
//! (symlinked under those names by `qubesdb_store::install_tools`), with
//! the options and output of qubes-core-qubesdb's `client/qubesdb-cmd.c`,
//! over one VM's stand-in QubesDB, which the stand-in qubesd fills from
//! the VM's `vm-config.*` features.
//!
//! As in the real tool: the command is what follows the last `-` of argv[0]
//! (or `-c CMD`); options `-f` (full path), `-r` (raw value), `-q` (quiet),
//! `-w` (read: wait for the entry), `-e`/`--default` (read: a default),
//! `-n N` (watch: N events, negative for ever), GNU getopt's permutation;
//! values printed byte by byte from 0x20 to 0x7f and as `\xNN` otherwise
//! unless raw; exit 2 when a read found nothing and nothing else failed.
//! Not modelled: `-d` (dom0 only), `-x`, `write`, `rm`, `list`; a watch
//! polls the store, so writes between two polls fire once.

use std::{io::Write as _, path::Path, process::ExitCode, thread, time::Duration};

use forwarder_tests::qubesdb_store::{self, Entries};

#[derive(Default)]
struct Options {
    command: Option<String>,
    fullpath: bool,
    raw: bool,
    quiet: bool,
    wait: bool,
    default: Option<String>,
    count: Option<i64>,
    args: Vec<String>,
}

fn usage(argv0: &str) -> ExitCode {
    eprintln!(
        "Usage: {argv0} [-frq] [-c <command>] [-d <destination domain>] \n       [command arguments]"
    );
    ExitCode::from(1)
}

fn parse(argv: &[String]) -> Result<Options, String> {
    let mut o = Options {
        command: argv[0].rsplit_once('-').map(|(_, cmd)| cmd.to_string()),
        ..Options::default()
    };
    let mut i = 1;
    while i < argv.len() {
        let arg = &argv[i];
        i += 1;
        if arg == "--default" {
            o.default = Some(argv.get(i).ok_or("--default needs a value")?.clone());
            i += 1;
            continue;
        }
        let Some(flags) = arg.strip_prefix('-').filter(|f| !f.is_empty()) else {
            o.args.push(arg.clone());
            continue;
        };
        for (at, flag) in flags.char_indices() {
            match flag {
                'f' => o.fullpath = true,
                'r' => o.raw = true,
                'q' => o.quiet = true,
                'w' => o.wait = true,
                'c' | 'n' | 'e' | 'd' => {
                    let rest = &flags[at + 1..];
                    let value = if rest.is_empty() {
                        i += 1;
                        argv.get(i - 1)
                            .ok_or(format!("-{flag} needs a value"))?
                            .clone()
                    } else {
                        rest.to_string()
                    };
                    match flag {
                        'c' => o.command = Some(value),
                        'n' => o.count = Some(value.trim().parse().unwrap_or(0)),
                        'e' => o.default = Some(value),
                        _ => return Err("-d is only valid in dom0".into()),
                    }
                    break;
                }
                other => return Err(format!("option -{other} is not modelled by the stand-in")),
            }
        }
    }
    Ok(o)
}

/// qubesdb-cmd.c's `encode_and_print_value`.
fn print_value(out: &mut Vec<u8>, value: &[u8], raw: bool) {
    if raw {
        out.extend_from_slice(value);
    } else {
        for b in value {
            if (0x20..0x80).contains(b) {
                out.push(*b);
            } else {
                out.extend_from_slice(format!("\\x{b:02x}").as_bytes());
            }
        }
    }
    out.push(b'\n');
}

fn load(dir: &Path, vm: &str) -> Option<Entries> {
    qubesdb_store::read(dir, vm).ok().flatten()
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    let o = match parse(&argv) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            return usage(&argv[0]);
        }
    };
    let command = o.command.clone().unwrap_or_default();
    if !["read", "multiread", "watch"].contains(&command.as_str()) {
        return usage(&argv[0]);
    }
    if o.default.is_some() && command != "read" {
        eprintln!("--default valid only for read command");
        return ExitCode::from(1);
    }
    let Some((dir, vm)) = qubesdb_store::configured(Path::new(&argv[0])) else {
        eprintln!("Failed connect to local daemon");
        return ExitCode::from(1);
    };
    let Some(entries) = load(&dir, &vm) else {
        if !o.quiet {
            eprintln!("Failed connect to local daemon");
        }
        return ExitCode::from(1);
    };
    let mut out = Vec::new();
    let code = match command.as_str() {
        "read" => read(&o, &dir, &vm, entries, &mut out),
        "multiread" => {
            for prefix in &o.args {
                for (path, value) in entries.range(prefix.clone()..) {
                    if !path.starts_with(prefix.as_str()) {
                        break;
                    }
                    let shown = if o.fullpath {
                        path
                    } else {
                        &path[prefix.len()..]
                    };
                    out.extend_from_slice(format!("{shown} = ").as_bytes());
                    print_value(&mut out, value, o.raw);
                }
            }
            0
        }
        _ => watch(&o, &dir, &vm, entries, &mut out),
    };
    let mut stdout = std::io::stdout().lock();
    if stdout
        .write_all(&out)
        .and_then(|()| stdout.flush())
        .is_err()
    {
        return ExitCode::from(1);
    }
    ExitCode::from(code)
}

fn read(o: &Options, dir: &Path, vm: &str, mut entries: Entries, out: &mut Vec<u8>) -> u8 {
    if o.default.is_some() && o.args.len() != 1 {
        eprintln!("--default only valid with exactly 1 path to read");
        return 1;
    }
    let mut enoent = false;
    for path in &o.args {
        let mut value = entries.get(path).cloned();
        while o.wait && value.is_none() {
            thread::sleep(Duration::from_millis(5));
            match load(dir, vm) {
                Some(now) => entries = now,
                None => return 1,
            }
            value = entries.get(path).cloned();
        }
        let value = value.or_else(|| o.default.clone().map(String::into_bytes));
        match value {
            Some(value) => {
                if o.fullpath {
                    out.extend_from_slice(format!("{path} = ").as_bytes());
                }
                print_value(out, &value, o.raw);
            }
            None => {
                if !o.quiet {
                    eprintln!("Failed to read {path}");
                }
                enoent = true;
            }
        }
    }
    if enoent { 2 } else { 0 }
}

/// Whether a change of `path` fires a watch on `watched`: a watch on a
/// path ending in `/` covers the tree under it, any other only that path.
fn fires(watched: &str, path: &str) -> bool {
    if watched.ends_with('/') {
        path.starts_with(watched)
    } else {
        path == watched
    }
}

fn watch(o: &Options, dir: &Path, vm: &str, mut seen: Entries, out: &mut Vec<u8>) -> u8 {
    let mut left = o.count.unwrap_or(1);
    let mut stdout = std::io::stdout().lock();
    while left != 0 {
        thread::sleep(Duration::from_millis(5));
        let Some(now) = load(dir, vm) else {
            if !o.quiet {
                eprintln!("Failed to read watch");
            }
            return 1;
        };
        let changed = now
            .iter()
            .filter(|(path, value)| seen.get(*path) != Some(value))
            .map(|(path, _)| path)
            .chain(seen.keys().filter(|path| !now.contains_key(*path)))
            .find(|path| o.args.iter().any(|w| fires(w, path)))
            .cloned();
        seen = now;
        if let Some(path) = changed {
            out.extend_from_slice(path.as_bytes());
            out.push(b'\n');
            // The real tool's printf sits in stdout's buffer until exit
            // unless stdout is a terminal; a pipe reader sees the lines at
            // exit either way with -n 1.
            if std::io::IsTerminal::is_terminal(&stdout) {
                let _ = stdout.write_all(out);
                out.clear();
            }
            left -= 1;
        }
    }
    0
}
