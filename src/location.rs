//! `udpvid://host[:port][,host[:port]…]/path` URIs.
//!
//! The path is percent-encoded in the URI and decoded here; it is the
//! file's path relative to the server's folder. IPv6 hosts are written in
//! brackets, as in any URI: `udpvid://[::1]:50000/movie.mp4`. Several
//! servers are written as PostgreSQL writes them,
//! `udpvid://a.example,b.example:6000/movie.mp4`: the client tries them in
//! order and moves to the next one if the one in use fails.

use std::fmt;

use percent_encoding::{AsciiSet, CONTROLS, percent_decode_str, utf8_percent_encode};

pub const SCHEME: &str = "udpvid";
/// The server's default port (the seed design's).
pub const DEFAULT_PORT: u16 = 50000;
/// Servers one URI or host list may name: enough for any failover group,
/// and a bound on what one string makes the client resolve.
pub const MAX_SERVERS: usize = 16;

/// Characters escaped in a path segment: everything outside RFC 3986's
/// unreserved set and the `/` that separates folders.
const PATH_ESCAPES: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'[')
    .add(b']')
    .add(b'\\')
    .add(b'^')
    .add(b'`')
    .add(b'{')
    .add(b'|')
    .add(b'}');

/// One server: a name or address and a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// Tried in order; never empty.
    pub servers: Vec<HostPort>,
    pub path: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocationError(pub String);

impl fmt::Display for LocationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for LocationError {}

impl Location {
    pub fn parse(uri: &str) -> Result<Location, LocationError> {
        let (servers, path) = Self::parse_parts(uri)?;
        if path.is_empty() {
            return Err(LocationError(format!(
                "invalid udpvid URI {uri:?}: no file path"
            )));
        }
        Ok(Location { servers, path })
    }

    /// A server's URI without a file, `udpvid://host[:port]/`: its
    /// servers (what a player lists the catalog of).
    pub fn parse_server(uri: &str) -> Result<Vec<HostPort>, LocationError> {
        let (servers, path) = Self::parse_parts(uri)?;
        if !path.is_empty() {
            return Err(LocationError(format!(
                "{uri:?} names a file; a server is udpvid://host[:port]/"
            )));
        }
        Ok(servers)
    }

    fn parse_parts(uri: &str) -> Result<(Vec<HostPort>, String), LocationError> {
        let err = |why: &str| LocationError(format!("invalid udpvid URI {uri:?}: {why}"));
        let (scheme, rest) = uri
            .split_once("://")
            .ok_or_else(|| err("expected udpvid://host[:port]/path"))?;
        if !scheme.eq_ignore_ascii_case(SCHEME) {
            return Err(err("the scheme must be udpvid"));
        }
        let (authority, path) = rest.split_once('/').ok_or_else(|| err("no file path"))?;
        // Query and fragment have no meaning here; refuse rather than ignore.
        if path.contains('?') || path.contains('#') {
            return Err(err("query or fragment not supported"));
        }
        if authority.contains('@') {
            return Err(err("user information not supported"));
        }
        let servers = parse_host_list(authority, DEFAULT_PORT).map_err(|e| err(&e.0))?;
        let path = percent_decode_str(path)
            .decode_utf8()
            .map_err(|_| err("path is not UTF-8 once decoded"))?
            .into_owned();
        Ok((servers, path))
    }

    pub fn to_uri(&self) -> String {
        format!(
            "{SCHEME}://{}/{}",
            format_host_list(&self.servers),
            utf8_percent_encode(&self.path, PATH_ESCAPES)
        )
    }
}

/// `host[:port][,host[:port]…]`, as in a URI or the element's `host`
/// property; entries without a port get `default_port`. A bare IPv6
/// address (more than one colon, no brackets) is one host without a port.
pub fn parse_host_list(list: &str, default_port: u16) -> Result<Vec<HostPort>, LocationError> {
    let entries: Vec<&str> = list.split(',').map(str::trim).collect();
    if entries.len() > MAX_SERVERS {
        return Err(LocationError(format!(
            "more than {MAX_SERVERS} servers in {list:?}"
        )));
    }
    entries
        .into_iter()
        .map(|entry| parse_host_port(entry, default_port))
        .collect()
}

