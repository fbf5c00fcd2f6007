//! ARCHITECTURE.md matches the code: it gives every source file of the five
//! crates' `src` directories, and every test file of `tests/tests`, one
//! line, and no line to a file that is not there; and the tier it names
//! for each test file is the one `cargo xtask test` runs it in.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

/// The directories whose `.rs` files ARCHITECTURE.md lists, and whether
/// their subdirectories count too.
const LISTED_DIRS: [(&str, bool); 6] = [
    ("forwarder-common/src", true),
    ("forwarder-ebpf/src", true),
    ("forwarder-user/src", true),
    ("tests/src", true),
    ("xtask/src", true),
    ("tests/tests", false),
];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits in the workspace")
        .to_path_buf()
}

/// Every `.rs` file below `dir`, as a path from the workspace root.
fn rust_files(root: &Path, dir: &str, recursive: bool, out: &mut BTreeSet<String>) {
    let entries = fs::read_dir(root.join(dir)).unwrap_or_else(|e| panic!("reading {dir}: {e}"));
    for entry in entries {
        let path = entry.expect("a directory entry").path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let relative = format!("{dir}/{name}");
        if path.is_dir() {
            if recursive {
                rust_files(root, &relative, true, out);
            }
        } else if name.ends_with(".rs") {
            out.insert(relative);
        }
    }
}

/// One file ARCHITECTURE.md lists.
#[derive(Debug, PartialEq)]
struct Line {
    /// From the workspace root.
    path: String,
    /// The table's tier column, for a test file.
    tier: Option<u32>,
    /// What the line says the file owns.
    says: String,
}

/// The directory a line such as "Modules (`tests/src/`):" names, which the
/// paths of the lines after it start from.
fn base_dir(line: &str) -> Option<&str> {
    let start = line.find("(`")? + 2;
    let len = line[start..].find("`)")?;
    let dir = &line[start..start + len];
    dir.ends_with('/').then_some(dir)
}

/// The listed files: `- `path`: what it owns` lines and `| `path` | tier |
/// what it covers |` table rows, each path under the directory the last
/// heading named. Errors name the line that cannot be read.
fn listed(text: &str) -> Result<Vec<Line>, String> {
    let mut base = None;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let (path, tier, says) = if let Some(rest) = line.strip_prefix("- `") {
            let Some((path, says)) = rest.split_once("`: ") else {
                continue;
            };
            (path, None, says)
        } else if let Some(rest) = line.strip_prefix("| `") {
            let cells: Vec<&str> = rest.split('|').map(str::trim).collect();
            let [path, tier, says, ..] = cells[..] else {
                return Err(format!("line {}: a row without a tier and a text", n + 1));
            };
            let tier = tier
                .parse()
                .map_err(|_| format!("line {}: tier {tier:?} is not a number", n + 1))?;
            (path.trim_end_matches('`'), Some(tier), says)
        } else {
            if let Some(dir) = base_dir(line) {
                base = Some(dir);
            }
            continue;
        };
        if !path.ends_with(".rs") {
            continue;
        }
        let Some(base) = base else {
            return Err(format!(
                "line {}: {path} comes before any \"(`dir/`)\" naming its directory",
                n + 1
            ));
        };
        out.push(Line {
            path: format!("{base}{path}"),
            tier,
            says: says.trim().to_string(),
        });
    }
    Ok(out)
}

/// What differs between the listed files and the files there are, or
/// `None` when they agree.
fn differences(lines: &[Line], files: &BTreeSet<String>) -> Option<String> {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for line in lines {
        *counts.entry(&line.path).or_default() += 1;
    }
    let listed: BTreeSet<String> = counts.keys().map(|p| p.to_string()).collect();
    let sections = [
        (
            "not listed (add a line for each)",
            files.difference(&listed).cloned().collect::<Vec<_>>(),
        ),
        (
            "listed, but no such file (remove or rename the line)",
            listed.difference(files).cloned().collect(),
        ),
        (
            "listed more than once",
            counts
                .iter()
                .filter(|(_, n)| **n > 1)
                .map(|(p, _)| p.to_string())
                .collect(),
        ),
        (
            "listed without saying what the file owns",
            lines
                .iter()
                .filter(|l| l.says.is_empty())
                .map(|l| l.path.clone())
                .collect(),
        ),
    ];
    let report: Vec<String> = sections
        .into_iter()
        .filter(|(_, paths)| !paths.is_empty())
        .map(|(what, paths)| format!("{what}:\n  {}", paths.join("\n  ")))
        .collect();
    (!report.is_empty()).then(|| report.join("\n"))
}

