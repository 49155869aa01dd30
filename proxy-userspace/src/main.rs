use anyhow::Result;
use clap::{CommandFactory, FromArgMatches};
use proxy_userspace::{
    cli::{Cli, Command, LogFormat},
    config, daemon,
    datapath::{self, bpffs},
    inspect,
};
use tracing_subscriber::EnvFilter;

fn init_logging(format: LogFormat, level: Option<&str>) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(level.unwrap_or("info")));
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
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches)?;
    match cli.command {
        Command::Run(mut args) => {
            if let Some(path) = args.config.clone() {
                let file = config::load(&path)?;
                let given = matches
                    .subcommand_matches("run")
                    .expect("the run subcommand was parsed");
                *args = config::merge(&file, *args, &config::given_on_command_line(given));
            }
            init_logging(args.log_format, args.log_level.as_deref());
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(daemon::run(*args))
        }
        Command::Cleanup { bpffs: root } => {
            init_logging(LogFormat::Text, None);
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