/// The list as [`parse_host_list`] reads it, every port written out.
pub fn format_host_list(servers: &[HostPort]) -> String {
    servers
        .iter()
        .map(HostPort::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn parse_host_port(entry: &str, default_port: u16) -> Result<HostPort, LocationError> {
    let err = |why: &str| LocationError(format!("{why} in {entry:?}"));
    if entry.contains('@') {
        return Err(err("user information not supported"));
    }
    let (host, port) = if let Some(v6) = entry.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| err("unclosed [ in host"))?;
        if host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(err("bad IPv6 address"));
        }
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or_else(|| err("junk after ]"))?),
        };
        (host.to_owned(), port)
    } else if entry.matches(':').count() > 1 {
        if entry.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(err("bad IPv6 address (write [address]:port)"));
        }
        (entry.to_owned(), None)
    } else {
        match entry.rsplit_once(':') {
            Some((h, p)) => (h.to_owned(), Some(p)),
            None => (entry.to_owned(), None),
        }
    };
    if host.is_empty() {
        return Err(err("no host"));
    }
    let port = match port {
        None | Some("") => default_port,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| err("port must be a number from 1 to 65535"))?,
    };
    Ok(HostPort { host, port })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hp(host: &str, port: u16) -> HostPort {
        HostPort {
            host: host.into(),
            port,
        }
    }

    fn loc(host: &str, port: u16, path: &str) -> Location {
        Location {
            servers: vec![hp(host, port)],
            path: path.into(),
        }
    }

    #[test]
    fn a_server_uri_has_no_file() {
        assert_eq!(
            Location::parse_server("udpvid://192.0.2.1:5000/"),
            Ok(vec![hp("192.0.2.1", 5000)])
        );
        assert_eq!(
            Location::parse_server("udpvid://[::1]/"),
            Ok(vec![hp("::1", DEFAULT_PORT)])
        );
        assert!(Location::parse_server("udpvid://h/movie.mp4").is_err());
        assert!(Location::parse_server("udpvid://h").is_err());
        assert!(Location::parse("udpvid://h/").is_err());
    }

    #[test]
    fn parses_valid_uris() {
        assert_eq!(
            Location::parse("udpvid://127.0.0.1:5000/movie.mp4"),
            Ok(loc("127.0.0.1", 5000, "movie.mp4"))
        );
        assert_eq!(
            Location::parse("udpvid://media.example/dir/a.mkv"),
            Ok(loc("media.example", DEFAULT_PORT, "dir/a.mkv"))
        );
        assert_eq!(
            Location::parse("UDPVID://host:/x.ts"),
            Ok(loc("host", DEFAULT_PORT, "x.ts"))
        );
        assert_eq!(
            Location::parse("udpvid://[::1]:6000/my%20movie%C3%A9.mp4"),
            Ok(loc("::1", 6000, "my movieé.mp4"))
        );
        assert_eq!(
            Location::parse("udpvid://[fe80::1]/a%2Fb"),
            Ok(loc("fe80::1", DEFAULT_PORT, "a/b"))
        );
    }

    #[test]
    fn several_servers_are_listed_as_postgresql_lists_hosts() {
        assert_eq!(
            Location::parse("udpvid://a.example,b.example:6000,[::1]:7/m.mp4"),
            Ok(Location {
                servers: vec![
                    hp("a.example", DEFAULT_PORT),
                    hp("b.example", 6000),
                    hp("::1", 7)
                ],
                path: "m.mp4".into()
            })
        );
        assert_eq!(
            parse_host_list("h1:5000, h2 ,::1", 9),
            Ok(vec![hp("h1", 5000), hp("h2", 9), hp("::1", 9)])
        );
        assert_eq!(
            format_host_list(&[hp("h1", 5000), hp("::1", 9)]),
            "h1:5000,[::1]:9"
        );
        for bad in ["", "h1,", ",h2", "h1,h2:0", "h1,[::1", "a:b:c", "u@h"] {
            assert!(parse_host_list(bad, 9).is_err(), "{bad:?} accepted");
        }
        let many = vec!["h"; MAX_SERVERS + 1].join(",");
        assert!(parse_host_list(&many, 9).is_err());
        assert!(parse_host_list(&vec!["h"; MAX_SERVERS].join(","), 9).is_ok());
    }

    #[test]
    fn refuses_invalid_uris() {
        for bad in [
            "http://host/a.mp4",
            "udpvid:/host/a.mp4",
            "udpvid://host",
            "udpvid://host/",
            "udpvid:///a.mp4",
            "udpvid://host:99999/a.mp4",
            "udpvid://host:0/a.mp4",
            "udpvid://host:x/a.mp4",
            "udpvid://[::1/a.mp4",
            "udpvid://[nothex]/a.mp4",
            "udpvid://user@host/a.mp4",
            "udpvid://host/a.mp4?x=1",
            "udpvid://host/%FF.mp4",
            "udpvid://a,,b/a.mp4",
            "udpvid://a,/a.mp4",
        ] {
            assert!(Location::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn round_trips_through_text() {
        for l in [
            loc("127.0.0.1", 50000, "a b/c#d?.mp4"),
            loc("::1", 1, "100%.mkv"),
            loc("host", 7, "é/ü.webm"),
            Location {
                servers: vec![hp("a", 1), hp("::2", 2)],
                path: "x.ts".into(),
            },
        ] {
            assert_eq!(
                Location::parse(&l.to_uri()),
                Ok(l.clone()),
                "{}",
                l.to_uri()
            );
        }
    }
}
