//! Images in prompts, for their token cost: inline images are measured from their own header; remote
//! ones are fetched (a GET on the worker's upstream client) only as far as their header, with a size
//! and a time limit, and remembered per worker.
//!
//! Never decodes an image (`adaptors::vision` reads dimensions from the PNG, JPEG, GIF or WebP header),
//! never reads more than the limit, never waits longer than the timeout, and by default never connects
//! to a loopback, private or link-local address (an image URL is client input: the gateway must not be
//! a way into the operator's network). An image it cannot measure costs what a 1024 × 1024 image
//! costs under the provider's rule.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use burncloud_adaptors::Protocol;
use burncloud_adaptors::ir::{ChatRequest, ImageSource};
use burncloud_adaptors::vision;
use bytes::BytesMut;

use crate::rt;
use crate::upstream::{Client, Origin, Route, UpstreamRequest};

/// Dimensions assumed for an image that cannot be measured.
const UNKNOWN_SIDE: u32 = 1024;
/// Remote images remembered per worker (the map is emptied when it reaches this).
const CACHE_MAX: usize = 4096;

/// How remote images are fetched (options `ImageFetchMaxBytes`, `ImageFetchTimeoutMs`,
/// `ImageFetchAllowPrivate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchPolicy {
    /// Read at most this much of an image before giving up on measuring it.
    pub max_bytes: usize,
    pub timeout: Duration,
    /// Whether URLs may point at loopback, private and link-local addresses.
    pub allow_private: bool,
}

impl Default for FetchPolicy {
    fn default() -> Self {
        FetchPolicy { max_bytes: 1024 * 1024, timeout: Duration::from_secs(3), allow_private: false }
    }
}

/// One image of a prompt: its size when it could be measured, and the detail the client asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptImage {
    pub size: Option<(u32, u32)>,
    pub detail: Option<String>,
}

impl PromptImage {
    /// Its prompt tokens under the rule of the provider that `protocol` names.
    pub fn tokens(&self, protocol: Protocol) -> i64 {
        let (w, h) = self.size.unwrap_or((UNKNOWN_SIDE, UNKNOWN_SIDE));
        i64::from(vision::image_tokens(protocol, w, h, self.detail.as_deref()))
    }
}

/// The prompt tokens of every image under `protocol`'s rule.
pub fn tokens(images: &[PromptImage], protocol: Protocol) -> i64 {
    images.iter().map(|i| i.tokens(protocol)).sum()
}

thread_local! {
    /// Remote image URL → its size (`None`: could not be measured), per worker thread.
    static MEASURED: RefCell<HashMap<String, Option<(u32, u32)>>> = RefCell::new(HashMap::new());
}

/// Measures every image of `request`: inline ones from their bytes, remote ones by fetching their
/// header.
pub async fn measure(client: &Client, request: &ChatRequest, policy: &FetchPolicy) -> Vec<PromptImage> {
    let mut out = Vec::new();
    for image in request.images() {
        let size = match &image.source {
            ImageSource::Base64 { data, .. } => {
                vision::base64_image_dimensions(data).map(|i| (i.width, i.height))
            }
            ImageSource::Url { url, .. } => remote_size(client, url, policy).await,
        };
        out.push(PromptImage { size, detail: image.detail.clone() });
    }
    out
}

async fn remote_size(client: &Client, url: &str, policy: &FetchPolicy) -> Option<(u32, u32)> {
    if let Some(known) = MEASURED.with(|m| m.borrow().get(url).copied()) {
        return known;
    }
    // Boxed: a fetch carries a whole upstream exchange, which must not swell every request's future.
    let fetch = Box::pin(fetch_size(client, url, policy));
    let size = match rt::timeout(policy.timeout, fetch).await {
        Ok(Ok(size)) => Some(size),
        Ok(Err(why)) => {
            tracing::debug!(url, %why, "remote image not measured; priced as 1024 × 1024");
            None
        }
        Err(rt::Elapsed) => {
            tracing::debug!(url, "remote image fetch timed out; priced as 1024 × 1024");
            None
        }
    };
    MEASURED.with(|m| {
        let mut m = m.borrow_mut();
        if m.len() >= CACHE_MAX {
            m.clear();
        }
        m.insert(url.to_string(), size);
    });
    size
}

