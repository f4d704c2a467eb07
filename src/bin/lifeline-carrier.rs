//! `lifeline-carrier`: the trunk server. All logic lives in `lifeline::carrier`.

use clap::Parser;

/// Every SIP message is parsed into, and sent from, many small allocations that another
/// thread may free: mimalloc serves that pattern with a fraction of glibc malloc's time.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let cli = lifeline::carrier::cli::Cli::parse();
    let loaded = lifeline::carrier::cli::settings(&cli);
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    // A configuration that does not load is reported by `run`, on the default runtime.
    if let Ok(settings) = &loaded
        && settings.raw.worker_threads > 0
    {
        runtime.worker_threads(settings.raw.worker_threads);
    }
    let runtime = runtime
        .enable_all()
        .build()
        .expect("the async runtime starts");
    std::process::exit(runtime.block_on(lifeline::carrier::cli::run(cli, loaded)));
}
