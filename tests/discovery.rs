//! Servers found on the LAN (DNS-SD over multicast DNS, `_udpvid._udp`):
//! two servers announce, the catalog tool and `gst-device-monitor-1.0`
//! (the plugin's device provider) list both; one stops, and it
//! is no longer listed; the player's `udpvid:///` lists the server left
//! and plays from it. All inside a network namespace the test makes, with
//! multicast on its loopback, so nothing leaves the machine.

mod common;

use std::process::{Command, Output};

use common::{Server, clips};

struct Namespace {
    name: String,
}

impl Namespace {
    fn create() -> Namespace {
        let name = format!("udpvid-mdns-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).status();
        let ok = |args: &[&str]| {
            Command::new("ip")
                .args(args)
                .status()
                .is_ok_and(|s| s.success())
        };
        assert!(
            ok(&["netns", "add", &name]),
            "cannot create a network namespace: the discovery test needs root and iproute2"
        );
        let ns = Namespace { name };
        assert!(ok(&["-n", &ns.name, "link", "set", "lo", "up"]));
        assert!(ok(&[
            "-n",
            &ns.name,
            "link",
            "set",
            "lo",
            "multicast",
            "on"
        ]));
        ns
    }

    fn run(&self, program: &std::path::Path, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .arg(program)
            .args(args)
            .output()
            .expect("runs in the namespace")
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

#[test]
fn announced_servers_are_listed_and_a_stopped_one_disappears() {
    let clips = clips();
    let ns = Namespace::create();
    let mut a = Server::launch_in_namespace(
        &ns.name,
        &clips.dir,
        51001,
        &["--announce", "--name", "Living room"],
    );
    let mut b = Server::launch_in_namespace(
        &ns.name,
        &clips.dir,
        51002,
        &["--announce", "--name", "Attic"],
    );
    let catalog = common::example_binary("catalog");
    let list = |ns: &Namespace| {
        let out = ns.run(&catalog, &[]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let both = list(&ns);
    assert!(
        both.contains("udpvid://127.0.0.1:51001/  Living room"),
        "{both}"
    );
    assert!(both.contains("udpvid://127.0.0.1:51002/  Attic"), "{both}");
    assert!(both.contains("2 servers found"), "{both}");
    // Applications see them as GStreamer devices too.
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.name,
            "gst-device-monitor-1.0",
            "Source/Network",
        ])
        .env("GST_PLUGIN_PATH", common::plugin_dir())
        .output()
        .expect("gst-device-monitor-1.0 runs");
    let devices = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "name  : Living room",
        "uri = udpvid://127.0.0.1:51001/",
        "name  : Attic",
        "uri = udpvid://127.0.0.1:51002/",
    ] {
        assert!(devices.contains(needle), "{needle:?} not in:\n{devices}");
    }

    // One stops (SIGTERM: it withdraws its announcement on the way out).
    b.terminate();
    let one = list(&ns);
    assert!(
        one.contains("Living room") && !one.contains("Attic"),
        "{one}"
    );
    assert!(one.contains("1 servers found"), "{one}");

    // The player lists it and plays from its catalog.
    let player = common::example_binary("player");
    let out = ns.run(
        &player,
        &["--headless", "--pick", "movie.webm", "udpvid:///"],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("1 servers found on the LAN"), "{stdout}");
    assert!(stdout.contains("offers 4 files"), "{stdout}");
    assert!(stdout.contains("end of movie.webm"), "{stdout}");
    a.kill();
}