/// Splits `http(s)://authority/path?query` into the origin and the request target.
fn split_url(url: &str) -> Result<(Origin, String), String> {
    let scheme_end = url.find("://").ok_or("not an http(s) URL")? + 3;
    let (authority_end, target) = match url[scheme_end..].find('/') {
        Some(i) => (scheme_end + i, &url[scheme_end + i..]),
        None => (url.len(), "/"),
    };
    let origin = Origin::parse(&url[..authority_end]).map_err(|e| e.to_string())?;
    let target = target.split('#').next().unwrap_or("/");
    if target.chars().any(|c| c.is_ascii_control() || c == ' ') {
        return Err("the URL has spaces or control characters".into());
    }
    Ok((origin, target.to_string()))
}

/// Whether an address is one an image URL from a client must not reach.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.octets()[0] == 100 && (v4.octets()[1] & 0xc0) == 64 // 100.64.0.0/10
        }
        IpAddr::V6(v6) => {
            let seg = v6.segments();
            v6.is_loopback()
                || v6.is_unspecified()
                || (seg[0] & 0xfe00) == 0xfc00 // unique local
                || (seg[0] & 0xffc0) == 0xfe80 // link local
                || v6.to_ipv4_mapped().is_some_and(|v4| is_internal(IpAddr::V4(v4)))
        }
    }
}

async fn fetch_size(client: &Client, url: &str, policy: &FetchPolicy) -> Result<(u32, u32), String> {
    let (origin, target) = split_url(url)?;
    if !policy.allow_private {
        let addrs = client.resolve_host(&origin.host, origin.port).await.map_err(|e| e.to_string())?;
        if addrs.iter().any(|a| is_internal(a.ip())) {
            return Err(format!("{} resolves to an internal address", origin.host));
        }
    }
    let route = Route { origin, proxy: None };
    let headers = [("Accept", "image/*"), ("User-Agent", "burncloud-gateway")];
    let req = UpstreamRequest { method: "GET", path: &target, headers: &headers, body: bytes::Bytes::new() };
    let mut resp = client.send(&route, &req).await.map_err(|e| e.to_string())?;
    if resp.status != 200 {
        return Err(format!("HTTP {}", resp.status));
    }
    let mut head = BytesMut::new();
    while let Some(chunk) = resp.next_chunk().await.map_err(|e| e.to_string())? {
        head.extend_from_slice(&chunk);
        if let Some(info) = vision::image_dimensions(&head) {
            return Ok((info.width, info.height));
        }
        if head.len() >= policy.max_bytes {
            return Err(format!("no image header within {} bytes", policy.max_bytes));
        }
    }
    Err("not a PNG, JPEG, GIF or WebP image".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_origin_and_target() {
        let (o, t) = split_url("https://img.example.com:8443/a/b.png?x=1#frag").unwrap();
        assert_eq!((o.host.as_str(), o.port, t.as_str()), ("img.example.com", 8443, "/a/b.png?x=1"));
        let (_, t) = split_url("http://example.com").unwrap();
        assert_eq!(t, "/");
        assert!(split_url("ftp://x/y").is_err());
        assert!(split_url("http://x/a b").is_err());
    }

    #[test]
    fn internal_addresses_are_recognised() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "192.168.0.1",
            "172.16.5.4",
            "169.254.1.1",
            "100.64.0.1",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "0.0.0.0",
        ] {
            assert!(is_internal(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["8.8.8.8", "1.1.1.1", "2606:4700::1111"] {
            assert!(!is_internal(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn an_unmeasured_image_costs_a_1024_square() {
        let unknown = PromptImage { size: None, detail: Some("high".into()) };
        let square = PromptImage { size: Some((1024, 1024)), detail: Some("high".into()) };
        assert_eq!(unknown.tokens(Protocol::OpenAi), square.tokens(Protocol::OpenAi));
    }
}
