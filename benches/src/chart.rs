//! The results chart: horizontal bar panels drawn into an RGB canvas with a built-in 5×7 font and
//! written as a PNG (fixed-Huffman deflate with run-length matches), with no image library.

/// An RGB colour.
pub type Rgb = [u8; 3];

pub const WHITE: Rgb = [255, 255, 255];
pub const INK: Rgb = [33, 37, 41];
pub const GRID: Rgb = [222, 226, 230];
pub const MUTED: Rgb = [134, 142, 150];

/// One bar: its label, value (none: not measured) and the text printed after it.
#[derive(Debug, Clone)]
pub struct Bar {
    pub label: String,
    pub value: Option<f64>,
    pub text: String,
    pub color: Rgb,
}

/// A titled group of bars sharing one linear scale from zero.
#[derive(Debug, Clone)]
pub struct Panel {
    pub title: String,
    pub bars: Vec<Bar>,
}

/// An RGB raster.
pub struct Canvas {
    pub width: usize,
    pub height: usize,
    pixels: Vec<u8>,
}

impl Canvas {
    pub fn new(width: usize, height: usize, background: Rgb) -> Canvas {
        let mut pixels = Vec::with_capacity(width * height * 3);
        for _ in 0..width * height {
            pixels.extend_from_slice(&background);
        }
        Canvas { width, height, pixels }
    }

    pub fn fill_rect(&mut self, x: usize, y: usize, w: usize, h: usize, color: Rgb) {
        for yy in y..(y + h).min(self.height) {
            for xx in x..(x + w).min(self.width) {
                let i = (yy * self.width + xx) * 3;
                if let Some(px) = self.pixels.get_mut(i..i + 3) {
                    px.copy_from_slice(&color);
                }
            }
        }
    }

    /// Draws `text` (upper-cased; unknown characters as `?`) with its top-left at (x, y), each font
    /// pixel `scale` pixels square. Returns the x after the text.
    pub fn text(&mut self, x: usize, y: usize, text: &str, scale: usize, color: Rgb) -> usize {
        let mut cx = x;
        for ch in text.chars() {
            let rows = glyph(ch);
            for (r, bits) in rows.iter().enumerate() {
                for c in 0..5 {
                    if bits & (0x10 >> c) != 0 {
                        self.fill_rect(cx + c * scale, y + r * scale, scale, scale, color);
                    }
                }
            }
            cx += 6 * scale;
        }
        cx
    }

