//! Stopping `examples/impair` for its report, shared by the tests and the
//! load generator so both read the proxy's counts the same way.

use std::io::Read;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// How long a proxy told to stop may take to print its report and exit.
const REPORT_WAIT: Duration = Duration::from_secs(5);

/// Stops the proxy as an operator would (SIGTERM), which makes it print
/// what each direction carried, and returns that report (empty if it did
/// not exit within [`REPORT_WAIT`]: it is then killed). Its stdout must be
/// piped and not yet taken.
pub fn stop_for_report(proxy: &mut Child) -> String {
    let _ = Command::new("kill").arg(proxy.id().to_string()).status();
    let deadline = Instant::now() + REPORT_WAIT;
    while proxy.try_wait().ok().flatten().is_none() {
        if Instant::now() > deadline {
            let _ = proxy.kill();
            let _ = proxy.wait();
            return String::new();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut report = String::new();
    if let Some(stdout) = proxy.stdout.as_mut() {
        let _ = stdout.read_to_string(&mut report);
    }
    report
}

/// The down direction's line of a report (what the server sent).
// The tests read the whole report, so they leave this unused.
#[allow(dead_code)]
pub fn server_to_client(report: &str) -> Option<&str> {
    report
        .lines()
        .find_map(|l| l.strip_prefix("down (server -> client): "))
}
