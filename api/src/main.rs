//! The `vantage-sync` binary: the CLI's edge, where errors become exit codes.

use std::io::IsTerminal;

use vantage_sync::cli::Cli;
use vantage_sync::telemetry::{self, TraceSettings};

// glibc's malloc and free were a large share of the server's CPU under the
// dashboard query (docs/adr/0005-mimalloc.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let traces = TraceSettings::from_env()?;
    let telemetry = telemetry::init(
        traces.as_ref(),
        "info,sqlx=warn,sea_orm_migration=warn",
        std::io::stderr().is_terminal(),
    )?;
    let result = Cli::parse_or_exit().run().await;
    // The spans of the last requests, exported before the process ends.
    telemetry.shutdown().await;
    result?;
    Ok(())
}
