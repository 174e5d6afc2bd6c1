//! `image_dimensions` and the image costing built on it: never a panic; dimensions only from at least
//! as many bytes as the format's header needs, never zero, within what the format can express;
//! appending bytes never changes an answer already given; the base64 reader agrees with the raw one;
//! and each provider's token rule gives a cost within its documented range.
#![no_main]

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use burncloud_adaptors::Protocol;
use burncloud_adaptors::vision::{ImageFormat, base64_image_dimensions, image_dimensions, image_tokens};
use libfuzzer_sys::fuzz_target;

/// The fewest bytes from which a header of this format can give a size, and the largest side it can
/// express.
fn header_needs(format: ImageFormat, bytes: &[u8]) -> (usize, u32) {
    match format {
        // Signature, IHDR length and type, width, height.
        ImageFormat::Png => (24, u32::MAX),
        // Signature, width, height.
        ImageFormat::Gif => (10, u32::from(u16::MAX)),
        // SOI, a SOF marker, its length, precision, height, width.
        ImageFormat::Jpeg => (11, u32::from(u16::MAX)),
        ImageFormat::WebP => match bytes.get(12..16) {
            Some(b"VP8 ") => (30, 0x3FFF),
            Some(b"VP8L") => (25, 0x4000),
            Some(b"VP8X") => (30, 1 << 24),
            other => panic!("WebP dimensions from an unknown chunk {other:?}"),
        },
    }
}

fuzz_target!(|data: &[u8]| {
    let info = image_dimensions(data);

    // Appending bytes never changes an answer: check every short prefix and the one a byte short.
    let prefixes = (0..data.len().min(48)).chain(data.len().checked_sub(1));
    for k in prefixes {
        if let Some(early) = image_dimensions(&data[..k]) {
            assert_eq!(info, Some(early), "{k} bytes give {early:?}, all {} give {info:?}", data.len());
        }
    }

    let encoded = STANDARD.encode(data);
    assert_eq!(base64_image_dimensions(&encoded), info, "base64 reader disagrees");

    let Some(info) = info else { return };
    let (needs, max_side) = header_needs(info.format, data);
    assert!(data.len() >= needs, "{info:?} from {} bytes, a header needs {needs}", data.len());
    assert!(info.width > 0 && info.height > 0, "zero-sized {info:?}");
    assert!(info.width <= max_side && info.height <= max_side, "{info:?} beyond the format's range");

    let (w, h) = (info.width, info.height);
    for detail in [None, Some("low"), Some("high"), Some("auto")] {
        let openai = image_tokens(Protocol::OpenAi, w, h, detail);
        // 85 base; at most 2048x768 after scaling, so at most 4x2 tiles of 170.
        assert!((85..=85 + 170 * 8).contains(&openai), "OpenAI {openai} tokens for {w}x{h} {detail:?}");
    }
    let claude = image_tokens(Protocol::Anthropic, w, h, None);
    assert!((1..=1600).contains(&claude), "Anthropic {claude} tokens for {w}x{h}");
    // 258 per 768-pixel tile; sides a header can claim but no provider accepts saturate at u32::MAX
    // (corpus/image_header/regression-gemini-tokens-multiply-overflow once overflowed).
    let gemini = image_tokens(Protocol::Gemini, w, h, None);
    assert!(
        gemini >= 258 && (gemini.is_multiple_of(258) || gemini == u32::MAX),
        "Gemini {gemini} tokens for {w}x{h}"
    );
});
