//! Lists what a udpvid server offers, or, without a host, the servers that
//! announce themselves on the LAN (`server --announce`).
//!
//! ```text
//! cargo run --example catalog -- 127.0.0.1 [port]
//! cargo run --example catalog
//! ```

use std::process::ExitCode;
use std::time::Duration;

use gstudpvid::blocking_client::BlockingClient;
use gstudpvid::protocol::ClientConfig;
use gstudpvid::protocol::catalog::human_size;

const DEFAULT_PORT: u16 = 50000;
const TIMEOUT: Duration = Duration::from_secs(5);
/// How long answers to a multicast DNS query are collected.
const DISCOVERY_WAIT: Duration = Duration::from_secs(2);

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let Some(host) = args.next() else {
        return match gstudpvid::discovery::discover(DISCOVERY_WAIT) {
            Ok(servers) => {
                for s in &servers {
                    println!("{}  {}", s.uri(), s.name);
                }
                println!("{} servers found on the LAN", servers.len());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("catalog: {e}");
                ExitCode::FAILURE
            }
        };
    };
    let port = match args.next().map(|p| p.parse::<u16>()) {
        None => DEFAULT_PORT,
        Some(Ok(p)) => p,
        Some(Err(_)) => {
            eprintln!("usage: catalog [HOST] [PORT]  (PORT must be a number from 1 to 65535)");
            return ExitCode::from(2);
        }
    };
    let client = match BlockingClient::connect(&host, port, ClientConfig::default()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("catalog: cannot reach {host}:{port}: {e}");
            return ExitCode::FAILURE;
        }
    };
    match client.catalog(TIMEOUT) {
        Ok(entries) => {
            for e in &entries {
                println!("{:>12}  {:>10}  {}", e.size, human_size(e.size), e.name);
            }
            println!("{} files on {host}:{port}", entries.len());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("catalog: {host}:{port}: {e}");
            ExitCode::FAILURE
        }
    }
}
