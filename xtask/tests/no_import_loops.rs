//! No crate of the workspace has modules that import each other in a loop:
//! every path a source file names (`crate::`, `super::`, `self::`, a child
//! module's name, in `use` trees and in code) is an edge to the file of the
//! module it reaches, and the graph of those edges has no cycle.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::Path,
};

/// A module's path from the crate root: `[]` is main.rs, `["vm"]` is
/// vm/mod.rs, `["vm", "lan"]` is vm/lan.rs.
type Module = Vec<String>;

fn name(module: &Module) -> String {
    if module.is_empty() {
        "main".into()
    } else {
        module.join("::")
    }
}

/// Every source file below `dir`, by the module it holds; `root` is the
/// crate root's file name (main or lib). Binaries under `bin/` and the
/// other root file are crates of their own, which reach this one by its
/// name, never by `crate::`.
fn sources(dir: &Path, root: &str, module: &Module, out: &mut BTreeMap<Module, String>) {
    for entry in fs::read_dir(dir).expect("a source directory is readable") {
        let path = entry.expect("a directory entry").path();
        let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
        let mut child = module.clone();
        if path.is_dir() {
            if module.is_empty() && stem == "bin" {
                continue;
            }
            child.push(stem);
            sources(&path, root, &child, out);
            continue;
        }
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let is_root = module.is_empty() && (stem == "main" || stem == "lib");
        if is_root && stem != root {
            continue;
        }
        if !is_root && stem != "mod" {
            child.push(stem);
        }
        out.insert(child, fs::read_to_string(&path).unwrap());
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Token {
    Ident(String),
    PathSep,
    Open,
    Close,
    Comma,
    Semi,
    Star,
    Other,
}

/// The source's tokens, without comments, strings and character literals
/// (their text names no module).
fn tokens(src: &str) -> Vec<Token> {
    let c: Vec<char> = src.chars().collect();
    let at = |i: usize| c.get(i).copied().unwrap_or('\0');
    let mut out = Vec::new();
    let mut i = 0;
    while i < c.len() {
        let (ch, next) = (c[i], at(i + 1));
        i += 1;
        match ch {
            '/' if next == '/' => {
                while i < c.len() && c[i] != '\n' {
                    i += 1;
                }
            }
            '/' if next == '*' => {
                let mut depth = 1;
                i += 1;
                while depth > 0 && i < c.len() {
                    match (c[i], at(i + 1)) {
                        ('/', '*') => (depth, i) = (depth + 1, i + 2),
                        ('*', '/') => (depth, i) = (depth - 1, i + 2),
                        _ => i += 1,
                    }
                }
            }
            '"' => i = past_quote(&c, i, None),
            // Character literals; a lifetime's name follows as a word.
            '\'' if next == '\\' => {
                i += 2;
                while i < c.len() && c[i] != '\'' {
                    i += 1;
                }
                i += 1;
            }
            '\'' if at(i + 1) == '\'' => i += 2,
            ':' if next == ':' => {
                out.push(Token::PathSep);
                i += 1;
            }
            '{' => out.push(Token::Open),
            '}' => out.push(Token::Close),
            ',' => out.push(Token::Comma),
            ';' => out.push(Token::Semi),
            '*' => out.push(Token::Star),
            _ if ch.is_alphanumeric() || ch == '_' => {
                let start = i - 1;
                while at(i).is_alphanumeric() || at(i) == '_' {
                    i += 1;
                }
                let word: String = c[start..i].iter().collect();
                let hashes = c[i..].iter().take_while(|&&h| h == '#').count();
                if matches!(word.as_str(), "r" | "br") && at(i + hashes) == '"' {
                    i = past_quote(&c, i + hashes + 1, Some(hashes));
                } else {
                    out.push(Token::Ident(word));
                }
            }
            _ if ch.is_whitespace() => {}
            _ => out.push(Token::Other),
        }
    }
    out
}

/// Past the string whose text starts at `i`: its closing quote, followed
/// by as many hashes as a raw string (`Some(hashes)`, where backslashes
/// escape nothing) opened with.
fn past_quote(c: &[char], mut i: usize, raw: Option<usize>) -> usize {
    let hashes = raw.unwrap_or(0);
    while i < c.len() {
        if c[i] == '\\' && raw.is_none() {
            i += 2;
        } else if c[i] == '"' && c[i + 1..].iter().take(hashes).all(|&h| h == '#') {
            return i + 1 + hashes;
        } else {
            i += 1;
        }
    }
    i
}

/// The paths a `use` declaration starting at `toks[*i]` names, one per
/// leaf of its tree; `*i` ends past its semicolon.
fn use_tree(toks: &[Token], i: &mut usize) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut path = Vec::new();
    // The path's length at each open brace: a comma or the closing brace
    // goes back to it.
    let mut groups = Vec::new();
    let mut leaf = false;
    while let Some(token) = toks.get(*i) {
        *i += 1;
        match token {
            Token::Ident(word) if word == "as" => *i += 1,
            Token::Ident(word) => {
                path.push(word.clone());
                leaf = true;
            }
            Token::Star => leaf = true,
            Token::Open => groups.push(path.len()),
            Token::Comma | Token::Close | Token::Semi => {
                if std::mem::take(&mut leaf) {
                    out.push(path.clone());
                }
                match token {
                    Token::Comma => path.truncate(groups.last().copied().unwrap_or(0)),
                    Token::Close => path.truncate(groups.pop().unwrap_or(0)),
                    _ => break,
                }
            }
            _ => {}
        }
    }
    out
}

/// The paths `src` names, each with the module it is named in (the file's
/// own, or an inline module in it such as `tests`).
fn paths(file: &Module, src: &str) -> Vec<(Module, Vec<String>)> {
    let toks = tokens(src);
    let mut out = Vec::new();
    // One entry per open brace: the inline module it opens, if any.
    let mut braces: Vec<Option<String>> = Vec::new();
    let scope = |braces: &[Option<String>]| {
        let mut m = file.clone();
        m.extend(braces.iter().flatten().cloned());
        m
    };
    let mut i = 0;
    while i < toks.len() {
        match (&toks[i], toks.get(i + 1), toks.get(i + 2)) {
            (Token::Ident(m), Some(Token::Ident(inline)), Some(Token::Open)) if m == "mod" => {
                braces.push(Some(inline.clone()));
                i += 3;
            }
            (Token::Ident(u), ..) if u == "use" => {
                i += 1;
                let here = scope(&braces);
                out.extend(
                    use_tree(&toks, &mut i)
                        .into_iter()
                        .map(|p| (here.clone(), p)),
                );
            }
            (Token::Open, ..) => {
                braces.push(None);
                i += 1;
            }
            (Token::Close, ..) => {
                braces.pop();
                i += 1;
            }
            (Token::Ident(first), ..) if i == 0 || toks[i - 1] != Token::PathSep => {
                let mut path = vec![first.clone()];
                i += 1;
                while toks.get(i) == Some(&Token::PathSep) {
                    let Some(Token::Ident(next)) = toks.get(i + 1) else {
                        break;
                    };
                    path.push(next.clone());
                    i += 2;
                }
                if path.len() > 1 {
                    out.push((scope(&braces), path));
                }
            }
            _ => i += 1,
        }
    }
    out
}

/// The file module `path`, named in `scope`, reaches; `None` for paths
/// outside the crate (std, anyhow, a local item).
fn resolve(files: &BTreeSet<Module>, scope: &Module, path: &[String]) -> Option<Module> {
    let (first, rest) = path.split_first()?;
    let mut at = match first.as_str() {
        "crate" => Vec::new(),
        "self" => scope.clone(),
        "super" => {
            let mut parent = scope.clone();
            parent.pop()?;
            parent
        }
        child => {
            let mut module = scope.clone();
            module.push(child.to_string());
            if !files.contains(&module) {
                return None;
            }
            module
        }
    };
    for segment in rest {
        match segment.as_str() {
            "super" => {
                at.pop()?;
            }
            "self" => {}
            name => {
                let mut deeper = at.clone();
                deeper.push(name.to_string());
                if !files.contains(&deeper) {
                    break;
                }
                at = deeper;
            }
        }
    }
    // An inline module belongs to the file it is written in.
    while !files.contains(&at) {
        at.pop()?;
    }
    Some(at)
}

/// Each file module's edges to the others, with the path that makes each.
fn graph(sources: &BTreeMap<Module, String>) -> BTreeMap<Module, BTreeMap<Module, String>> {
    let files: BTreeSet<Module> = sources.keys().cloned().collect();
    let mut graph = BTreeMap::new();
    for (file, src) in sources {
        let edges: &mut BTreeMap<Module, String> = graph.entry(file.clone()).or_default();
        for (scope, path) in paths(file, src) {
            if let Some(target) = resolve(&files, &scope, &path)
                && target != *file
            {
                edges.entry(target).or_insert_with(|| path.join("::"));
            }
        }
    }
    graph
}

/// A cycle of `graph`, as the modules along it (the first repeated last).
fn cycle(graph: &BTreeMap<Module, BTreeMap<Module, String>>) -> Option<Vec<Module>> {
    fn visit(
        graph: &BTreeMap<Module, BTreeMap<Module, String>>,
        node: &Module,
        stack: &mut Vec<Module>,
        done: &mut BTreeSet<Module>,
    ) -> Option<Vec<Module>> {
        if let Some(at) = stack.iter().position(|m| m == node) {
            let mut found = stack[at..].to_vec();
            found.push(node.clone());
            return Some(found);
        }
        if done.contains(node) {
            return None;
        }
        stack.push(node.clone());
        for next in graph.get(node).into_iter().flat_map(|e| e.keys()) {
            if let Some(found) = visit(graph, next, stack, done) {
                return Some(found);
            }
        }
        stack.pop();
        done.insert(node.clone());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(graph, node, &mut Vec::new(), &mut done))
}

fn describe(graph: &BTreeMap<Module, BTreeMap<Module, String>>, cycle: &[Module]) -> String {
    cycle
        .windows(2)
        .map(|pair| {
            format!(
                "{} -> {} ({})",
                name(&pair[0]),
                name(&pair[1]),
                graph[&pair[0]][&pair[1]]
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn module(path: &str) -> Module {
    path.split("::")
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

/// Each crate of the workspace, and the file its modules hang from.
const CRATES: [(&str, &str); 5] = [
    ("forwarder-common", "lib"),
    ("forwarder-ebpf", "main"),
    ("forwarder-user", "lib"),
    ("tests", "lib"),
    ("xtask", "main"),
];

#[test]
fn no_crate_has_modules_that_import_each_other_in_a_loop() {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    for (krate, root) in CRATES {
        let mut files = BTreeMap::new();
        sources(
            &workspace.join(krate).join("src"),
            root,
            &Vec::new(),
            &mut files,
        );
        assert!(files.len() > 3, "{krate}: the walk found its sources");
        let graph = graph(&files);
        if let Some(found) = cycle(&graph) {
            panic!("{krate}: an import loop:\n{}", describe(&graph, &found));
        }
    }
}

#[test]
fn xtask_modules_import_each_other_without_a_loop() {
    let mut files = BTreeMap::new();
    sources(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        "main",
        &Vec::new(),
        &mut files,
    );
    assert!(
        files.contains_key(&module("vm::qemu")),
        "the walk found xtask's sources"
    );
    let graph = graph(&files);
    // The walk and the parser see the imports there are.
    assert!(graph[&module("vm")].contains_key(&module("vm::qemu")));
    assert!(graph[&module("vm::qemu")].contains_key(&module("vm::debian")));
    if let Some(found) = cycle(&graph) {
        panic!("an import loop:\n{}", describe(&graph, &found));
    }
}

#[test]
fn a_loop_through_use_trees_super_and_code_paths_is_found() {
    let files = BTreeMap::from([
        (
            module(""),
            "mod a;\nmod b;\nfn main() { a::run(); }".to_string(),
        ),
        (
            module("a"),
            "use crate::{b::{self, Thing as _}};\n".to_string(),
        ),
        (module("b"), "mod c;\nfn f() { c::g(); }".to_string()),
        (
            module("b::c"),
            "fn g() { super::super::a::run() }".to_string(),
        ),
    ]);
    let graph = graph(&files);
    let found = cycle(&graph).expect("a -> b -> b::c -> a is a loop");
    assert_eq!(found.len(), 4, "{}", describe(&graph, &found));
}

#[test]
fn comments_strings_and_inline_tests_make_no_edges() {
    let files = BTreeMap::from([
        (module(""), "mod a;\nmod b;".to_string()),
        (
            module("a"),
            "use crate::b::X;\n// crate::b::y\n".to_string(),
        ),
        (
            module("b"),
            concat!(
                "/* crate::a::x */ const U: &str = \"crate::a::x // \";\n",
                "const R: &str = r#\"crate::a::\"x\"#; const C: char = '\"';\n",
                "fn f<'a>(_: &'a str) {}\n",
                "#[cfg(test)]\nmod tests {\n    use super::*;\n    use crate::b::U;\n}\n",
            )
            .to_string(),
        ),
    ]);
    let graph = graph(&files);
    assert!(graph[&module("a")].contains_key(&module("b")));
    assert!(graph[&module("b")].is_empty(), "{:?}", graph[&module("b")]);
    assert_eq!(cycle(&graph), None);
}
