//! The `vantage-sync` binary: the CLI's edge, where errors become exit codes.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;
use vantage_sync::cli::Cli;

// glibc's malloc and free were a large share of the server's CPU under the
// dashboard query (docs/adr/0005-mimalloc.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,sea_orm_migration=warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    Cli::parse_or_exit().run().await?;
    Ok(())
}
