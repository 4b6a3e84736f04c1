//! The `infermesh` binary: parse flags, start telemetry, run the command.

use clap::Parser;
use infermesh_gateway::cli::{Cli, run};
use infermesh_gateway::heap;

fn main() -> anyhow::Result<()> {
    pin_thread_count();
    heap::limit_arenas();
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(async {
        let cli = Cli::parse();
        let _telemetry = infermesh_telemetry::init("infermesh", cli.otlp_endpoint.as_deref())?;
        heap::trim_after_bursts();
        run(cli).await?;
        Ok(())
    })
}

/// candle asks for its thread count on every f32 matmul, and without
/// `RAYON_NUM_THREADS` it counts physical cores by parsing /proc/cpuinfo
/// each time (several percent of decode). Fixing it once here, before any
/// thread exists, keeps that off the hot path; an explicit setting wins.
fn pin_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let threads = std::thread::available_parallelism().map_or(1, usize::from);
        // SAFETY: no other thread has started yet, so nothing reads the
        // environment concurrently.
        #[allow(unsafe_code)]
        unsafe {
            std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
        }
    }
}
