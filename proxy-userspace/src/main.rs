use anyhow::Result;
use clap::Parser;
use proxy_userspace::{
    bpffs,
    cli::{Cli, Command, LogFormat},
    datapath, inspect, run,
};
use tracing_subscriber::EnvFilter;

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only for a terminal, not in log files and collectors.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => {
            init_logging(args.log_format);
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(run::run(args))
        }
        Command::Cleanup { bpffs: root } => {
            init_logging(LogFormat::Text);
            datapath::cleanup(&root)?;
            bpffs::release(&root)?;
            tracing::info!(path = %root.display(), "removed every link and pin");
            Ok(())
        }
        Command::Inspect(args) => {
            print!("{}", inspect::render(&args.bpffs, args.what, args.output)?);
            Ok(())
        }
    }
}
