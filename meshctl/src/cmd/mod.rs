//! One module per subcommand.

pub mod bootstrap;

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Print a bootstrap with which a proxy joins the mesh.
    #[command(subcommand)]
    Bootstrap(bootstrap::Bootstrap),
}

pub fn run(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::Bootstrap(b) => bootstrap::run(b, &mut std::io::stdout()),
    }
}
