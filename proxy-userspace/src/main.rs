use std::process::ExitCode;

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

/// An error as one line: an operator reads it in `kubectl logs` or a
/// journal, where a multi-line chain is split apart.
fn one_line(e: &anyhow::Error) -> String {
    let text = format!("{e:#}");
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn main() -> ExitCode {
    match run_command() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // In the log's own format once logging is set up (run).
            if tracing::dispatcher::has_been_set() {
                tracing::error!("{}", one_line(&e));
            } else {
                eprintln!("kube-ebpf-proxy: {}", one_line(&e));
            }
            ExitCode::FAILURE
        }
    }
}

fn run_command() -> Result<()> {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches)?;
    match cli.command {
        Command::Run(mut args) => {
            let given = matches
                .subcommand_matches("run")
                .expect("the run subcommand was parsed");
            let paths = args.config.clone();
            let (merged, ignored) =
                config::load_all(&paths, *args, &config::given_on_command_line(given))?;
            *args = merged;
            init_logging(args.log_format, args.log_level.as_deref());
            // Once, at start: the files are read once.
            for i in ignored {
                tracing::warn!(field = %i.field, value = %i.value, reason = i.why,
                    "kube-proxy setting ignored");
            }
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
            inspect::require_pins(&args.bpffs)?;
            print!("{}", inspect::render(&args.bpffs, args.what, args.output)?);
            Ok(())
        }
    }
}
