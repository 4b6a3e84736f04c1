//! The `infermesh` binary: parse flags, start telemetry, run the command.

use clap::Parser;
use infermesh_gateway::cli::{Cli, run};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _telemetry = infermesh_telemetry::init("infermesh", cli.otlp_endpoint.as_deref())?;
    run(cli).await?;
    Ok(())
}
