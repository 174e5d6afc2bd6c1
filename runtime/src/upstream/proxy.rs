//! Per-channel proxies: HTTP `CONNECT` tunnels (to an `http://` proxy in the clear, or to an
//! `https://` proxy over TLS) and SOCKS5 (RFC 1928, with RFC 1929 user/password), all opening a
//! tunnel to the upstream, over which TLS runs as usual for `https` origins.
//!
//! Parsing is pure; the handshakes run over any [`ByteStream`] and never block.

use std::io;

use base64::Engine;
use bytes::{Buf, Bytes, BytesMut};

use super::tls::ByteStream;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProxyKind {
    /// `http://`: an HTTP proxy asked for a `CONNECT` tunnel.
    Http,
    /// `https://`: the same, with the connection to the proxy itself in TLS (its certificate checked
    /// like an upstream's).
    Https,
    /// `socks5://` or `socks5h://`: the proxy resolves the upstream's host name.
    Socks5,
}

/// A channel's proxy, parsed from its `proxy` setting.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Proxy {
    pub kind: ProxyKind,
    pub host: String,
    pub port: u16,
    pub auth: Option<(String, String)>,
}

impl Proxy {
    /// Parses `http://[user:pass@]host:port`, `https://…` or `socks5://[user:pass@]host:port`.
    pub fn parse(url: &str) -> Result<Proxy, String> {
        let bad = |why: &str| format!("invalid proxy {:?}: {why}", redact(url));
        let (kind, rest, default_port) = if let Some(r) = url.strip_prefix("http://") {
            (ProxyKind::Http, r, 80)
        } else if let Some(r) = url.strip_prefix("https://") {
            (ProxyKind::Https, r, 443)
        } else if let Some(r) = url.strip_prefix("socks5://").or_else(|| url.strip_prefix("socks5h://")) {
            (ProxyKind::Socks5, r, 1080)
        } else {
            return Err(bad("must start with http://, https://, socks5:// or socks5h://"));
        };
        let rest = rest.trim_end_matches('/');
        if rest.contains('/') {
            return Err(bad("a proxy URL has no path"));
        }
        let (auth, hostport) = match rest.rsplit_once('@') {
            Some((cred, hp)) => {
                let (user, pass) = cred.split_once(':').unwrap_or((cred, ""));
                if user.len() > 255 || pass.len() > 255 {
                    return Err(bad("user name and password are at most 255 bytes"));
                }
                (Some((user.to_string(), pass.to_string())), hp)
            }
            None => (None, rest),
        };
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
                (h, p.parse::<u16>().map_err(|_| bad("port is not a number"))?)
            }
            _ => (hostport, default_port),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(bad("empty host"));
        }
        Ok(Proxy { kind, host: host.to_string(), port, auth })
    }

    /// Turns a connection to the proxy (TLS already established for `https://`) into a tunnel to
    /// `host:port`.
    pub async fn tunnel<S: ByteStream>(&self, mut tcp: S, host: &str, port: u16) -> io::Result<S> {
        match self.kind {
            ProxyKind::Http | ProxyKind::Https => self.http_connect(&mut tcp, host, port).await?,
            ProxyKind::Socks5 => self.socks5_connect(&mut tcp, host, port).await?,
        }
        Ok(tcp)
    }

    async fn http_connect<S: ByteStream>(&self, tcp: &mut S, host: &str, port: u16) -> io::Result<()> {
        let authority =
            if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
        let mut head = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n");
        if let Some((user, pass)) = &self.auth {
            let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
            head.push_str(&format!("Proxy-Authorization: Basic {token}\r\n"));
        }
        head.push_str("\r\n");
        tcp.write_all(Bytes::from(head)).await?;
        let mut buf = BytesMut::new();
        let end = loop {
            if let Some(i) = memchr::memmem::find(&buf, b"\r\n\r\n") {
                break i + 4;
            }
            if buf.len() > 16 * 1024 {
                return Err(proxy_err("the proxy's CONNECT answer is too large"));
            }
            if tcp.read_buf(&mut buf).await? == 0 {
                return Err(proxy_err("the proxy closed the connection during CONNECT"));
            }
        };
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        resp.parse(&buf[..end])
            .map_err(|e| proxy_err(&format!("the proxy's CONNECT answer is invalid: {e}")))?;
        match resp.code {
            Some(200..=299) if buf.len() == end => Ok(()),
            Some(200..=299) => Err(proxy_err("the proxy sent data before the tunnel opened")),
            Some(code) => Err(proxy_err(&format!("the proxy refused CONNECT with HTTP {code}"))),
            None => Err(proxy_err("the proxy's CONNECT answer has no status")),
        }
    }

    async fn socks5_connect<S: ByteStream>(&self, tcp: &mut S, host: &str, port: u16) -> io::Result<()> {
        let mut buf = BytesMut::new();
        let methods: &[u8] =
            if self.auth.is_some() { &[0x05, 0x02, 0x00, 0x02] } else { &[0x05, 0x01, 0x00] };
        tcp.write_all(Bytes::copy_from_slice(methods)).await?;
        let choice = read_exact(tcp, &mut buf, 2).await?;
        if choice[0] != 0x05 {
            return Err(proxy_err("the proxy does not speak SOCKS5"));
        }
        match (choice[1], &self.auth) {
            (0x00, _) => {}
            (0x02, Some((user, pass))) => {
                let mut req = vec![0x01, user.len() as u8];
                req.extend_from_slice(user.as_bytes());
                req.push(pass.len() as u8);
                req.extend_from_slice(pass.as_bytes());
                tcp.write_all(Bytes::from(req)).await?;
                let status = read_exact(tcp, &mut buf, 2).await?;
                if status[1] != 0x00 {
                    return Err(proxy_err("the SOCKS5 proxy refused the user name or password"));
                }
            }
            _ => return Err(proxy_err("the SOCKS5 proxy accepts none of our authentication methods")),
        }
        let mut req = vec![0x05, 0x01, 0x00];
        match host.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V4(ip)) => {
                req.push(0x01);
                req.extend_from_slice(&ip.octets());
            }
            Ok(std::net::IpAddr::V6(ip)) => {
                req.push(0x04);
                req.extend_from_slice(&ip.octets());
            }
            Err(_) => {
                let name = host.as_bytes();
                let len = u8::try_from(name.len()).map_err(|_| proxy_err("host name too long for SOCKS5"))?;
                req.push(0x03);
                req.push(len);
                req.extend_from_slice(name);
            }
        }
        req.extend_from_slice(&port.to_be_bytes());
        tcp.write_all(Bytes::from(req)).await?;
        let head = read_exact(tcp, &mut buf, 4).await?;
        if head[1] != 0x00 {
            return Err(proxy_err(&format!("the SOCKS5 proxy could not connect (reply {})", head[1])));
        }
        let rest = match head[3] {
            0x01 => 4 + 2,
            0x04 => 16 + 2,
            0x03 => {
                let len = read_exact(tcp, &mut buf, 1).await?;
                usize::from(len[0]) + 2
            }
            _ => return Err(proxy_err("the SOCKS5 reply has an unknown address type")),
        };
        read_exact(tcp, &mut buf, rest).await?;
        if !buf.is_empty() {
            return Err(proxy_err("the proxy sent data before the tunnel opened"));
        }
        Ok(())
    }
}