/// The tiers xtask/src/test.rs runs each test target in: every string
/// literal naming one of `targets` counts for the tier whose "tier N"
/// step text came last before it.
fn tiers_in(test_rs: &str, targets: &BTreeSet<String>) -> BTreeMap<String, Vec<u32>> {
    let mut tier = None;
    let mut out: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for line in test_rs.lines() {
        // The text between a line's quotes; test.rs escapes no quote.
        for literal in line.split('"').skip(1).step_by(2) {
            if let Some(rest) = literal.strip_prefix("tier ") {
                tier = rest.split(':').next().and_then(|n| n.parse().ok());
            } else if let Some(tier) = tier
                && targets.contains(literal)
            {
                out.entry(literal.to_string()).or_default().push(tier);
            }
        }
    }
    out
}

fn architecture_md() -> Vec<Line> {
    let path = workspace().join("ARCHITECTURE.md");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    listed(&text).unwrap_or_else(|e| panic!("ARCHITECTURE.md {e}"))
}

#[test]
fn architecture_md_lists_every_source_and_test_file_once() {
    let root = workspace();
    let mut files = BTreeSet::new();
    for (dir, recursive) in LISTED_DIRS {
        rust_files(&root, dir, recursive, &mut files);
    }
    assert!(
        !files.contains("xtask/tests/architecture.rs")
            && files.contains("forwarder-user/src/daemon/mod.rs")
            && files.contains("tests/tests/hostile.rs"),
        "the walk found the sources and test files, and only those"
    );
    if let Some(report) = differences(&architecture_md(), &files) {
        panic!("ARCHITECTURE.md and the code disagree:\n{report}");
    }
}

#[test]
fn architecture_md_names_the_tier_that_runs_each_test_file() {
    let lines = architecture_md();
    let test_files: Vec<&Line> = lines
        .iter()
        .filter(|l| l.path.starts_with("tests/tests/"))
        .collect();
    assert!(test_files.len() > 10, "the table of test files was read");
    let stem = |l: &Line| {
        l.path
            .trim_start_matches("tests/tests/")
            .trim_end_matches(".rs")
            .to_string()
    };
    let targets: BTreeSet<String> = test_files.iter().map(|l| stem(l)).collect();
    let test_rs = fs::read_to_string(workspace().join("xtask/src/test.rs")).unwrap();
    let tiers = tiers_in(&test_rs, &targets);
    let wrong: Vec<String> = test_files
        .iter()
        .filter_map(|l| {
            let runs = tiers.get(&stem(l)).cloned().unwrap_or_default();
            let listed: Vec<u32> = l.tier.into_iter().collect();
            (runs != listed)
                .then(|| format!("{}: listed in tier {listed:?}, run in {runs:?}", l.path))
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "ARCHITECTURE.md's tiers and xtask/src/test.rs disagree:\n  {}",
        wrong.join("\n  ")
    );
}

#[test]
fn a_missing_an_extra_and_a_repeated_line_are_each_named() {
    let text = "\
Modules (`a/src/`):

- `lib.rs`: the root.
- `gone.rs`: a file removed since.
- `lib.rs`: again.

Test files (`a/tests/`):

| file | tier | what it covers |
|---|---|---|
| `t.rs` | 2 | something |
";
    let lines = listed(text).unwrap();
    assert_eq!(
        lines.last(),
        Some(&Line {
            path: "a/tests/t.rs".into(),
            tier: Some(2),
            says: "something".into(),
        })
    );
    let files: BTreeSet<String> = ["a/src/lib.rs", "a/src/new.rs", "a/tests/t.rs"]
        .map(String::from)
        .into();
    let report = differences(&lines, &files).expect("the list and the files differ");
    for named in [
        "a/src/new.rs",
        "a/src/gone.rs",
        "listed more than once:\n  a/src/lib.rs",
    ] {
        assert!(report.contains(named), "{named} not in:\n{report}");
    }
    assert!(!report.contains("t.rs"), "{report}");
    assert_eq!(
        listed("- `x.rs`: before any directory")
            .map(|_| ())
            .unwrap_err(),
        "line 1: x.rs comes before any \"(`dir/`)\" naming its directory"
    );
}

#[test]
fn a_test_target_is_counted_in_the_tier_whose_step_came_before() {
    let test_rs = r#"
    step("tier 2: packet tests");
    let n = cargo_test(&targets(&["test_run", "hostile"]), &x, None)?;
    step(
        "tier 3: integration",
    );
    let integration = ["relay", "package"];
    "#;
    let targets: BTreeSet<String> = ["test_run", "hostile", "relay", "package", "unrun"]
        .map(String::from)
        .into();
    let tiers = tiers_in(test_rs, &targets);
    assert_eq!(tiers["test_run"], [2]);
    assert_eq!(tiers["hostile"], [2]);
    assert_eq!(tiers["relay"], [3]);
    assert_eq!(tiers["package"], [3]);
    assert!(!tiers.contains_key("unrun"));
}
