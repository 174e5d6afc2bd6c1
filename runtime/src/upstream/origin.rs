//! Where a channel's requests go: scheme, host, port and an optional path prefix, parsed from its
//! `base_url`. Pure.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    Http,
    Https,
}

/// The connection-pool key of an upstream, plus the path prefix requests are sent under.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Origin {
    pub scheme: Scheme,
    pub host: String,
    pub port: u16,
    /// Path prefix from the base URL without a trailing slash (`""` for a bare origin).
    pub prefix: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginError(pub String);

impl fmt::Display for OriginError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Origin {
    /// Parses `http(s)://host[:port][/prefix]`. IPv6 hosts are written in brackets.
    pub fn parse(base_url: &str) -> Result<Origin, OriginError> {
        let bad = |why: &str| OriginError(format!("invalid base_url {base_url:?}: {why}"));
        let (scheme, rest) = if let Some(r) = base_url.strip_prefix("https://") {
            (Scheme::Https, r)
        } else if let Some(r) = base_url.strip_prefix("http://") {
            (Scheme::Http, r)
        } else {
            return Err(bad("must start with http:// or https://"));
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.contains('@') {
            return Err(bad("credentials in the URL are not supported"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let end = v6.find(']').ok_or_else(|| bad("unclosed [ in host"))?;
            let host = &v6[..end];
            let port = match &v6[end + 1..] {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or_else(|| bad("junk after ]"))?),
            };
            (host, port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(bad("empty host"));
        }
        let port = match port {
            Some(p) => p.parse::<u16>().map_err(|_| bad("port is not a number"))?,
            None => match scheme {
                Scheme::Http => 80,
                Scheme::Https => 443,
            },
        };
        let prefix = path.split(['?', '#']).next().unwrap_or("").trim_end_matches('/').to_string();
        Ok(Origin { scheme, host: host.to_string(), port, prefix })
    }

    /// The `Host` header value.
    pub fn host_header(&self) -> String {
        let default = matches!((self.scheme, self.port), (Scheme::Http, 80) | (Scheme::Https, 443));
        let host = if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() };
        if default { host } else { format!("{host}:{}", self.port) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_scheme_host_port_and_prefix() {
        let o = Origin::parse("https://api.openai.com").unwrap();
        assert_eq!(
            (o.scheme, o.host.as_str(), o.port, o.prefix.as_str()),
            (Scheme::Https, "api.openai.com", 443, "")
        );
        let o = Origin::parse("http://127.0.0.1:8080/proxy/").unwrap();
        assert_eq!((o.port, o.prefix.as_str()), (8080, "/proxy"));
        assert_eq!(o.host_header(), "127.0.0.1:8080");
        let o = Origin::parse("http://[::1]:9000").unwrap();
        assert_eq!((o.host.as_str(), o.port), ("::1", 9000));
        assert_eq!(o.host_header(), "[::1]:9000");
    }

    #[test]
    fn refuses_what_it_cannot_reach() {
        for bad in ["ftp://x", "api.openai.com", "http://", "http://h:port", "http://u:p@h", "http://[::1"] {
            assert!(Origin::parse(bad).is_err(), "{bad}");
        }
    }
}
