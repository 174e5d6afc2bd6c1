//! Image inputs for billing: dimensions read from PNG, JPEG, GIF and WebP headers without decoding the
//! image, and the providers' rules for what an image of that size costs in prompt tokens.
//!
//! The upstream's rule applies (the provider that serves the request is the one that charges):
//! - OpenAI: `detail: low` costs 85 tokens; `high` and `auto` scale the image to fit 2048×2048, then
//!   down so the short side is at most 768, and cost 85 + 170 per 512-pixel tile.
//! - Anthropic: about width×height/750 tokens after scaling the long edge to at most 1568 pixels,
//!   capped at about 1600 tokens (larger images are scaled down to that).
//! - Gemini: 258 tokens when both sides are at most 384 pixels, otherwise 258 per 768×768 tile.
//!
//! Never fetches anything: remote images are the runtime's to fetch (with size and time limits), after
//! which it calls [`image_dimensions`] and [`image_tokens`] on the bytes.

use base64::Engine;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};

use crate::Protocol;
use crate::ir::{Image, ImageSource};

/// The encodings whose headers are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    Png,
    Jpeg,
    Gif,
    WebP,
}

/// What an image header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageInfo {
    pub format: ImageFormat,
    pub width: u32,
    pub height: u32,
}

/// The format and pixel size of an image from its first bytes; `None` when the bytes are not a PNG,
/// JPEG, GIF or WebP image or are cut off before the size.
pub fn image_dimensions(bytes: &[u8]) -> Option<ImageInfo> {
    let (format, width, height) = if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        png(bytes)?
    } else if bytes.starts_with(&[0xFF, 0xD8]) {
        jpeg(bytes)?
    } else if bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a") {
        (ImageFormat::Gif, u32::from(le16(bytes, 6)?), u32::from(le16(bytes, 8)?))
    } else if bytes.starts_with(b"RIFF") && bytes.get(8..12) == Some(b"WEBP") {
        webp(bytes)?
    } else {
        return None;
    };
    (width > 0 && height > 0).then_some(ImageInfo { format, width, height })
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

fn le16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

fn le24(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes([*b.get(at)?, *b.get(at + 1)?, *b.get(at + 2)?, 0]))
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// IHDR is the first chunk: width and height as big-endian u32 at 16 and 20.
fn png(b: &[u8]) -> Option<(ImageFormat, u32, u32)> {
    if b.get(12..16) != Some(b"IHDR") {
        return None;
    }
    Some((ImageFormat::Png, be32(b, 16)?, be32(b, 20)?))
}

/// Walks the marker segments to the first start-of-frame (SOF0–SOF15 except DHT, JPG and DAC), whose
/// payload is precision, height, width.
fn jpeg(b: &[u8]) -> Option<(ImageFormat, u32, u32)> {
    let mut at = 2;
    loop {
        while *b.get(at)? != 0xFF {
            at += 1;
        }
        while *b.get(at)? == 0xFF {
            at += 1;
        }
        let marker = *b.get(at)?;
        at += 1;
        match marker {
            0xD0..=0xD8 | 0x01 => continue,
            0xD9 | 0xDA => return None,
            0xC0..=0xCF if !matches!(marker, 0xC4 | 0xC8 | 0xCC) => {
                let height = be16(b, at + 3)?;
                let width = be16(b, at + 5)?;
                return Some((ImageFormat::Jpeg, u32::from(width), u32::from(height)));
            }
            _ => at += usize::from(be16(b, at)?),
        }
    }
}

