//! `lifeline-agent`: beside the customer's PBX. All logic lives in `lifeline::agent`.

use clap::Parser;

#[tokio::main]
async fn main() {
    let cli = lifeline::agent::cli::Cli::parse();
    std::process::exit(lifeline::agent::cli::run(cli).await);
}
