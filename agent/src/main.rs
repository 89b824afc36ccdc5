//! The `kproxy` binary: the node agent and the operator commands.
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;
use kproxy::{
    agent,
    cli::{Cli, Command, ConntrackAction, ListAction, ListArgs, Output, show},
    config::Config,
    dataplane::{Dataplane as _, Dataplane6 as _, bpf::BpfDataplane, loader},
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kproxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn open(args: &ListArgs) -> anyhow::Result<BpfDataplane> {
    let pin_path = &args.pin.pin_path;
    kproxy::dataplane::loader::check_pinned_layouts(pin_path)
        .and_then(|()| BpfDataplane::open(pin_path))
        .with_context(|| format!("opening the maps pinned under {}", pin_path.display()))
}

fn print(output: Output, table: impl FnOnce() -> String, json: impl FnOnce() -> serde_json::Value) {
    match output {
        Output::Table => print!("{}", table()),
        Output::Json => println!("{:#}", json()),
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Agent(args) => {
            let config = match Config::from_args(*args) {
                Ok(c) => c,
                // Shown like clap's own errors on single flags (and the same exit status).
                Err(e) => {
                    clap::Error::raw(clap::error::ErrorKind::ArgumentConflict, format!("{e}\n"))
                        .exit()
                }
            };
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the runtime")?;
            rt.block_on(agent::run(config))
        }
        Command::Service { action: ListAction::List(args) } => {
            let dp = open(&args)?;
            let services = dp.services()?;
            let backends = dp.backends()?;
            // Pins of an agent from before the IPv6 maps have none.
            let (services6, backends6) = if dp.has_ipv6() {
                (dp.services6()?, dp.backends6()?)
            } else {
                (Vec::new(), Vec::new())
            };
            print(
                args.output,
                || show::services_table(&services, &backends, &services6, &backends6),
                || show::services_json(&services, &backends, &services6, &backends6),
            );
            Ok(())
        }
        Command::Conntrack { action: ConntrackAction::List(args) } => {
            let dp = open(&args.list)?;
            let now = kproxy::dataplane::monotonic_ns();
            if args.revnat {
                let entries = dp.revnat()?;
                print(
                    args.list.output,
                    || show::revnat_table(&entries, now),
                    || show::revnat_json(&entries, now),
                );
            } else {
                let entries = dp.conntrack()?;
                // Pins of an agent from before the IPv6 maps have none.
                let entries6 = if dp.has_ipv6() { dp.conntrack6()? } else { Vec::new() };
                print(
                    args.list.output,
                    || show::conntrack_table(&entries, &entries6, now),
                    || show::conntrack_json(&entries, &entries6, now),
                );
            }
            Ok(())
        }
        Command::Stats(args) => {
            let dp = open(&args)?;
            let counters = dp.counters()?;
            let mut ct: Vec<(String, u64)> =
                dp.conntrack_stats()?.rows().iter().map(|(k, v)| (k.to_string(), *v)).collect();
            // IPv6 rows beside them, named `conntrack6_*`.
            if let Some(s6) = dp.conntrack_stats6()? {
                ct.extend(
                    s6.rows().iter().map(|(k, v)| (k.replacen("conntrack", "conntrack6", 1), *v)),
                );
            }
            // The conntrack numbers follow the reasons, in the same columns / object.
            print(
                args.output,
                || {
                    let mut t = show::stats_table(&counters);
                    for (k, v) in &ct {
                        t += &format!("{k:<26} {:>5} {v:>14}\n", "");
                    }
                    t
                },
                || {
                    let mut j = show::stats_json(&counters);
                    for (k, v) in &ct {
                        j[k.as_str()] = (*v).into();
                    }
                    j
                },
            );
            Ok(())
        }
        Command::Map { action: ListAction::List(args) } => {
            let usage = kproxy::dataplane::usage::map_usage(&args.pin.pin_path, None)
                .with_context(|| {
                    format!("reading the maps pinned under {}", args.pin.pin_path.display())
                })?;
            print(args.output, || show::maps_table(&usage), || show::maps_json(&usage));
            Ok(())
        }
        Command::Device { action: ListAction::List(args) } => {
            let report = kproxy::netdev::attachments(&args.pin.pin_path)?;
            print(args.output, || report.table(), || report.json());
            Ok(())
        }
        Command::Cleanup(args) => loader::cleanup(&args.pin_path),
        Command::Features { output } => {
            let f = kproxy::dataplane::features::Features::probe();
            print(output, || f.table(), || f.json());
            Ok(())
        }
    }
}
