//! The documentation holds together: every relative link in the README,
//! `docs/`, the changelog and the contributing guide reaches a file, every
//! anchor a heading; the configuration page names every flag and
//! environment variable of `serve`, `check`, `token`, `migrate` and `run`;
//! and the README's commands are the ones the tests and CI run.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use clap::CommandFactory;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The Markdown pages people read.
fn pages() -> Vec<PathBuf> {
    let root = root();
    let mut pages = vec![
        root.join("README.md"),
        root.join("CHANGELOG.md"),
        root.join("CONTRIBUTING.md"),
    ];
    for dir in ["docs", "docs/adr"] {
        for entry in std::fs::read_dir(root.join(dir)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|ext| ext == "md") {
                pages.push(path);
            }
        }
    }
    pages.sort();
    pages
}

/// The text outside fenced code blocks and inline code.
fn prose(text: &str) -> String {
    let mut out = String::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        let mut in_code = false;
        for c in line.chars() {
            if c == '`' {
                in_code = !in_code;
            } else if !in_code {
                out.push(c);
            }
        }
        out.push('\n');
    }
    out
}

/// Every `[text](target)` link's target.
fn links(text: &str) -> Vec<String> {
    let prose = prose(text);
    let mut found = Vec::new();
    let mut rest = prose.as_str();
    while let Some(at) = rest.find("](") {
        rest = &rest[at + 2..];
        if let Some(end) = rest.find(')') {
            let target = rest[..end].split_whitespace().next().unwrap_or_default();
            found.push(target.trim_matches(['<', '>']).to_owned());
            rest = &rest[end..];
        }
    }
    found
}

/// A heading's anchor as GitHub makes it: lower case, punctuation but
/// `-` and `_` dropped, spaces as `-`.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

fn anchors(text: &str) -> BTreeSet<String> {
    let mut fenced = false;
    let mut anchors = BTreeSet::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        } else if !fenced && line.starts_with('#') {
            let heading = line.trim_start_matches('#').replace('`', "");
            anchors.insert(slug(&heading));
        }
    }
    anchors
}

#[test]
fn links_and_anchors_resolve() {
    let mut broken = Vec::new();
    let mut checked = 0;
    for page in pages() {
        let text = std::fs::read_to_string(&page).unwrap();
        for link in links(&text) {
            if link.contains("://") || link.starts_with("mailto:") || link.is_empty() {
                continue;
            }
            checked += 1;
            let (path, anchor) = match link.split_once('#') {
                Some((path, anchor)) => (path, Some(anchor)),
                None => (link.as_str(), None),
            };
            let target = if path.is_empty() {
                page.clone()
            } else {
                page.parent().unwrap().join(path)
            };
            if !target.exists() {
                broken.push(format!("{}: {link}: no such file", page.display()));
                continue;
            }
            if let Some(anchor) = anchor {
                let text = std::fs::read_to_string(&target).unwrap_or_default();
                if !anchors(&text).contains(anchor) {
                    broken.push(format!("{}: {link}: no such heading", page.display()));
                }
            }
        }
    }
    assert!(checked > 50, "only {checked} links were found");
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn the_link_checker_finds_what_is_broken() {
    let text = "# A `code` heading\n[ok](#a-code-heading) [bad](#nowhere) `[not](a-link)`\n```\n[nor](this)\n```\n";
    assert_eq!(links(text), ["#a-code-heading", "#nowhere"]);
    assert!(anchors(text).contains("a-code-heading"));
    assert!(!anchors(text).contains("nowhere"));
    assert_eq!(
        slug("Deploying next to Supabase (poolers)"),
        "deploying-next-to-supabase-poolers"
    );
}

#[test]
fn the_configuration_page_names_every_flag_and_variable() {
    let page = std::fs::read_to_string(root().join("docs/configuration.md")).unwrap();
    let cli = vantage_sync::cli::Cli::command();
    let mut missing = Vec::new();
    let mut named = 0;
    for command in ["serve", "check", "token", "migrate", "run"] {
        let command = cli.find_subcommand(command).unwrap();
        for arg in command.get_arguments() {
            if let Some(long) = arg.get_long()
                && !matches!(long, "help" | "version")
            {
                named += 1;
                if !page.contains(&format!("`--{long}")) {
                    missing.push(format!("--{long}"));
                }
            }
            if let Some(env) = arg.get_env() {
                let env = env.to_string_lossy();
                if !page.contains(&format!("`{env}`")) {
                    missing.push(env.into_owned());
                }
            }
        }
    }
    assert!(named > 30, "only {named} flags were found");
    missing.dedup();
    assert!(
        missing.is_empty(),
        "docs/configuration.md does not name: {missing:?}"
    );
}

/// The sh code blocks of `text`, each as its command lines.
fn shell_blocks(text: &str) -> Vec<Vec<String>> {
    text.split("```sh\n")
        .skip(1)
        .filter_map(|block| block.split("```").next())
        .map(|block| {
            block
                .lines()
                .map(|line| line.split(" #").next().unwrap_or(line).trim().to_owned())
                .filter(|line| !line.is_empty())
                .collect()
        })
        .collect()
}

#[test]
fn the_readme_commands_are_the_ones_tested() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let blocks = shell_blocks(&readme);
    // Run: the build, then the binary with the arguments the zero-config
    // test gives it (that test adds only where to listen and keep data).
    let run = blocks
        .iter()
        .find(|block| {
            block
                .first()
                .is_some_and(|line| line.starts_with("cargo build"))
        })
        .expect("a run block");
    assert_eq!(run[0], "cargo build --release --locked -p vantage-sync");
    let serve: Vec<&str> = run[1].split_whitespace().collect();
    assert_eq!(serve[0], "./target/release/vantage-sync");
    assert_eq!(serve[1..], crate::cli::README_SERVE_ARGS);
    // Test: exactly what .ci/run runs.
    let test = blocks
        .iter()
        .find(|block| {
            block
                .first()
                .is_some_and(|line| line.starts_with("cargo test"))
        })
        .expect("a test block");
    assert_eq!(test.len(), 1);
    let ci = std::fs::read_to_string(root().join(".ci/run")).unwrap();
    assert!(
        ci.lines()
            .any(|line| line.trim_start().starts_with(&format!("{} ", test[0]))),
        "{} is not what .ci/run runs",
        test[0]
    );
}
