//! `lifeline-carrier`: the trunk server. All logic lives in `lifeline::carrier`.

use clap::Parser;

#[tokio::main]
async fn main() {
    let cli = lifeline::carrier::cli::Cli::parse();
    std::process::exit(lifeline::carrier::cli::run(cli).await);
}
