//! The HTTP peer's configuration, shared by the benchmark and the load
//! generator so that both compare against the same nginx: one worker (one
//! core, as the udpvid server is given), sendfile, no access log.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::cpu_affinity;

/// Writes `work/nginx.conf` serving `root` on `listen` (`host:port`) for up
/// to `connections` clients, and returns its path. Run it with
/// `nginx -c CONF -p WORK`.
pub fn write_conf(
    work: &Path,
    root: &Path,
    listen: &str,
    connections: usize,
) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(work.join("logs"))?;
    let conf = work.join("nginx.conf");
    // A worker needs a descriptor per connection and a few of its own.
    let files = connections * 2 + 64;
    std::fs::write(
        &conf,
        format!(
            "daemon off; master_process off; worker_processes 1; worker_rlimit_nofile {files};\n\
             pid {w}/nginx.pid; error_log stderr crit;\n\
             events {{ worker_connections {connections}; }}\n\
             http {{ access_log off; sendfile on; tcp_nopush on; default_type application/octet-stream;\n\
             client_body_temp_path {w}; proxy_temp_path {w}; fastcgi_temp_path {w}; uwsgi_temp_path {w}; scgi_temp_path {w};\n\
             server {{ listen {listen}; root {root}; }} }}\n",
            w = work.display(),
            root = root.display(),
        ),
    )?;
    Ok(conf)
}

/// Starts nginx on a free port of loopback serving `root` for up to
/// `connections` clients (its files under `work`), and waits until it
/// accepts. Returns the process and its port.
pub fn start(
    root: &Path,
    work: &Path,
    connections: usize,
    cpus: Option<Vec<usize>>,
) -> (Child, u16) {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port");
    let conf =
        write_conf(work, root, &format!("127.0.0.1:{port}"), connections).expect("nginx.conf");
    let child = launch(&conf, work, None, cpus, "127.0.0.1", port);
    (child, port)
}

/// Starts nginx with `conf` (from [`write_conf`], listening on
/// `host:port`), inside network namespace `netns` if given, on `cpus` if
/// given, and waits until it accepts.
pub fn launch(
    conf: &Path,
    work: &Path,
    netns: Option<&str>,
    cpus: Option<Vec<usize>>,
    host: &str,
    port: u16,
) -> Child {
    let mut command = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "nginx"]);
            c
        }
        None => Command::new("nginx"),
    };
    command
        .arg("-c")
        .arg(conf)
        .arg("-p")
        .arg(work)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(cpus) = cpus {
        cpu_affinity::pin_command(&mut command, cpus);
    }
    let child = command
        .spawn()
        .expect("nginx starts (apt-get install nginx)");
    for _ in 0..100 {
        if TcpStream::connect((host, port)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}
