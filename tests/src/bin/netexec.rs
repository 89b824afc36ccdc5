//! `kproxy-netexec`: the lab's TCP/UDP test server (see `kproxy_tests::netexec`).

use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::{Context, Result, ensure};
use clap::Parser;
use kproxy_tests::netexec::{Config, serve};

/// Answers every TCP request line / UDP datagram with `NAME CLIENT_IP:CLIENT_PORT`.
#[derive(Debug, Parser)]
#[command(name = "kproxy-netexec", version)]
struct Args {
    /// Name put in every answer (the lab uses the pod name).
    #[arg(long)]
    name: String,
    /// TCP ports to serve, comma separated.
    #[arg(long, value_delimiter = ',')]
    tcp: Vec<u16>,
    /// UDP ports to serve, comma separated.
    #[arg(long, value_delimiter = ',')]
    udp: Vec<u16>,
    /// Address to bind.
    #[arg(long, default_value = "0.0.0.0")]
    bind: Ipv4Addr,
    /// An IPv6 address to serve the same ports on as well.
    #[arg(long)]
    bind6: Option<Ipv6Addr>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(!args.tcp.is_empty() || !args.udp.is_empty(), "give at least one --tcp or --udp port");
    let config = Config {
        name: args.name,
        bind: args.bind,
        bind6: args.bind6,
        tcp_ports: args.tcp,
        udp_ports: args.udp,
    };
    let server = serve(&config).context("starting netexec")?;
    eprintln!("netexec {}: tcp {:?} udp {:?}", config.name, server.tcp, server.udp);
    server.wait();
    Ok(())
}
