//! The workspace denies `unsafe` code, and one file may allow it: the
//! prefetch hint (`docs/adr/0012-one-unsafe-call-the-prefetch-hint.md`).
//! Every crate takes the workspace's lints, and no other source file, test
//! or example names `unsafe` as code.

use std::path::{Path, PathBuf};

/// The one file allowed to hold `unsafe` code, from the workspace root.
const ALLOWED: &str = "api/src/prefetch.rs";

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn rust_files(dir: &Path, into: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy();
        if path.is_dir() {
            if !name.starts_with('.') && !name.starts_with("target") && name != "node_modules" {
                rust_files(&path, into);
            }
        } else if name.ends_with(".rs") {
            into.push(path);
        }
    }
}

/// Lines of `text` that use `unsafe` as a keyword or set its lint,
/// comments left out.
fn unsafe_lines(text: &str) -> Vec<String> {
    text.lines()
        .map(|line| line.split("//").next().unwrap_or_default())
        .filter(|code| {
            (code.trim_start().starts_with('#') && code.contains("unsafe_code"))
                || [
                    "unsafe {",
                    "unsafe fn",
                    "unsafe impl",
                    "unsafe extern",
                    "unsafe trait",
                ]
                .iter()
                .any(|keyword| code.contains(keyword))
        })
        .map(|code| code.trim().to_owned())
        .collect()
}

#[test]
fn unsafe_code_is_denied_in_every_crate() {
    let root = workspace_root();
    let workspace = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    assert!(
        workspace.contains("[workspace.lints.rust]\nunsafe_code = \"deny\""),
        "the workspace no longer denies unsafe code"
    );
    for member in ["api", "entity", "migration", "testkit", "loadtest"] {
        let manifest = std::fs::read_to_string(root.join(member).join("Cargo.toml")).unwrap();
        assert!(
            manifest.contains("[lints]\nworkspace = true"),
            "{member}/Cargo.toml does not take the workspace's lints"
        );
    }
}

#[test]
fn only_the_prefetch_hint_allows_unsafe_code() {
    let root = workspace_root();
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    assert!(files.len() > 50, "the source tree was not read: {files:?}");
    let mut found = Vec::new();
    for file in &files {
        let relative = file
            .strip_prefix(&root)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let lines = unsafe_lines(&std::fs::read_to_string(file).unwrap());
        if !lines.is_empty() && relative != ALLOWED && !relative.ends_with("one_unsafe_call.rs") {
            found.push((relative, lines));
        }
    }
    assert!(found.is_empty(), "unsafe code outside {ALLOWED}: {found:?}");
    let allowed = unsafe_lines(&std::fs::read_to_string(root.join(ALLOWED)).unwrap());
    assert_eq!(
        allowed,
        ["#[allow(unsafe_code)]", "unsafe {"],
        "{ALLOWED} holds more unsafe code than its one call"
    );
}

#[test]
fn the_reader_finds_unsafe_code_the_way_it_is_written() {
    let text = "fn a() {}\n// unsafe { not code }\n#[allow(unsafe_code)]\nlet b = unsafe { c() }; // d\nconst CSP: &str = \"'unsafe-inline'\";\nunsafe impl Send for E {}";
    assert_eq!(
        unsafe_lines(text),
        [
            "#[allow(unsafe_code)]",
            "let b = unsafe { c() };",
            "unsafe impl Send for E {}"
        ]
    );
}