    /// The canvas as a PNG file.
    pub fn png(&self) -> Vec<u8> {
        let stride = self.width * 3;
        // Every row filtered with "Up" (difference from the row above): repeated rows become zeros,
        // which the run-length matches compress well.
        let mut raw = Vec::with_capacity((stride + 1) * self.height);
        let zero = vec![0u8; stride];
        for y in 0..self.height {
            raw.push(2);
            let row = self.pixels.get(y * stride..(y + 1) * stride).unwrap_or(&zero);
            let above = if y == 0 {
                &zero[..]
            } else {
                self.pixels.get((y - 1) * stride..y * stride).unwrap_or(&zero)
            };
            raw.extend(row.iter().zip(above).map(|(a, b)| a.wrapping_sub(*b)));
        }
        let mut ihdr = Vec::with_capacity(13);
        ihdr.extend_from_slice(&(self.width as u32).to_be_bytes());
        ihdr.extend_from_slice(&(self.height as u32).to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
        let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
        chunk(&mut out, b"IHDR", &ihdr);
        chunk(&mut out, b"IDAT", &zlib(&raw));
        chunk(&mut out, b"IEND", &[]);
        out
    }
}

/// Draws `panels` one under the other, `width` pixels wide, under a title and subtitle lines.
pub fn render(title: &str, subtitles: &[String], panels: &[Panel], width: usize) -> Canvas {
    const SCALE: usize = 2;
    const ROW: usize = 24;
    const LABEL_W: usize = 260;
    let top = 52 + subtitles.len() * 20;
    let height = top + panels.iter().map(|p| 40 + p.bars.len() * ROW + 16).sum::<usize>() + 10;
    let mut c = Canvas::new(width, height, WHITE);
    c.text(16, 14, title, 3, INK);
    for (i, line) in subtitles.iter().enumerate() {
        c.text(16, 46 + i * 20, line, SCALE, MUTED);
    }
    let bar_max = width.saturating_sub(LABEL_W + 16 + 190);
    let mut y = top;
    for p in panels {
        c.fill_rect(16, y + 4, width - 32, 1, GRID);
        c.text(16, y + 14, &p.title, SCALE, INK);
        y += 40;
        let max = p.bars.iter().filter_map(|b| b.value).fold(0.0f64, f64::max);
        for b in &p.bars {
            c.text(24, y + 4, &b.label, SCALE, INK);
            let x0 = LABEL_W;
            let w = match b.value {
                Some(v) if max > 0.0 && v > 0.0 => ((v / max) * bar_max as f64).round().max(2.0) as usize,
                _ => 0,
            };
            c.fill_rect(x0, y + 2, w, ROW - 6, b.color);
            let color = if b.value.is_some() { INK } else { MUTED };
            c.text(x0 + w + 8, y + 4, &b.text, SCALE, color);
            y += ROW;
        }
        y += 16;
    }
    c
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32(out.get(start..).unwrap_or_default());
    out.extend_from_slice(&crc.to_be_bytes());
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for b in data {
        crc ^= u32::from(*b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

fn adler32(data: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for chunk in data.chunks(5552) {
        for x in chunk {
            a += u32::from(*x);
            b += a;
        }
        a %= 65521;
        b %= 65521;
    }
    (b << 16) | a
}

/// LSB-first bit writer.
struct Bits {
    out: Vec<u8>,
    acc: u32,
    n: u32,
}

impl Bits {
    fn put(&mut self, value: u32, count: u32) {
        self.acc |= value << self.n;
        self.n += count;
        while self.n >= 8 {
            self.out.push((self.acc & 0xFF) as u8);
            self.acc >>= 8;
            self.n -= 8;
        }
    }

    /// A Huffman code, most significant bit first.
    fn code(&mut self, code: u32, len: u32) {
        let mut rev = 0;
        for i in 0..len {
            rev |= ((code >> i) & 1) << (len - 1 - i);
        }
        self.put(rev, len);
    }

    fn symbol(&mut self, sym: u32) {
        match sym {
            0..=143 => self.code(0x30 + sym, 8),
            144..=255 => self.code(0x190 + sym - 144, 9),
            256..=279 => self.code(sym - 256, 7),
            _ => self.code(0xC0 + sym - 280, 8),
        }
    }

    fn flush(mut self) -> Vec<u8> {
        if self.n > 0 {
            self.out.push((self.acc & 0xFF) as u8);
        }
        self.out
    }
}

const LEN_BASE: [u32; 29] = [
    3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115, 131, 163, 195,
    227, 258,
];
const LEN_EXTRA: [u32; 29] =
    [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0];

/// A zlib stream: one fixed-Huffman deflate block whose only matches repeat the previous byte.
fn zlib(data: &[u8]) -> Vec<u8> {
    let mut bits = Bits { out: vec![0x78, 0x01], acc: 0, n: 0 };
    bits.put(1, 1); // final block
    bits.put(1, 2); // fixed Huffman codes
    let mut i = 0;
    while i < data.len() {
        let prev = if i > 0 { data.get(i - 1).copied() } else { None };
        let mut run = 0;
        if let Some(p) = prev {
            while run < 258 && data.get(i + run) == Some(&p) {
                run += 1;
            }
        }
        if run >= 3 {
            let idx = LEN_BASE.iter().rposition(|b| *b as usize <= run).unwrap_or(0);
            let (base, extra) =
                (LEN_BASE.get(idx).copied().unwrap_or(3), LEN_EXTRA.get(idx).copied().unwrap_or(0));
            bits.symbol(257 + idx as u32);
            if extra > 0 {
                bits.put(run as u32 - base, extra);
            }
            bits.code(0, 5); // distance 1
            i += run;
        } else {
            bits.symbol(u32::from(data.get(i).copied().unwrap_or(0)));
            i += 1;
        }
    }
    bits.symbol(256);
    let mut out = bits.flush();
    out.extend_from_slice(&adler32(data).to_be_bytes());
    out
}

/// The 5×7 pattern of a character (bit 4 is the leftmost column).
fn glyph(ch: char) -> [u8; 7] {
    match ch.to_ascii_uppercase() {
        ' ' => [0; 7],
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        'A' => [0x0E, 0x11, 0x11, 0x11, 0x1F, 0x11, 0x11],
        'B' => [0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E],
        'C' => [0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E],
        'D' => [0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C],
        'E' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F],
        'F' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10],
        'G' => [0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F],
        'H' => [0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'I' => [0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'J' => [0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C],
        'K' => [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11],
        'L' => [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F],
        'M' => [0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11],
        'N' => [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11],
        'O' => [0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'P' => [0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10],
        'Q' => [0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D],
        'R' => [0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11],
        'S' => [0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E],
        'T' => [0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04],
        'U' | 'µ' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'V' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'W' => [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A],
        'X' => [0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11],
        'Y' => [0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04],
        'Z' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F],
        '×' => [0x00, 0x00, 0x11, 0x0A, 0x04, 0x0A, 0x11],
        '.' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C],
        ',' => [0x00, 0x00, 0x00, 0x00, 0x0C, 0x04, 0x08],
        ':' => [0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x0C, 0x00],
        ';' => [0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x04, 0x08],
        '/' => [0x00, 0x01, 0x02, 0x04, 0x08, 0x10, 0x00],
        '%' => [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03],
        '-' | '–' | '—' => [0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00],
        '(' => [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02],
        ')' => [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08],
        '=' => [0x00, 0x00, 0x1F, 0x00, 0x1F, 0x00, 0x00],
        '+' => [0x00, 0x04, 0x04, 0x1F, 0x04, 0x04, 0x00],
        '<' | '≤' => [0x02, 0x04, 0x08, 0x10, 0x08, 0x04, 0x02],
        '>' | '≥' => [0x08, 0x04, 0x02, 0x01, 0x02, 0x04, 0x08],
        '_' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x1F],
        _ => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x00, 0x04],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_match_known_values() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(adler32(b"Wikipedia"), 0x11E6_0398);
    }

    #[test]
    fn writes_a_png_with_its_chunks() {
        let panels = vec![Panel {
            title: "req/s".into(),
            bars: vec![Bar { label: "a".into(), value: Some(2.0), text: "2".into(), color: INK }],
        }];
        let png = render("t", &["s".to_string()], &panels, 400).png();
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"));
        assert!(png.windows(4).any(|w| w == b"IDAT"));
        assert!(png.ends_with(&[0xAE, 0x42, 0x60, 0x82]));
    }
}
