use clap::Parser;
use meshctl::cmd;

#[derive(Debug, Parser)]
#[command(
    name = "meshctl",
    version,
    about = "Operate the mesh: bootstrap proxies, inspect and change routing"
)]
struct Cli {
    #[command(flatten)]
    context: cmd::Context,
    #[command(subcommand)]
    command: cmd::Command,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match cmd::run(cli.command, &cli.context) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
