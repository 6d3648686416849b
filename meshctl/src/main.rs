use clap::Parser;
use meshctl::cmd::{self, Cli};

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
