//! The server crate's modules point down: the import graph among the
//! top-level modules of `api/src` has no cycle, nor has the graph among the
//! files of any one folder; and `docs/ARCHITECTURE.md` shows the graph the
//! code has. Imports are read from the source text: `crate::` and
//! `super::` paths, `use` groups included; test modules are left out.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A module's path below the crate root (`["transport", "ws"]`).
type ModulePath = Vec<String>;
/// Edges from a module to the modules it imports, by name.
type Graph = BTreeMap<String, BTreeSet<String>>;

fn source_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, into: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, into);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            into.push(path);
        }
    }
}

fn module_of(root: &Path, file: &Path) -> ModulePath {
    let relative = file.strip_prefix(root).unwrap().with_extension("");
    let mut parts: ModulePath = relative
        .components()
        .map(|part| part.as_os_str().to_string_lossy().into_owned())
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts
}

/// The code of a file without comment lines and without its unit tests.
fn code(text: &str) -> String {
    let text = text.split("#[cfg(test)]").next().unwrap_or_default();
    text.lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Every path written after `crate::` or `super::`, `use` groups expanded,
/// with the keyword it started with.
fn paths(code: &str) -> Vec<(&'static str, Vec<String>)> {
    let mut found = Vec::new();
    for keyword in ["crate::", "super::"] {
        let mut rest = code;
        while let Some(at) = rest.find(keyword) {
            let before = rest[..at].chars().next_back();
            let after = &rest[at + keyword.len()..];
            rest = after;
            if before.is_some_and(is_ident) {
                continue;
            }
            let name = if keyword == "crate::" {
                "crate"
            } else {
                "super"
            };
            for path in expand(after) {
                found.push((name, path));
            }
        }
    }
    found
}

/// The paths at the start of `text`: `a::b::C` or `a::{b, c::{d}}`.
fn expand(text: &str) -> Vec<Vec<String>> {
    let mut prefix = Vec::new();
    let mut rest = text;
    loop {
        let end = rest.find(|c: char| !is_ident(c)).unwrap_or(rest.len());
        if end == 0 {
            break;
        }
        prefix.push(rest[..end].to_owned());
        rest = &rest[end..];
        match rest.strip_prefix("::") {
            Some(more) => rest = more,
            None => return vec![prefix],
        }
    }
    let Some(group) = rest.strip_prefix('{') else {
        return vec![prefix];
    };
    let mut depth = 1;
    let mut items = Vec::new();
    let mut start = 0;
    for (index, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 1 => {
                items.push(&group[start..index]);
                break;
            }
            '}' => depth -= 1,
            ',' if depth == 1 => {
                items.push(&group[start..index]);
                start = index + 1;
            }
            _ => {}
        }
    }
    items
        .into_iter()
        .flat_map(|item| expand(item.trim()))
        .map(|tail| prefix.iter().cloned().chain(tail).collect())
        .collect()
}

/// The top-level graph and, per folder, the graph among its files.
fn graphs() -> (Graph, BTreeMap<String, Graph>) {
    let root = source_root();
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    let modules: BTreeSet<ModulePath> = files.iter().map(|f| module_of(&root, f)).collect();
    let children = |parent: &[String]| -> BTreeSet<String> {
        modules
            .iter()
            .filter(|m| m.len() == parent.len() + 1 && m.starts_with(parent))
            .map(|m| m[parent.len()].clone())
            .collect()
    };
    let mut top = Graph::new();
    let mut folders: BTreeMap<String, Graph> = BTreeMap::new();
    for file in &files {
        let module = module_of(&root, file);
        let Some(own_top) = module.first() else {
            continue;
        };
        top.entry(own_top.clone()).or_default();
        let text = std::fs::read_to_string(file).unwrap();
        for (keyword, path) in paths(&code(&text)) {
            let target: ModulePath = if keyword == "crate" {
                path
            } else {
                module[..module.len() - 1]
                    .iter()
                    .cloned()
                    .chain(path)
                    .collect()
            };
            let Some(target_top) = target.first() else {
                continue;
            };
            if target_top != own_top && children(&[]).contains(target_top) {
                top.get_mut(own_top).unwrap().insert(target_top.clone());
            }
            if module.len() >= 2 {
                let parent = &module[..module.len() - 1];
                let own = &module[module.len() - 1];
                if target.len() > parent.len()
                    && target.starts_with(parent)
                    && &target[parent.len()] != own
                    && children(parent).contains(&target[parent.len()])
                {
                    folders
                        .entry(parent.join("/"))
                        .or_default()
                        .entry(own.clone())
                        .or_default()
                        .insert(target[parent.len()].clone());
                }
            }
        }
    }
    (top, folders)
}

