//! Records the commit the binary is built from, for `vantage-sync
//! --version`: `VANTAGE_SYNC_COMMIT` when set (packagers building from a
//! tarball), else git's HEAD, else "unknown".

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let output = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(output.stdout).ok()?;
    let text = text.trim();
    (output.status.success() && !text.is_empty()).then(|| text.to_owned())
}

fn main() {
    println!("cargo:rerun-if-env-changed=VANTAGE_SYNC_COMMIT");
    let commit = match std::env::var("VANTAGE_SYNC_COMMIT") {
        Ok(commit) if !commit.trim().is_empty() => commit.trim().to_owned(),
        _ => {
            // Built again when HEAD moves: a commit, a checkout, a branch
            // that advances.
            let mut watched = vec!["HEAD".to_owned(), "packed-refs".to_owned()];
            watched.extend(git(&["symbolic-ref", "-q", "HEAD"]));
            for name in watched {
                if let Some(path) = git(&["rev-parse", "--git-path", &name]) {
                    println!("cargo:rerun-if-changed={path}");
                }
            }
            git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into())
        }
    };
    println!("cargo:rustc-env=VANTAGE_SYNC_COMMIT={commit}");
}
