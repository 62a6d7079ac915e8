//! udpvid as users install and embed it: `make install` into a prefix
//! makes `gst-inspect-1.0` find the element with nothing but that prefix's
//! plugin folder, `make uninstall` leaves no file behind, and the Python
//! snippet of the README (examples/play.py, PyGObject) plays a `udpvid://`
//! URI through playbin to the end.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{Server, clips};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// gst-inspect-1.0 that sees only `plugins` (and a registry of its own).
fn inspect_with_only(plugins: &Path, registry: &Path) -> Output {
    Command::new("gst-inspect-1.0")
        .arg("udpvidsrc")
        .env_remove("GST_PLUGIN_PATH")
        .env_remove("GST_PLUGIN_PATH_1_0")
        .env("GST_PLUGIN_SYSTEM_PATH_1_0", plugins)
        .env("GST_REGISTRY_1_0", registry)
        .output()
        .expect("gst-inspect-1.0 runs")
}

#[test]
fn make_install_and_uninstall_into_a_prefix() {
    let prefix = std::env::temp_dir().join(format!("udpvid-prefix-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&prefix);
    let plugins = prefix.join("lib/gstreamer-1.0");
    let bin = prefix.join("bin");
    let make = |target: &str| {
        let out = Command::new("make")
            .arg("-C")
            .arg(repo())
            .arg(target)
            // A debug build: the test checks where files go, not speed.
            .arg("PROFILE=debug")
            .arg(format!("PLUGINDIR={}", plugins.display()))
            .arg(format!("BINDIR={}", bin.display()))
            .output()
            .expect("make runs");
        assert!(
            out.status.success(),
            "make {target} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    // Before: nothing there, nothing found.
    let empty = prefix.join("empty");
    std::fs::create_dir_all(&empty).expect("empty dir");
    let before = inspect_with_only(&empty, &prefix.join("registry-before.bin"));
    assert!(
        !before.status.success(),
        "udpvidsrc found without the plugin"
    );

    make("install");
    let installed = files_under(&prefix);
    assert!(plugins.join("libgstudpvid.so").is_file(), "{installed:?}");
    let found = inspect_with_only(&plugins, &prefix.join("registry.bin"));
    let text = String::from_utf8_lossy(&found.stdout);
    assert!(
        found.status.success() && text.contains("udpvid source"),
        "gst-inspect-1.0 did not find udpvidsrc in {}:\n{text}{}",
        plugins.display(),
        String::from_utf8_lossy(&found.stderr)
    );
    let help = Command::new(bin.join("server"))
        .arg("--help")
        .output()
        .expect("installed server runs");
    assert!(help.status.success());
    assert!(String::from_utf8_lossy(&help.stdout).contains("--dir"));

    make("uninstall");
    let left: Vec<PathBuf> = files_under(&prefix)
        .into_iter()
        .filter(|p| !p.starts_with(&empty) && p.extension().is_none_or(|e| e != "bin"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    let _ = std::fs::remove_dir_all(&prefix);
}

#[test]
fn the_python_snippet_plays_a_udpvid_uri_with_playbin() {
    let clips = clips();
    let server = Server::start(&clips.dir, &[]);
    // Debian's python3 has PyGObject (python3-gi); a python3 earlier on
    // PATH (pyenv, a venv) may not.
    let python = ["/usr/bin/python3", "python3"]
        .into_iter()
        .find(|p| {
            Command::new(p)
                .args(["-c", "import gi"])
                .status()
                .is_ok_and(|s| s.success())
        })
        .expect("a python3 with PyGObject (apt install python3-gi gir1.2-gstreamer-1.0)");
    let out = Command::new(python)
        .arg(repo().join("examples/play.py"))
        .arg("--headless")
        .arg(format!("udpvid://127.0.0.1:{}/movie.mp4", server.port))
        .env("GST_PLUGIN_PATH", common::plugin_dir())
        .output()
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("EOS at 5.0 s"),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A missing file is the element's clear error, and a failing exit.
    let out = Command::new(python)
        .arg(repo().join("examples/play.py"))
        .arg("--headless")
        .arg(format!("udpvid://127.0.0.1:{}/nope.mp4", server.port))
        .env("GST_PLUGIN_PATH", common::plugin_dir())
        .output()
        .expect("python runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));
}

#[test]
fn the_systemd_unit_is_valid() {
    // systemd checks the unit as `make install-service` writes it (no
    // systemd needs to run for that); skipped where systemd is not there.
    let Ok(status) = Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("systemd-analyze not found: unit not checked");
        return;
    };
    assert!(status.status.success());
    let unit = std::fs::read_to_string(repo().join("server/udpvid.service")).expect("unit");
    let bindir = common::server_binary()
        .parent()
        .expect("server dir")
        .to_path_buf();
    let unit = unit.replace("@BINDIR@", &bindir.display().to_string());
    for needed in [
        "DynamicUser=yes",
        "ReadOnlyPaths=/srv/udpvid",
        "Restart=on-failure",
    ] {
        assert!(unit.contains(needed), "{needed} missing");
    }
    let dir = std::env::temp_dir().join(format!("udpvid-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("udpvid.service");
    std::fs::write(&path, unit).expect("write unit");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze runs");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
