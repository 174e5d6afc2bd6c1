import re, codecs, os, struct, json
root = '/work/main'
src = open(f'{root}/adaptors/src/convert.rs').read()

def rust_concat(name):
    m = re.search(r'const %s: &str = concat!\((.*?)\n    \);' % name, src, re.S)
    parts = re.findall(r'^\s*"((?:[^"\\]|\\.)*)",?\s*$', m.group(1), re.M)
    return ''.join(codecs.decode(p, 'unicode_escape') for p in parts).encode()

def rust_raw(name):
    m = re.search(r'const %s: &str = r#"(.*?)"#;' % name, src, re.S)
    return m.group(1).encode()

streams = {'openai': rust_concat('OPENAI_STREAM'), 'anthropic': rust_concat('ANTHROPIC_STREAM'),
           'gemini': rust_concat('GEMINI_STREAM')}
requests = {'openai': rust_raw('OPENAI_REQUEST'), 'anthropic': rust_raw('ANTHROPIC_REQUEST'),
            'gemini': rust_raw('GEMINI_REQUEST')}
responses = {'openai': rust_raw('OPENAI_RESPONSE'), 'anthropic': rust_raw('ANTHROPIC_RESPONSE'),
             'gemini': rust_raw('GEMINI_RESPONSE')}
for d in (streams, requests, responses):
    for k, v in d.items():
        assert len(v) > 100, (k, v)
    json.loads(requests['openai']); json.loads(responses['gemini'])
PROTOS = ['openai', 'anthropic', 'gemini']

out = f'{root}/fuzz/corpus'
def put(target, name, data):
    os.makedirs(f'{out}/{target}', exist_ok=True)
    open(f'{out}/{target}/{name}', 'wb').write(data)

# Chunking headers: whole, irregular cuts, one byte at a time.
CHUNKS = {'whole': b'\x00', 'cuts': b'\x04\x07\x00\x1d\x03', 'bytewise': b'\x01\x01'}

# -- sse_decoder
extra_sse = {
    'comments-crlf-multiline': b': keepalive\r\n\r\nevent: ping\r\ndata: a\r\ndata: b\r\n\r\nid: 7\nretry: 10\n\ndata:no-space\n\n',
    'garbage': b'data: {"choices": [garbage\n\nnot-sse\x00\xff\n\n\r\r\n\r\ndata',
    'mixed-separators': b'data: 1\n\ndata: 2\r\n\r\ndata: 3\r\rdata: 4\n\r\nevent: x\n\n',
}
for p in PROTOS:
    for c, h in CHUNKS.items():
        put('sse_decoder', f'{p}-stream-{c}', h + streams[p])
for n, v in extra_sse.items():
    put('sse_decoder', n, CHUNKS['cuts'] + v)

# -- stream_convert: selector (pair index, high bit: include_usage), names, chunking, stream
names = 0x10  # model "claude-sonnet-4-5", id "gpt-4o"
for u, up in enumerate(PROTOS):
    for c, cl in enumerate(PROTOS):
        sel = u * 3 + c
        put('stream_convert', f'{up}-to-{cl}', bytes([sel | 0x80, names]) + CHUNKS['cuts'] + streams[up])
put('stream_convert', 'anthropic-error-to-openai',
    bytes([3, 0x21]) + CHUNKS['whole'] +
    b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}\n\n')
put('stream_convert', 'openai-truncated-to-anthropic',
    bytes([1, 0x33]) + CHUNKS['bytewise'] + streams['openai'][:700])

# -- request_convert: selector, flags (stream option, max_completion_tokens, model), limit, body
for f, fp in enumerate(PROTOS):
    for t, tp in enumerate(PROTOS):
        put('request_convert', f'{fp}-to-{tp}', bytes([f * 3 + t, 0b010, 16]) + requests[fp])
put('request_convert', 'openai-minimal-to-anthropic', bytes([1, 0b101, 0]) +
    b'{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true,"reasoning_effort":"high"}')
put('request_convert', 'anthropic-thinking-to-openai', bytes([3, 0b001, 2]) +
    b'{"model":"c","max_tokens":2048,"thinking":{"type":"enabled","budget_tokens":1024},'
    b'"system":[{"type":"text","text":"sys"}],"messages":[{"role":"user","content":"hi"},'
    b'{"role":"assistant","content":[{"type":"thinking","thinking":"hmm","signature":"sig"},{"type":"text","text":"ok"}]}]}')
put('request_convert', 'gemini-nulls-to-openai', bytes([6, 0b000, 1]) +
    b'{"contents":[{"role":"user","parts":[{"text":"hi"}]}],"tools":null,"generationConfig":{"stopSequences":["x"],"thinkingConfig":{"thinkingBudget":0}}}')

# -- response_convert: selector, names, body
for f, fp in enumerate(PROTOS):
    for t, tp in enumerate(PROTOS):
        put('response_convert', f'{fp}-to-{tp}', bytes([f * 3 + t, 0x45]) + responses[fp])
put('response_convert', 'openai-error-body', bytes([1, 0]) +
    b'{"error":{"message":"Rate limit","type":"rate_limit_error","code":null}}')
put('response_convert', 'gemini-blocked', bytes([6, 0]) +
    b'{"promptFeedback":{"blockReason":"SAFETY"},"usageMetadata":{"promptTokenCount":5,"totalTokenCount":5}}')

# -- image_header
png = b'\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR' + struct.pack('>II', 800, 600) + bytes([8, 6, 0, 0, 0])
jpeg = (bytes([0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x06]) + b'JFIF' + bytes([0xFF, 0xFF, 0xC2, 0x00, 0x11, 0x08])
        + struct.pack('>HH', 768, 1024) + bytes([0x03, 0x01, 0x22, 0x00]))
gif = b'GIF89a' + struct.pack('<HH', 320, 200) + b'\xf7\x00\x00'
def riff(chunk, payload):
    return b'RIFF\0\0\0\0WEBP' + chunk + struct.pack('<I', len(payload)) + payload
webp_lossy = riff(b'VP8 ', bytes([0x30, 0x01, 0x00, 0x9D, 0x01, 0x2A]) + struct.pack('<HH', 640, 480))
webp_lossless = riff(b'VP8L', bytes([0x2F]) + struct.pack('<I', (100 - 1) | ((50 - 1) << 14)))
webp_ext = riff(b'VP8X', bytes(4) + struct.pack('<I', 2999)[:3] + struct.pack('<I', 1999)[:3])
for n, v in {'png': png, 'jpeg': jpeg, 'gif': gif, 'webp-lossy': webp_lossy,
             'webp-lossless': webp_lossless, 'webp-extended': webp_ext,
             'jpeg-truncated': jpeg[:12], 'jpeg-eoi': bytes([0xFF, 0xD8, 0xFF, 0xD9])}.items():
    put('image_header', n, v)

# -- http_chunked: chunking header + wire
wires = {
    'simple': b'5\r\nhello\r\n6\r\n world\r\n0\r\n\r\nGET / HTTP/1.1\r\n',
    'extensions-trailers': b'1A;name="va;l"; flag\r\nabcdefghijklmnopqrstuvwxyz\r\n0;last\r\nX-Checksum: abc\r\nX-Other:\tv\r\n\r\n',
    'bad-delimiter': b'3\r\nabcd\r\n0\r\n\r\n',
    'overflow': b'10000000000000000\r\n',
}
for n, v in wires.items():
    for c in ('whole', 'cuts'):
        put('http_chunked', f'{n}-{c}', CHUNKS[c] + v)