/// Lossy (`VP8 `), lossless (`VP8L`) and extended (`VP8X`) WebP each store the size differently.
fn webp(b: &[u8]) -> Option<(ImageFormat, u32, u32)> {
    let (w, h) = match b.get(12..16)? {
        b"VP8 " => {
            if b.get(23..26) != Some(&[0x9D, 0x01, 0x2A]) {
                return None;
            }
            (u32::from(le16(b, 26)? & 0x3FFF), u32::from(le16(b, 28)? & 0x3FFF))
        }
        b"VP8L" => {
            if *b.get(20)? != 0x2F {
                return None;
            }
            let bits = u32::from_le_bytes(b.get(21..25)?.try_into().ok()?);
            ((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
        }
        b"VP8X" => (le24(b, 24)? + 1, le24(b, 27)? + 1),
        _ => return None,
    };
    Some((ImageFormat::WebP, w, h))
}

/// OpenAI's `detail` level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detail {
    Low,
    High,
    Auto,
}

impl Detail {
    /// The level a request's `detail` string names; `auto` when absent or unknown.
    pub fn parse(detail: Option<&str>) -> Detail {
        match detail {
            Some("low") => Detail::Low,
            Some("high") => Detail::High,
            _ => Detail::Auto,
        }
    }
}

/// OpenAI's tile rule. `auto` is billed like `high`, the most the provider may charge.
pub fn openai_image_tokens(width: u32, height: u32, detail: Detail) -> u32 {
    if detail == Detail::Low {
        return 85;
    }
    let (mut w, mut h) = (f64::from(width), f64::from(height));
    let longest = w.max(h);
    if longest > 2048.0 {
        w = (w * 2048.0 / longest).floor();
        h = (h * 2048.0 / longest).floor();
    }
    let shortest = w.min(h);
    if shortest > 768.0 {
        w = (w * 768.0 / shortest).floor();
        h = (h * 768.0 / shortest).floor();
    }
    let tiles = (w / 512.0).ceil().max(1.0) * (h / 512.0).ceil().max(1.0);
    85 + 170 * tiles as u32
}

/// Anthropic's area rule: width×height/750 after the long edge is scaled to at most 1568 pixels,
/// capped at 1600 tokens.
pub fn claude_image_tokens(width: u32, height: u32) -> u32 {
    let (mut w, mut h) = (f64::from(width), f64::from(height));
    let longest = w.max(h);
    if longest > 1568.0 {
        w = (w * 1568.0 / longest).floor();
        h = (h * 1568.0 / longest).floor();
    }
    ((w * h / 750.0).ceil() as u32).clamp(1, 1600)
}

/// Gemini's rule: 258 tokens for an image within 384×384, otherwise 258 per 768×768 tile.
pub fn gemini_image_tokens(width: u32, height: u32) -> u32 {
    if width <= 384 && height <= 384 {
        return 258;
    }
    let tiles = u64::from(width.div_ceil(768).max(1)) * u64::from(height.div_ceil(768).max(1));
    u32::try_from(tiles.saturating_mul(258)).unwrap_or(u32::MAX)
}

/// The prompt tokens an image of this size costs on an upstream speaking `upstream`.
pub fn image_tokens(upstream: Protocol, width: u32, height: u32, detail: Option<&str>) -> u32 {
    match upstream {
        Protocol::OpenAi => openai_image_tokens(width, height, Detail::parse(detail)),
        Protocol::Anthropic => claude_image_tokens(width, height),
        Protocol::Gemini => gemini_image_tokens(width, height),
    }
}

const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// The dimensions of a base64-encoded image. Decodes a short prefix first (enough for every header
/// but a JPEG with large metadata), and the whole image only when the prefix does not tell.
pub fn base64_image_dimensions(data: &str) -> Option<ImageInfo> {
    let data = data.trim();
    let prefix_len = data.len().min(4096) / 4 * 4;
    if let Some(prefix) = data.get(..prefix_len)
        && let Ok(bytes) = BASE64.decode(prefix)
        && let Some(info) = image_dimensions(&bytes)
    {
        return Some(info);
    }
    image_dimensions(&BASE64.decode(data).ok()?)
}

/// The prompt tokens of an image carried in the request itself; `None` for remote images (the runtime
/// fetches those) and for inline data that is not a readable image.
pub fn inline_image_tokens(upstream: Protocol, image: &Image) -> Option<u32> {
    match &image.source {
        ImageSource::Base64 { data, .. } => {
            let info = base64_image_dimensions(data)?;
            Some(image_tokens(upstream, info.width, info.height, image.detail.as_deref()))
        }
        ImageSource::Url { .. } => None,
    }
}

#[cfg(test)]
mod tests {
    use base64::engine::general_purpose::STANDARD;

    use super::*;

    #[test]
    fn gemini_tokens_of_absurd_sides_saturate_instead_of_overflowing() {
        assert_eq!(gemini_image_tokens(536_879_106, 1_476_788_224), u32::MAX);
        assert_eq!(image_tokens(Protocol::Gemini, u32::MAX, u32::MAX, None), u32::MAX);
        assert_eq!(gemini_image_tokens(1536, 768), 2 * 258);
    }

    fn png(w: u32, h: u32) -> Vec<u8> {
        let mut b = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR".to_vec();
        b.extend(w.to_be_bytes());
        b.extend(h.to_be_bytes());
        b.extend([8, 6, 0, 0, 0]);
        b
    }

    fn jpeg(w: u16, h: u16) -> Vec<u8> {
        let mut b = vec![0xFF, 0xD8];
        // An APP0 segment to skip, then fill bytes, then SOF2 (progressive).
        b.extend([0xFF, 0xE0, 0x00, 0x06, b'J', b'F', b'I', b'F']);
        b.extend([0xFF, 0xFF, 0xC2, 0x00, 0x11, 0x08]);
        b.extend(h.to_be_bytes());
        b.extend(w.to_be_bytes());
        b.extend([0x03, 0x01, 0x22, 0x00]);
        b
    }

    fn riff(chunk: &[u8; 4], payload: &[u8]) -> Vec<u8> {
        let mut b = b"RIFF\0\0\0\0WEBP".to_vec();
        b.extend(chunk);
        b.extend((payload.len() as u32).to_le_bytes());
        b.extend(payload);
        b
    }

    #[test]
    fn reads_png_dimensions() {
        assert_eq!(
            image_dimensions(&png(800, 600)),
            Some(ImageInfo { format: ImageFormat::Png, width: 800, height: 600 })
        );
    }

    #[test]
    fn reads_jpeg_dimensions_past_other_segments() {
        assert_eq!(
            image_dimensions(&jpeg(1024, 768)),
            Some(ImageInfo { format: ImageFormat::Jpeg, width: 1024, height: 768 })
        );
    }

    #[test]
    fn reads_gif_dimensions() {
        let mut b = b"GIF89a".to_vec();
        b.extend(320u16.to_le_bytes());
        b.extend(200u16.to_le_bytes());
        assert_eq!(
            image_dimensions(&b),
            Some(ImageInfo { format: ImageFormat::Gif, width: 320, height: 200 })
        );
    }

    #[test]
    fn reads_all_three_webp_layouts() {
        let mut lossy = vec![0x30, 0x01, 0x00, 0x9D, 0x01, 0x2A];
        lossy.extend(640u16.to_le_bytes());
        lossy.extend(480u16.to_le_bytes());
        let size = |b: Vec<u8>| image_dimensions(&b).map(|i| (i.width, i.height));
        assert_eq!(size(riff(b"VP8 ", &lossy)), Some((640, 480)));
        let bits: u32 = (100 - 1) | ((50 - 1) << 14);
        let mut lossless = vec![0x2F];
        lossless.extend(bits.to_le_bytes());
        assert_eq!(size(riff(b"VP8L", &lossless)), Some((100, 50)));
        let mut extended = vec![0, 0, 0, 0];
        extended.extend(&(2999u32.to_le_bytes()[..3]));
        extended.extend(&(1999u32.to_le_bytes()[..3]));
        assert_eq!(size(riff(b"VP8X", &extended)), Some((3000, 2000)));
    }

    #[test]
    fn refuses_unknown_and_truncated_images() {
        assert_eq!(image_dimensions(b"not an image"), None);
        assert_eq!(image_dimensions(&png(10, 10)[..18]), None);
        assert_eq!(image_dimensions(&jpeg(10, 10)[..12]), None);
        assert_eq!(image_dimensions(&[0xFF, 0xD8, 0xFF, 0xD9]), None);
        assert_eq!(image_dimensions(&png(0, 10)), None);
    }

    #[test]
    fn openai_tile_rule_matches_the_documented_examples() {
        assert_eq!(openai_image_tokens(1024, 1024, Detail::High), 765);
        assert_eq!(openai_image_tokens(2048, 4096, Detail::High), 1105);
        assert_eq!(openai_image_tokens(4096, 8192, Detail::Low), 85);
        assert_eq!(openai_image_tokens(512, 512, Detail::Auto), 255);
        assert_eq!(openai_image_tokens(100, 100, Detail::High), 255);
    }

    #[test]
    fn claude_area_rule_scales_and_caps() {
        assert_eq!(claude_image_tokens(200, 200), 54);
        assert_eq!(claude_image_tokens(1092, 1092), 1590);
        assert_eq!(claude_image_tokens(4000, 3000), 1600);
    }

    #[test]
    fn gemini_counts_small_images_once_and_large_ones_per_tile() {
        assert_eq!(gemini_image_tokens(384, 384), 258);
        assert_eq!(gemini_image_tokens(385, 100), 258);
        assert_eq!(gemini_image_tokens(1024, 1024), 258 * 4);
        assert_eq!(gemini_image_tokens(1920, 1080), 258 * 6);
    }

    #[test]
    fn inline_images_are_costed_by_the_upstream_rule() {
        let data = STANDARD.encode(png(1024, 1024));
        let image = Image {
            source: ImageSource::Base64 { media_type: "image/png".into(), data },
            detail: Some("high".into()),
        };
        assert_eq!(inline_image_tokens(Protocol::OpenAi, &image), Some(765));
        assert_eq!(inline_image_tokens(Protocol::Gemini, &image), Some(1032));
        let remote = Image {
            source: ImageSource::Url { url: "https://x/y.png".into(), media_type: None },
            detail: None,
        };
        assert_eq!(inline_image_tokens(Protocol::OpenAi, &remote), None);
    }

    #[test]
    fn base64_dimensions_fall_back_to_a_full_decode_for_deep_jpeg_headers() {
        let mut b = vec![0xFF, 0xD8, 0xFF, 0xE1, 0x20, 0x02];
        b.extend(vec![0u8; 0x2000]);
        b.extend(&jpeg(30, 40)[2..]);
        let info = base64_image_dimensions(&STANDARD.encode(&b)).unwrap();
        assert_eq!((info.width, info.height), (30, 40));
    }
}