/// The edges that lie on a cycle.
fn cycles(graph: &Graph) -> Vec<(String, String)> {
    let reaches = |from: &str, to: &str| {
        let mut seen = BTreeSet::new();
        let mut stack = vec![from.to_owned()];
        while let Some(node) = stack.pop() {
            if node == to {
                return true;
            }
            for next in graph.get(&node).into_iter().flatten() {
                if seen.insert(next.clone()) {
                    stack.push(next.clone());
                }
            }
        }
        false
    };
    graph
        .iter()
        .flat_map(|(from, tos)| tos.iter().map(move |to| (from.clone(), to.clone())))
        .filter(|(from, to)| reaches(to, from))
        .collect()
}

/// The top-level graph as the architecture page draws it.
fn mermaid(graph: &Graph) -> String {
    let mut text = String::from("```mermaid\nflowchart TD\n");
    for (from, tos) in graph {
        if tos.is_empty() {
            text.push_str(&format!("    {from}\n"));
        }
        for to in tos {
            text.push_str(&format!("    {from} --> {to}\n"));
        }
    }
    text.push_str("```\n");
    text
}

#[test]
fn top_level_modules_import_without_cycles() {
    let (top, _) = graphs();
    assert!(top.len() >= 10, "the source tree was not read: {top:?}");
    let cyclic = cycles(&top);
    assert!(
        cyclic.is_empty(),
        "imports on a cycle: {cyclic:?}\n{top:#?}"
    );
}

#[test]
fn files_of_one_folder_import_without_cycles() {
    let (_, folders) = graphs();
    for (folder, graph) in &folders {
        let cyclic = cycles(graph);
        assert!(
            cyclic.is_empty(),
            "{folder}: files that import each other: {cyclic:?}"
        );
    }
}

#[test]
fn the_architecture_page_shows_the_graph_the_code_has() {
    let (top, _) = graphs();
    let expected = mermaid(&top);
    let page = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/ARCHITECTURE.md"),
    )
    .unwrap();
    assert!(
        page.contains(&expected),
        "docs/ARCHITECTURE.md should contain the module graph as the code has it:\n{expected}"
    );
}

#[test]
fn the_reader_finds_imports_the_way_they_are_written() {
    let found = paths(
        "use crate::{a, b::{c, d::E}};\nuse super::f::G;\nlet x = crate::h::i();\nmy_crate::j;",
    );
    let as_text: Vec<String> = found
        .iter()
        .map(|(keyword, path)| format!("{keyword}::{}", path.join("::")))
        .collect();
    assert_eq!(
        as_text,
        [
            "crate::a",
            "crate::b::c",
            "crate::b::d::E",
            "crate::h::i",
            "super::f::G"
        ]
    );
    // A cycle is found, and only its edges.
    let graph: Graph = [("a", "b"), ("b", "a"), ("b", "c")].into_iter().fold(
        Graph::new(),
        |mut graph, (from, to)| {
            graph.entry(from.into()).or_default().insert(to.into());
            graph
        },
    );
    assert_eq!(
        cycles(&graph),
        [("a".into(), "b".into()), ("b".into(), "a".into())]
    );
}