/// Reads exactly `n` bytes (keeping any surplus in `buf`).
async fn read_exact<S: ByteStream>(tcp: &mut S, buf: &mut BytesMut, n: usize) -> io::Result<Vec<u8>> {
    while buf.len() < n {
        if tcp.read_buf(buf).await? == 0 {
            return Err(proxy_err("the proxy closed the connection during the handshake"));
        }
    }
    let out = buf[..n].to_vec();
    buf.advance(n);
    Ok(out)
}

fn proxy_err(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionRefused, format!("proxy: {msg}"))
}

/// The URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let cred = &url[s + 3..at];
            let user = cred.split(':').next().unwrap_or("");
            format!("{}{user}:****{}", &url[..s + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_http_and_socks5_proxies_with_and_without_credentials() {
        let p = Proxy::parse("http://127.0.0.1:3128").unwrap();
        assert_eq!((p.kind, p.host.as_str(), p.port, p.auth), (ProxyKind::Http, "127.0.0.1", 3128, None));
        let p = Proxy::parse("socks5://user:pa:ss@proxy.local:1081").unwrap();
        assert_eq!((p.kind, p.port), (ProxyKind::Socks5, 1081));
        assert_eq!(p.auth, Some(("user".into(), "pa:ss".into())));
        assert_eq!(Proxy::parse("socks5h://h").unwrap().port, 1080);
        assert_eq!(Proxy::parse("http://[::1]:8080").unwrap().host, "::1");
    }

    #[test]
    fn refuses_what_it_cannot_use() {
        assert_eq!(Proxy::parse("https://u:p@proxy.local").unwrap().port, 443);
        assert_eq!(Proxy::parse("https://proxy.local:8443").unwrap().kind, ProxyKind::Https);
        for bad in ["ftp://h:1", "https://", "http://", "http://h:x", "socks5://h:1/path", "h:1"] {
            assert!(Proxy::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn redact_hides_the_password() {
        assert_eq!(redact("socks5://u:secret@h:1"), "socks5://u:****@h:1");
        assert_eq!(redact("http://h:1"), "http://h:1");
    }
}
