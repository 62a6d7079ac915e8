//! Lists what a udpvid server offers.
//!
//! ```text
//! cargo run --example catalog -- 127.0.0.1 [port]
//! ```

use std::process::ExitCode;
use std::time::Duration;

use gstudpvid::blocking_client::BlockingClient;
use gstudpvid::protocol::ClientConfig;
use gstudpvid::protocol::catalog::human_size;

const DEFAULT_PORT: u16 = 50000;
const TIMEOUT: Duration = Duration::from_secs(5);

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let host = args.next().unwrap_or_else(|| "127.0.0.1".into());
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
