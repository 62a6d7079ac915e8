//! `udpvid://host[:port]/path` URIs.
//!
//! The path is percent-encoded in the URI and decoded here; it is the
//! file's path relative to the server's folder. IPv6 hosts are written in
//! brackets, as in any URI: `udpvid://[::1]:50000/movie.mp4`.

use std::fmt;

use percent_encoding::{AsciiSet, CONTROLS, percent_decode_str, utf8_percent_encode};

pub const SCHEME: &str = "udpvid";
/// The server's default port (the seed design's).
pub const DEFAULT_PORT: u16 = 50000;

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

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub host: String,
    pub port: u16,
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
        let (host, port, path) = Self::parse_parts(uri)?;
        if path.is_empty() {
            return Err(LocationError(format!(
                "invalid udpvid URI {uri:?}: no file path"
            )));
        }
        Ok(Location { host, port, path })
    }

    /// A server's URI without a file, `udpvid://host[:port]/`: its host and
    /// port (what a player lists the catalog of).
    pub fn parse_server(uri: &str) -> Result<(String, u16), LocationError> {
        let (host, port, path) = Self::parse_parts(uri)?;
        if !path.is_empty() {
            return Err(LocationError(format!(
                "{uri:?} names a file; a server is udpvid://host[:port]/"
            )));
        }
        Ok((host, port))
    }

    fn parse_parts(uri: &str) -> Result<(String, u16, String), LocationError> {
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
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
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
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_owned(), Some(p)),
                None => (authority.to_owned(), None),
            }
        };
        if host.is_empty() {
            return Err(err("no host"));
        }
        let port = match port {
            None | Some("") => DEFAULT_PORT,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| err("port must be a number from 1 to 65535"))?,
        };
        let path = percent_decode_str(path)
            .decode_utf8()
            .map_err(|_| err("path is not UTF-8 once decoded"))?
            .into_owned();
        Ok((host, port, path))
    }

    pub fn to_uri(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        format!(
            "{SCHEME}://{host}:{}/{}",
            self.port,
            utf8_percent_encode(&self.path, PATH_ESCAPES)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(host: &str, port: u16, path: &str) -> Location {
        Location {
            host: host.into(),
            port,
            path: path.into(),
        }
    }

    #[test]
    fn a_server_uri_has_no_file() {
        assert_eq!(
            Location::parse_server("udpvid://192.0.2.1:5000/"),
            Ok(("192.0.2.1".into(), 5000))
        );
        assert_eq!(
            Location::parse_server("udpvid://[::1]/"),
            Ok(("::1".into(), DEFAULT_PORT))
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
