//! A veth pair into a network namespace of the caller's own, with a `tc
//! tbf` on the namespace's egress (towards the host side), removed on
//! drop. Shared by the tests (`never_freeze`) and the load generator
//! (`load shaped`). Needs root and iproute2.

use std::process::{Command, Stdio};

pub struct ShapedLink {
    pub name: String,
    host_if: String,
    peer_if: String,
    subnet: String,
}

fn run(args: &[&str]) -> Result<(), String> {
    let ok = Command::new(args[0])
        .args(&args[1..])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        Ok(())
    } else {
        Err(format!("{args:?} failed (needs root and iproute2)"))
    }
}

impl ShapedLink {
    /// Namespace `udpvid-{tag}-PID`, host address `{subnet}.1`, the
    /// namespace's `{subnet}.2` (`subnet`: three octets); `tbf` are the
    /// qdisc's parameters (`rate 20mbit burst 32kbit latency 100ms`). `tag`
    /// is at most 4 characters (interface names hold 15).
    pub fn create(tag: &str, subnet: &str, tbf: &[&str]) -> Result<ShapedLink, String> {
        let pid = std::process::id();
        let host_if = format!("uv{tag}{}", pid % 100_000);
        let link = ShapedLink {
            name: format!("udpvid-{tag}-{pid}"),
            peer_if: format!("{host_if}p"),
            host_if,
            subnet: subnet.to_string(),
        };
        // Left over by a run that was killed.
        let _ = run(&["ip", "netns", "del", &link.name]);
        let _ = run(&["ip", "link", "del", &link.host_if]);
        run(&["ip", "netns", "add", &link.name])?;
        run(&[
            "ip",
            "link",
            "add",
            &link.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &link.peer_if,
        ])?;
        run(&["ip", "link", "set", &link.peer_if, "netns", &link.name])?;
        run(&[
            "ip",
            "addr",
            "add",
            &format!("{}/24", link.host_addr()),
            "dev",
            &link.host_if,
        ])?;
        run(&["ip", "link", "set", &link.host_if, "up"])?;
        link.inside(&[
            "ip",
            "addr",
            "add",
            &format!("{}/24", link.server_addr()),
            "dev",
            &link.peer_if,
        ])?;
        link.inside(&["ip", "link", "set", &link.peer_if, "up"])?;
        link.inside(&["ip", "link", "set", "lo", "up"])?;
        let mut qdisc = vec!["tc", "qdisc", "add", "dev", &link.peer_if, "root", "tbf"];
        qdisc.extend_from_slice(tbf);
        link.inside(&qdisc)?;
        Ok(link)
    }

    /// The host side's address.
    pub fn host_addr(&self) -> String {
        format!("{}.1", self.subnet)
    }

    /// The address inside the namespace, where servers listen.
    pub fn server_addr(&self) -> String {
        format!("{}.2", self.subnet)
    }

    /// Runs `args` inside the namespace.
    pub fn inside(&self, args: &[&str]) -> Result<(), String> {
        let mut all = vec!["ip", "netns", "exec", &self.name];
        all.extend_from_slice(args);
        run(&all)
    }

    /// Datagrams (or segments) the qdisc passed and dropped so far.
    #[allow(dead_code)]
    pub fn counts(&self) -> Option<(u64, u64)> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "tc", "-s", "qdisc", "show"])
            .args(["dev", &self.peer_if])
            .output()
            .ok()?;
        // " Sent 1234 bytes 56 pkt (dropped 7, overlimits 8 requeues 0)"
        let text = String::from_utf8_lossy(&out.stdout);
        let words: Vec<&str> = text.split_whitespace().collect();
        let before = |key: &str| {
            let i = words.iter().position(|w| *w == key)?;
            words.get(i.checked_sub(1)?)?.parse().ok()
        };
        let after = |key: &str| {
            let i = words.iter().position(|w| *w == key)?;
            words.get(i + 1)?.trim_end_matches(',').parse().ok()
        };
        Some((before("pkt")?, after("(dropped")?))
    }
}

impl Drop for ShapedLink {
    fn drop(&mut self) {
        let _ = run(&["ip", "netns", "del", &self.name]);
        let _ = run(&["ip", "link", "del", &self.host_if]);
    }
}
