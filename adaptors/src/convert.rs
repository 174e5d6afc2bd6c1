//! The conversion entry points the runtime calls: a request from the client's protocol to the
//! channel's, a complete response or a stream back from the channel's protocol to the client's, and the
//! usage of each.
//!
//! Every cross-protocol conversion is one decode into [`crate::ir`] and one encode out of it. When the
//! two protocols are the same, request bytes pass through untouched apart from `model`, and response
//! and stream bytes pass through untouched (only read, for usage). Pure and synchronous: ids and
//! timestamps come from the caller, and nothing here blocks, allocates per byte, or panics on bad input.

use bytes::{Bytes, BytesMut};

use crate::ir::{ChatRequest, ChatResponse, Image, StreamEvent};
use crate::sse::SseDecoder;
use crate::{Protocol, Usage, anthropic, gemini, openai};

/// Why a body could not be converted. For requests this is the client's fault; for responses the
/// upstream's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    #[error("body is not valid for this protocol: {0}")]
    NotJson(String),
    #[error("request body has no `model`")]
    MissingModel,
    #[error("{0}")]
    Invalid(String),
}

impl ConvertError {
    pub(crate) fn not_json(e: impl std::fmt::Display) -> ConvertError {
        ConvertError::NotJson(e.to_string())
    }
}

/// Request settings the body alone does not give.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestOptions {
    /// `max_tokens` sent to Anthropic when the client gave none (Anthropic requires it).
    pub default_max_tokens: u32,
    /// Whether the client asked to stream, for protocols that say so in the URL (Gemini's
    /// `:streamGenerateContent`); ignored for protocols that say so in the body.
    pub stream: Option<bool>,
    /// Send `max_completion_tokens` instead of `max_tokens` to OpenAI (its reasoning models refuse
    /// `max_tokens`).
    pub openai_max_completion_tokens: bool,
}

impl Default for RequestOptions {
    fn default() -> Self {
        RequestOptions { default_max_tokens: 4096, stream: None, openai_max_completion_tokens: false }
    }
}

/// A request ready for the upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvertedRequest {
    pub body: Bytes,
    /// Whether the upstream will answer with a stream.
    pub stream: bool,
    /// Path and query on the channel's base URL: `/v1/chat/completions`, `/v1/messages`, or
    /// `/v1beta/models/{model}:generateContent` / `:streamGenerateContent?alt=sse`.
    pub path: String,
}

/// A complete response ready for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvertedResponse {
    pub body: Bytes,
    /// Usage as the upstream reported it; `None` when it reported none.
    pub usage: Option<Usage>,
}

/// What the client sees of the response's identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseMeta<'a> {
    /// The model name the client asked for.
    pub model: &'a str,
    /// A unique id for this response (the request id); protocols add their prefix (`chatcmpl-`,
    /// `msg_`), and it seeds generated tool-call ids.
    pub id: &'a str,
    /// Unix seconds, for OpenAI's `created`.
    pub created: u64,
}

/// The upstream path for a request to `model` in protocol `to`. Gemini names the model in the path:
/// it is percent-encoded there (every byte but RFC 3986's unreserved ones), so a mapped model name
/// holding `/`, `?`, `#`, `:` or a space cannot change the path or the query.
pub fn upstream_path(to: Protocol, model: &str, stream: bool) -> String {
    match (to, stream) {
        (Protocol::OpenAi, _) => "/v1/chat/completions".into(),
        (Protocol::Anthropic, _) => "/v1/messages".into(),
        (Protocol::Gemini, false) => format!("/v1beta/models/{}:generateContent", PathSegment(model)),
        (Protocol::Gemini, true) => {
            format!("/v1beta/models/{}:streamGenerateContent?alt=sse", PathSegment(model))
        }
    }
}

/// Writes a string as one percent-encoded URL path segment.
struct PathSegment<'a>(&'a str);

impl std::fmt::Display for PathSegment<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use std::fmt::Write;
        for &b in self.0.as_bytes() {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                f.write_char(char::from(b))?;
            } else {
                write!(f, "%{b:02X}")?;
            }
        }
        Ok(())
    }
}

/// Converts a client request body in protocol `from` into a body for an upstream speaking `to`, for
/// the upstream's model name `upstream_model`.
pub fn convert_request(
    from: Protocol,
    to: Protocol,
    body: &[u8],
    upstream_model: &str,
    opts: &RequestOptions,
) -> Result<ConvertedRequest, ConvertError> {
    if from == to {
        let (body, stream) = match from {
            Protocol::Gemini => {
                gemini::check_request(body)?;
                (Bytes::copy_from_slice(body), opts.stream.unwrap_or(false))
            }
            Protocol::OpenAi | Protocol::Anthropic => {
                let info = openai::request_info(body).map_err(|e| match e {
                    openai::RequestError::NotJson(m) => ConvertError::NotJson(m),
                    openai::RequestError::MissingModel => ConvertError::MissingModel,
                })?;
                let body = openai::with_model(body, upstream_model)
                    .map_err(|e| ConvertError::NotJson(e.to_string()))?;
                (body, info.stream)
            }
        };
        return Ok(ConvertedRequest { body, stream, path: upstream_path(to, upstream_model, stream) });
    }
    let req = decode_request(from, body, opts)?;
    let body = match to {
        Protocol::OpenAi => openai::encode_request(&req, upstream_model, opts)?,
        Protocol::Anthropic => anthropic::encode_request(&req, upstream_model, opts)?,
        Protocol::Gemini => gemini::encode_request(&req)?,
    };
    Ok(ConvertedRequest { body, stream: req.stream, path: upstream_path(to, upstream_model, req.stream) })
}

/// Decodes a client request of any protocol into neutral form.
pub fn decode_request(
    from: Protocol,
    body: &[u8],
    opts: &RequestOptions,
) -> Result<ChatRequest, ConvertError> {
    match from {
        Protocol::OpenAi => openai::decode_request(body),
        Protocol::Anthropic => anthropic::decode_request(body),
        Protocol::Gemini => {
            let mut req = gemini::decode_request(body)?;
            req.stream = opts.stream.unwrap_or(false);
            Ok(req)
        }
    }
}

/// What admission needs from a client request of any protocol: model, stream flag, output limit,
/// prompt text for counting, and image inputs for costing.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestSummary {
    /// `None` for Gemini, whose model is in the URL.
    pub model: Option<String>,
    pub stream: bool,
    pub max_tokens: Option<u32>,
    pub prompt_text: String,
    pub images: Vec<Image>,
}

/// Summarizes a client request (see [`RequestSummary`]).
pub fn summarize_request(
    from: Protocol,
    body: &[u8],
    opts: &RequestOptions,
) -> Result<RequestSummary, ConvertError> {
    let req = decode_request(from, body, opts)?;
    Ok(RequestSummary {
        model: (from != Protocol::Gemini).then(|| req.model.clone()),
        stream: req.stream,
        max_tokens: req.max_tokens,
        prompt_text: req.prompt_text(),
        images: req.images().cloned().collect(),
    })
}

fn decode_response(from: Protocol, body: &[u8], id_seed: &str) -> Result<ChatResponse, ConvertError> {
    match from {
        Protocol::OpenAi => openai::decode_response(body),
        Protocol::Anthropic => anthropic::decode_response(body),
        Protocol::Gemini => gemini::decode_response(body, id_seed),
    }
}

/// Converts a complete (non-stream, successful) upstream response into the client's protocol.
pub fn convert_response(
    from_upstream: Protocol,
    to_client: Protocol,
    body: &[u8],
    meta: &ResponseMeta,
) -> Result<ConvertedResponse, ConvertError> {
    if from_upstream == to_client {
        return Ok(ConvertedResponse {
            body: Bytes::copy_from_slice(body),
            usage: response_usage(from_upstream, body),
        });
    }
    let resp = decode_response(from_upstream, body, meta.id)?;
    let body = match to_client {
        Protocol::OpenAi => openai::encode_response(&resp, meta)?,
        Protocol::Anthropic => anthropic::encode_response(&resp, meta)?,
        Protocol::Gemini => gemini::encode_response(&resp, meta)?,
    };
    Ok(ConvertedResponse { body, usage: resp.usage })
}

/// Usage from a complete response body in `protocol`, when the upstream reported it. `Some` only
/// for a body that is valid JSON as a whole (the relay relies on it to skip a separate check).
pub fn response_usage(protocol: Protocol, body: &[u8]) -> Option<Usage> {
    match protocol {
        Protocol::OpenAi => openai::response_usage(body),
        Protocol::Anthropic => anthropic::response_usage(body),
        Protocol::Gemini => gemini::response_usage(body),
    }
}

/// The completion text of a complete response (text, reasoning, tool calls), for counting tokens
/// locally when the upstream reported no usage.
pub fn response_text(protocol: Protocol, body: &[u8]) -> Result<String, ConvertError> {
    Ok(decode_response(protocol, body, "")?.completion_text())
}

/// The human message of an upstream error body in `protocol`, if the body is one.
pub fn upstream_error_message(protocol: Protocol, body: &[u8]) -> Option<String> {
    match protocol {
        Protocol::OpenAi => openai::error_message(body),
        Protocol::Anthropic => anthropic::error_message(body),
        Protocol::Gemini => gemini::error_message(body),
    }
}

#[derive(Debug)]
enum Decoder {
    OpenAi(openai::StreamDecoder),
    Anthropic(anthropic::StreamDecoder),
    Gemini(gemini::StreamDecoder),
}

impl Decoder {
    fn decode(&mut self, ev: &crate::sse::SseEvent, out: &mut Vec<StreamEvent>) {
        match self {
            Decoder::OpenAi(d) => d.decode(ev, out),
            Decoder::Anthropic(d) => d.decode(ev, out),
            Decoder::Gemini(d) => d.decode(ev, out),
        }
    }

    fn finish(&mut self, out: &mut Vec<StreamEvent>) {
        match self {
            Decoder::OpenAi(d) => d.finish(out),
            Decoder::Anthropic(d) => d.finish(out),
            Decoder::Gemini(d) => d.finish(out),
        }
    }
}

#[derive(Debug)]
enum Encoder {
    /// Same protocol: the upstream bytes are forwarded as they arrive.
    Passthrough,
    /// OpenAI to OpenAI when the gateway asked the upstream for a usage chunk the client did not ask
    /// for: every event is forwarded as it was sent (`data: …`), except that usage-only chunk.
    PassthroughHidingUsage,
    OpenAi(openai::StreamEncoder),
    Anthropic(anthropic::StreamEncoder),
    Gemini(gemini::StreamEncoder),
}

impl Encoder {
    fn encode(&mut self, ev: &StreamEvent, out: &mut BytesMut) {
        match self {
            Encoder::Passthrough | Encoder::PassthroughHidingUsage => {}
            Encoder::OpenAi(e) => e.encode(ev, out),
            Encoder::Anthropic(e) => e.encode(ev, out),
            Encoder::Gemini(e) => e.encode(ev, out),
        }
    }
}

/// Converts an upstream SSE stream into the client's protocol, incrementally: bytes in any chunking,
/// client events out as soon as they are complete. Also collects usage and the delivered text.
///
/// Call [`StreamConverter::feed`] for each upstream chunk and [`StreamConverter::finish`] once when the
/// upstream closes; `finish` completes the client stream (Gemini streams have no end marker of their
/// own, and a cut-off stream still ends well-formed for the client).
#[derive(Debug)]
pub struct StreamConverter {
    sse: SseDecoder,
    decoder: Decoder,
    encoder: Encoder,
    events: Vec<StreamEvent>,
    usage: Option<Usage>,
    text: String,
    finished: bool,
}

impl StreamConverter {
    /// `include_usage` is the OpenAI client's `stream_options.include_usage` (other clients always get
    /// usage).
    pub fn new(upstream: Protocol, client: Protocol, meta: &ResponseMeta, include_usage: bool) -> Self {
        let decoder = match upstream {
            Protocol::OpenAi => Decoder::OpenAi(openai::StreamDecoder::new()),
            Protocol::Anthropic => Decoder::Anthropic(anthropic::StreamDecoder::new()),
            Protocol::Gemini => Decoder::Gemini(gemini::StreamDecoder::new(meta.id)),
        };
        let encoder = match client {
            _ if client == upstream => Encoder::Passthrough,
            Protocol::OpenAi => Encoder::OpenAi(openai::StreamEncoder::new(meta, include_usage)),
            Protocol::Anthropic => Encoder::Anthropic(anthropic::StreamEncoder::new(meta)),
            Protocol::Gemini => Encoder::Gemini(gemini::StreamEncoder::new(meta)),
        };
        StreamConverter {
            sse: SseDecoder::new(),
            decoder,
            encoder,
            events: Vec::new(),
            usage: None,
            text: String::new(),
            finished: false,
        }
    }

    /// An OpenAI-to-OpenAI stream for which the gateway added `stream_options.include_usage` although
    /// the client did not ask for it: the upstream's usage-only chunk is read for billing but not
    /// forwarded; every other event goes through unchanged.
    pub fn hiding_usage(mut self) -> Self {
        if matches!(self.encoder, Encoder::Passthrough) && matches!(self.decoder, Decoder::OpenAi(_)) {
            self.encoder = Encoder::PassthroughHidingUsage;
        }
        self
    }

    /// Takes upstream bytes and appends whatever client bytes are ready to `out`.
    pub fn feed(&mut self, bytes: &[u8], out: &mut BytesMut) {
        if self.finished {
            return;
        }
        if matches!(self.encoder, Encoder::Passthrough) {
            out.extend_from_slice(bytes);
        }
        self.sse.feed(bytes);
        while let Some(ev) = self.sse.next_event() {
            if matches!(self.encoder, Encoder::PassthroughHidingUsage)
                && !openai::is_usage_only_chunk(&ev.data)
            {
                if let Some(name) = &ev.event {
                    out.extend_from_slice(b"event: ");
                    out.extend_from_slice(name.as_bytes());
                    out.extend_from_slice(b"\n");
                }
                out.extend_from_slice(b"data: ");
                out.extend_from_slice(&ev.data);
                out.extend_from_slice(b"\n\n");
            }
            self.decoder.decode(&ev, &mut self.events);
        }
        self.flush(out);
    }

    /// The upstream closed: appends the client stream's closing events to `out`. Later calls do nothing.
    pub fn finish(&mut self, out: &mut BytesMut) {
        if self.finished {
            return;
        }
        self.finished = true;
        self.decoder.finish(&mut self.events);
        self.flush(out);
    }

    /// The latest usage the upstream reported, if any.
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// Everything the model produced so far (text, reasoning, tool names and arguments), for counting
    /// tokens locally when the upstream reports no usage.
    pub fn delivered_text(&self) -> &str {
        &self.text
    }

    fn flush(&mut self, out: &mut BytesMut) {
        for ev in self.events.drain(..) {
            match &ev {
                StreamEvent::Text(t) | StreamEvent::Thinking(t) => self.text.push_str(t),
                StreamEvent::ToolCallStart { name, .. } => self.text.push_str(name),
                StreamEvent::ToolCallArgs { json, .. } => self.text.push_str(json),
                StreamEvent::Usage(u) => self.usage = Some(*u),
                _ => {}
            }
            self.encoder.encode(&ev, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::{Value, json};

    use super::*;
    use crate::ir::FinishReason;

    const ALL: [Protocol; 3] = [Protocol::OpenAi, Protocol::Anthropic, Protocol::Gemini];

    fn meta() -> ResponseMeta<'static> {
        ResponseMeta { model: "client-model", id: "req42", created: 1_700_000_000 }
    }

    #[test]
    fn a_gemini_model_name_is_one_percent_encoded_path_segment() {
        assert_eq!(
            upstream_path(Protocol::Gemini, "gemini-2.0-flash_exp~1", false),
            "/v1beta/models/gemini-2.0-flash_exp~1:generateContent"
        );
        assert_eq!(
            upstream_path(Protocol::Gemini, "a/b?c#d:e f%é", true),
            "/v1beta/models/a%2Fb%3Fc%23d%3Ae%20f%25%C3%A9:streamGenerateContent?alt=sse"
        );
        assert_eq!(upstream_path(Protocol::OpenAi, "a/b", true), "/v1/chat/completions");
    }

    #[test]
    fn a_hidden_usage_chunk_is_read_for_billing_but_not_forwarded() {
        let stream = concat!(
            "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n",
            "data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2,\"total_tokens\":9}}\n\n",
            "data: [DONE]\n\n",
        );
        for split in 1..stream.len() {
            let mut c =
                StreamConverter::new(Protocol::OpenAi, Protocol::OpenAi, &meta(), false).hiding_usage();
            let mut out = BytesMut::new();
            c.feed(&stream.as_bytes()[..split], &mut out);
            c.feed(&stream.as_bytes()[split..], &mut out);
            c.finish(&mut out);
            let text = String::from_utf8(out.to_vec()).unwrap();
            assert!(!text.contains("prompt_tokens"), "usage forwarded at split {split}: {text}");
            assert!(text.contains("\"content\":\"Hi\"") && text.ends_with("data: [DONE]\n\n"), "{text}");
            assert_eq!(c.usage().map(|u| (u.prompt_tokens, u.completion_tokens)), Some((7, 2)));
        }
    }

    #[test]
    fn a_gemini_pass_through_refuses_what_is_not_a_json_object_of_valid_text() {
        for bad in
            [&b"\"\\ud800\""[..], b"\"\xff\"", b"1", b"{\"contents\": \"\\ud800\"}", b"{\"a\": \"\xff\"}"]
        {
            assert!(
                convert_request(Protocol::Gemini, Protocol::Gemini, bad, "g", &opts()).is_err(),
                "{bad:?}"
            );
        }
        assert!(
            convert_request(Protocol::Gemini, Protocol::Gemini, br#"{"contents":[]}"#, "g", &opts()).is_ok()
        );
    }

    #[test]
    fn usage_is_read_only_from_a_body_that_is_valid_json_as_a_whole() {
        let cases: [(Protocol, &str); 3] = [
            (Protocol::OpenAi, r#"{"usage":{"prompt_tokens":3,"completion_tokens":4},"choices":[]}"#),
            (
                Protocol::Anthropic,
                r#"{"type":"message","usage":{"input_tokens":3,"output_tokens":4},"content":[]}"#,
            ),
            (
                Protocol::Gemini,
                r#"{"usageMetadata":{"promptTokenCount":3,"candidatesTokenCount":4},"candidates":[]}"#,
            ),
        ];
        for (protocol, body) in cases {
            assert!(response_usage(protocol, body.as_bytes()).is_some(), "{protocol:?}");
            let cut = &body[..body.len() - 3];
            assert!(response_usage(protocol, cut.as_bytes()).is_none(), "{protocol:?} cut");
            let trailing = format!("{body} x");
            assert!(response_usage(protocol, trailing.as_bytes()).is_none(), "{protocol:?} trailing");
            let bad_inside = body.replacen("[]", "[1,]", 1);
            assert!(response_usage(protocol, bad_inside.as_bytes()).is_none(), "{protocol:?} bad inside");
        }
    }

    #[test]
    fn usage_counts_near_the_integer_limit_saturate() {
        let huge = format!(
            r#"{{"usage":{{"prompt_tokens":{},"completion_tokens":{}}},"choices":[]}}"#,
            i64::MAX,
            i64::MAX
        );
        let u = response_usage(Protocol::OpenAi, huge.as_bytes()).unwrap();
        assert_eq!(u.total_tokens, i64::MAX);
        let anthropic = format!(
            r#"{{"type":"message","content":[],"usage":{{"input_tokens":{},"cache_read_input_tokens":{},"output_tokens":1}}}}"#,
            i64::MAX,
            i64::MAX
        );
        assert_eq!(
            response_usage(Protocol::Anthropic, anthropic.as_bytes()).unwrap().prompt_tokens,
            i64::MAX
        );
        let gemini = format!(
            r#"{{"candidates":[],"usageMetadata":{{"promptTokenCount":{},"toolUsePromptTokenCount":{},"candidatesTokenCount":1}}}}"#,
            i64::MAX,
            i64::MAX
        );
        assert_eq!(response_usage(Protocol::Gemini, gemini.as_bytes()).unwrap().prompt_tokens, i64::MAX);
    }

    #[test]
    fn asking_for_usage_keeps_the_other_stream_options() {
        let body = br#"{"model":"m","stream":true,"stream_options":{"x":1}}"#;
        let v: Value = serde_json::from_slice(&openai::with_usage_requested(body).unwrap()).unwrap();
        assert_eq!(v["stream_options"], json!({"x": 1, "include_usage": true}));
        let v: Value =
            serde_json::from_slice(&openai::with_usage_requested(br#"{"model":"m"}"#).unwrap()).unwrap();
        assert_eq!(v["stream_options"], json!({"include_usage": true}));
    }

    fn parse(b: &[u8]) -> Value {
        serde_json::from_slice(b).unwrap()
    }

    fn opts() -> RequestOptions {
        RequestOptions { default_max_tokens: 1000, stream: Some(true), openai_max_completion_tokens: false }
    }

    // -- Request fixtures: the same conversation (system prompt, an image, one tool round trip) in each
    // -- protocol's documented shape.

    const OPENAI_REQUEST: &str = r#"{"model":"gpt-4o","stream":true,"max_tokens":200,"temperature":0.5,
      "messages":[
        {"role":"system","content":"You are terse."},
        {"role":"user","content":[{"type":"text","text":"What is in this image, and the weather in Paris?"},
          {"type":"image_url","image_url":{"url":"data:image/png;base64,iVBORw0KGgo="}}]},
        {"role":"assistant","content":null,"tool_calls":[{"id":"call_abc","type":"function",
          "function":{"name":"get_weather","arguments":"{\"city\":\"Paris\"}"}}]},
        {"role":"tool","tool_call_id":"call_abc","content":"18C and sunny"}],
      "tools":[{"type":"function","function":{"name":"get_weather","description":"Weather for a city",
        "parameters":{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}}}],
      "tool_choice":"auto"}"#;

    const ANTHROPIC_REQUEST: &str = r#"{"model":"claude-sonnet-4-5","max_tokens":200,"stream":true,
      "system":"You are terse.",
      "messages":[
        {"role":"user","content":[{"type":"text","text":"What is in this image, and the weather in Paris?"},
          {"type":"image","source":{"type":"base64","media_type":"image/png","data":"iVBORw0KGgo="}}]},
        {"role":"assistant","content":[{"type":"tool_use","id":"toolu_01","name":"get_weather","input":{"city":"Paris"}}]},
        {"role":"user","content":[{"type":"tool_result","tool_use_id":"toolu_01","content":"18C and sunny"}]}],
      "tools":[{"name":"get_weather","description":"Weather for a city",
        "input_schema":{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}}],
      "tool_choice":{"type":"auto"}}"#;

    const GEMINI_REQUEST: &str = r#"{
      "systemInstruction":{"parts":[{"text":"You are terse."}]},
      "contents":[
        {"role":"user","parts":[{"text":"What is in this image, and the weather in Paris?"},
          {"inlineData":{"mimeType":"image/png","data":"iVBORw0KGgo="}}]},
        {"role":"model","parts":[{"functionCall":{"name":"get_weather","args":{"city":"Paris"}}}]},
        {"role":"user","parts":[{"functionResponse":{"name":"get_weather","response":{"content":"18C and sunny"}}}]}],
      "generationConfig":{"maxOutputTokens":200},
      "tools":[{"functionDeclarations":[{"name":"get_weather","description":"Weather for a city",
        "parameters":{"type":"OBJECT","properties":{"city":{"type":"STRING"}},"required":["city"]}}]}],
      "toolConfig":{"functionCallingConfig":{"mode":"AUTO"}}}"#;

    fn request_fixture(p: Protocol) -> &'static str {
        match p {
            Protocol::OpenAi => OPENAI_REQUEST,
            Protocol::Anthropic => ANTHROPIC_REQUEST,
            Protocol::Gemini => GEMINI_REQUEST,
        }
    }

    #[test]
    fn openai_request_to_anthropic() {
        let out = convert_request(
            Protocol::OpenAi,
            Protocol::Anthropic,
            OPENAI_REQUEST.as_bytes(),
            "claude-x",
            &opts(),
        )
        .unwrap();
        assert_eq!((out.stream, out.path.as_str()), (true, "/v1/messages"));
        let body = parse(&out.body);
        assert_eq!(body["system"], "You are terse.");
        assert_eq!((body["model"].clone(), body["max_tokens"].clone()), (json!("claude-x"), json!(200)));
        assert_eq!(
            body["messages"][0]["content"][1]["source"],
            json!({"type":"base64","media_type":"image/png","data":"iVBORw0KGgo="})
        );
        assert_eq!(
            body["messages"][1]["content"][0],
            json!({"type":"tool_use","id":"call_abc","name":"get_weather","input":{"city":"Paris"}})
        );
        assert_eq!(
            body["messages"][2],
            json!({"role":"user","content":[{"type":"tool_result","tool_use_id":"call_abc","content":"18C and sunny"}]})
        );
        assert_eq!(body["tools"][0]["input_schema"]["required"], json!(["city"]));
        assert_eq!(body["tool_choice"], json!({"type":"auto"}));
    }

    #[test]
    fn openai_request_to_gemini() {
        let out = convert_request(
            Protocol::OpenAi,
            Protocol::Gemini,
            OPENAI_REQUEST.as_bytes(),
            "gemini-2.5-pro",
            &opts(),
        )
        .unwrap();
        assert_eq!(out.path, "/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse");
        let body = parse(&out.body);
        assert_eq!(body["systemInstruction"], json!({"parts":[{"text":"You are terse."}]}));
        assert_eq!(
            body["contents"][0]["parts"][1],
            json!({"inlineData":{"mimeType":"image/png","data":"iVBORw0KGgo="}})
        );
        assert_eq!(body["contents"][1]["role"], "model");
        assert_eq!(
            body["contents"][1]["parts"][0]["functionCall"],
            json!({"name":"get_weather","args":{"city":"Paris"}})
        );
        assert_eq!(
            body["contents"][2]["parts"][0],
            json!({"functionResponse":{"name":"get_weather","response":{"content":"18C and sunny"}}})
        );
        assert_eq!(body["generationConfig"], json!({"maxOutputTokens":200,"temperature":0.5}));
        assert_eq!(body.get("model"), None);
    }

    #[test]
    fn anthropic_request_to_openai() {
        let out = convert_request(
            Protocol::Anthropic,
            Protocol::OpenAi,
            ANTHROPIC_REQUEST.as_bytes(),
            "gpt-4o",
            &opts(),
        )
        .unwrap();
        assert_eq!((out.stream, out.path.as_str()), (true, "/v1/chat/completions"));
        let body = parse(&out.body);
        assert_eq!(body["messages"][0], json!({"role":"system","content":"You are terse."}));
        assert_eq!(
            body["messages"][1]["content"][1],
            json!({"type":"image_url","image_url":{"url":"data:image/png;base64,iVBORw0KGgo="}})
        );
        assert_eq!(
            body["messages"][2]["tool_calls"][0]["function"],
            json!({"name":"get_weather","arguments":"{\"city\":\"Paris\"}"})
        );
        assert_eq!(
            body["messages"][3],
            json!({"role":"tool","tool_call_id":"toolu_01","content":"18C and sunny"})
        );
        assert_eq!(body["stream_options"], json!({"include_usage":true}));
    }

    #[test]
    fn anthropic_request_to_gemini() {
        let out = convert_request(
            Protocol::Anthropic,
            Protocol::Gemini,
            ANTHROPIC_REQUEST.as_bytes(),
            "gemini-2.5-flash",
            &opts(),
        )
        .unwrap();
        let body = parse(&out.body);
        assert_eq!(body["contents"].as_array().map(Vec::len), Some(3));
        assert_eq!(body["contents"][2]["parts"][0]["functionResponse"]["name"], "get_weather");
        assert_eq!(body["toolConfig"], json!({"functionCallingConfig":{"mode":"AUTO"}}));
        assert_eq!(body["tools"][0]["functionDeclarations"][0]["parametersJsonSchema"]["type"], "object");
    }

    #[test]
    fn gemini_request_to_openai_generates_matching_call_ids() {
        let out =
            convert_request(Protocol::Gemini, Protocol::OpenAi, GEMINI_REQUEST.as_bytes(), "gpt-4o", &opts())
                .unwrap();
        assert!(out.stream, "the stream flag comes from the URL");
        let body = parse(&out.body);
        let call_id = body["messages"][2]["tool_calls"][0]["id"].clone();
        assert_eq!(call_id, "call_1_0");
        assert_eq!(
            body["messages"][3],
            json!({"role":"tool","tool_call_id":call_id,"content":"18C and sunny"})
        );
        assert_eq!(body["tools"][0]["function"]["parameters"]["properties"]["city"]["type"], "string");
        assert_eq!(body["model"], "gpt-4o");
    }

    #[test]
    fn gemini_request_to_anthropic_fills_max_tokens_and_ids() {
        let no_limit = GEMINI_REQUEST.replace(r#""generationConfig":{"maxOutputTokens":200},"#, "");
        let out =
            convert_request(Protocol::Gemini, Protocol::Anthropic, no_limit.as_bytes(), "claude-x", &opts())
                .unwrap();
        let body = parse(&out.body);
        assert_eq!(body["max_tokens"], 1000);
        assert_eq!(body["messages"][1]["content"][0]["id"], body["messages"][2]["content"][0]["tool_use_id"]);
        assert_eq!(body["messages"][0]["content"][1]["source"]["type"], "base64");
    }

    #[test]
    fn image_urls_carry_across_every_protocol() {
        let openai = br#"{"model":"m","messages":[{"role":"user","content":[
            {"type":"image_url","image_url":{"url":"https://example.com/cat.webp","detail":"high"}}]}]}"#;
        let a = parse(
            &convert_request(Protocol::OpenAi, Protocol::Anthropic, openai, "c", &opts()).unwrap().body,
        );
        assert_eq!(
            a["messages"][0]["content"][0]["source"],
            json!({"type":"url","url":"https://example.com/cat.webp"})
        );
        let g =
            parse(&convert_request(Protocol::OpenAi, Protocol::Gemini, openai, "g", &opts()).unwrap().body);
        assert_eq!(
            g["contents"][0]["parts"][0],
            json!({"fileData":{"mimeType":"image/webp","fileUri":"https://example.com/cat.webp"}})
        );
        let gemini = br#"{"contents":[{"role":"user","parts":[{"fileData":{"mimeType":"image/png","fileUri":"https://x/y"}}]}]}"#;
        let o =
            parse(&convert_request(Protocol::Gemini, Protocol::OpenAi, gemini, "o", &opts()).unwrap().body);
        assert_eq!(
            o["messages"][0]["content"],
            json!([{"type":"image_url","image_url":{"url":"https://x/y"}}])
        );
    }

    #[test]
    fn same_protocol_requests_pass_through_apart_from_the_model() {
        for p in ALL {
            let fixture = request_fixture(p);
            let out = convert_request(p, p, fixture.as_bytes(), "mapped", &opts()).unwrap();
            let mut expected = parse(fixture.as_bytes());
            if p != Protocol::Gemini {
                expected["model"] = json!("mapped");
            }
            assert_eq!(parse(&out.body), expected, "{p:?}");
            assert!(out.stream);
        }
        let raw = GEMINI_REQUEST.as_bytes();
        assert_eq!(
            &convert_request(Protocol::Gemini, Protocol::Gemini, raw, "g", &opts()).unwrap().body[..],
            raw
        );
    }

    #[test]
    fn bad_request_bodies_are_errors_not_panics() {
        for from in ALL {
            for to in ALL {
                assert!(convert_request(from, to, b"{not json", "m", &opts()).is_err(), "{from:?}->{to:?}");
            }
        }
        assert_eq!(
            convert_request(Protocol::Anthropic, Protocol::OpenAi, br#"{"messages":[]}"#, "m", &opts()),
            Err(ConvertError::MissingModel)
        );
    }

    #[test]
    fn summaries_give_admission_what_it_needs() {
        for p in ALL {
            let s = summarize_request(p, request_fixture(p).as_bytes(), &opts()).unwrap();
            assert_eq!(s.max_tokens, Some(200), "{p:?}");
            assert!(s.prompt_text.starts_with("You are terse.\nWhat is in this image"), "{p:?}");
            assert!(s.prompt_text.contains("18C and sunny"), "{p:?}");
            assert_eq!(s.images.len(), 1, "{p:?}");
            assert_eq!(s.model.is_some(), p != Protocol::Gemini);
        }
    }

    // -- Response fixtures: one turn with reasoning, text and a tool call, in each documented shape.

    const OPENAI_RESPONSE: &str = r#"{"id":"chatcmpl-B9","object":"chat.completion","created":1741569952,"model":"gpt-4o-2024-08-06",
      "choices":[{"index":0,"message":{"role":"assistant","content":"Checking.","refusal":null,
        "tool_calls":[{"id":"call_abc","type":"function","function":{"name":"get_weather","arguments":"{\"city\":\"Paris\"}"}}]},
        "logprobs":null,"finish_reason":"tool_calls"}],
      "usage":{"prompt_tokens":100,"completion_tokens":20,"total_tokens":120,
        "prompt_tokens_details":{"cached_tokens":64,"audio_tokens":0},
        "completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0}}}"#;

    const ANTHROPIC_RESPONSE: &str = r#"{"id":"msg_01","type":"message","role":"assistant","model":"claude-sonnet-4-5",
      "content":[{"type":"text","text":"Checking."},
        {"type":"tool_use","id":"toolu_01","name":"get_weather","input":{"city":"Paris"}}],
      "stop_reason":"tool_use","stop_sequence":null,
      "usage":{"input_tokens":36,"cache_read_input_tokens":64,"cache_creation_input_tokens":0,"output_tokens":20}}"#;

    const GEMINI_RESPONSE: &str = r#"{"candidates":[{"content":{"parts":[{"text":"Checking."},
        {"functionCall":{"name":"get_weather","args":{"city":"Paris"}}}],"role":"model"},
        "finishReason":"STOP","index":0}],
      "usageMetadata":{"promptTokenCount":100,"candidatesTokenCount":20,"totalTokenCount":120,"cachedContentTokenCount":64},
      "modelVersion":"gemini-2.5-flash","responseId":"resp1"}"#;

    fn response_fixture(p: Protocol) -> &'static str {
        match p {
            Protocol::OpenAi => OPENAI_RESPONSE,
            Protocol::Anthropic => ANTHROPIC_RESPONSE,
            Protocol::Gemini => GEMINI_RESPONSE,
        }
    }

    #[test]
    fn every_response_direction_keeps_text_tool_call_finish_and_usage() {
        for from in ALL {
            for to in ALL {
                let out = convert_response(from, to, response_fixture(from).as_bytes(), &meta()).unwrap();
                let usage = out.usage.unwrap();
                assert_eq!(
                    (usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens),
                    (100, 20, 64),
                    "{from:?}->{to:?}"
                );
                let back = decode_response(to, &out.body, "x").unwrap();
                assert_eq!(back.finish, Some(FinishReason::ToolCalls), "{from:?}->{to:?}");
                assert_eq!(
                    back.completion_text(),
                    "Checking.get_weather{\"city\":\"Paris\"}",
                    "{from:?}->{to:?}"
                );
                assert_eq!(
                    back.usage.map(|u| (u.prompt_tokens, u.completion_tokens)),
                    Some((100, 20)),
                    "{from:?}->{to:?}"
                );
            }
        }
    }

    #[test]
    fn responses_are_shaped_for_the_client() {
        let o = parse(
            &convert_response(Protocol::Anthropic, Protocol::OpenAi, ANTHROPIC_RESPONSE.as_bytes(), &meta())
                .unwrap()
                .body,
        );
        assert_eq!(
            (o["id"].clone(), o["created"].clone(), o["model"].clone()),
            (json!("chatcmpl-req42"), json!(1_700_000_000), json!("client-model"))
        );
        assert_eq!(o["usage"]["prompt_tokens_details"]["cached_tokens"], 64);
        assert_eq!(o["choices"][0]["message"]["tool_calls"][0]["id"], "toolu_01");
        let a = parse(
            &convert_response(Protocol::OpenAi, Protocol::Anthropic, OPENAI_RESPONSE.as_bytes(), &meta())
                .unwrap()
                .body,
        );
        assert_eq!(
            a["usage"],
            json!({"input_tokens":36,"output_tokens":20,"cache_creation_input_tokens":0,"cache_read_input_tokens":64})
        );
        assert_eq!(
            a["content"][1],
            json!({"type":"tool_use","id":"call_abc","name":"get_weather","input":{"city":"Paris"}})
        );
        let g = parse(
            &convert_response(Protocol::OpenAi, Protocol::Gemini, OPENAI_RESPONSE.as_bytes(), &meta())
                .unwrap()
                .body,
        );
        assert_eq!(g["candidates"][0]["content"]["parts"][1]["functionCall"]["id"], "call_abc");
        assert_eq!(g["usageMetadata"]["cachedContentTokenCount"], 64);
    }

    #[test]
    fn same_protocol_responses_pass_through_with_usage() {
        for p in ALL {
            let out = convert_response(p, p, response_fixture(p).as_bytes(), &meta()).unwrap();
            assert_eq!(&out.body[..], response_fixture(p).as_bytes());
            assert_eq!(out.usage.map(|u| u.total_tokens), Some(120), "{p:?}");
        }
    }

    #[test]
    fn stop_reasons_map_across_protocols() {
        let cases = [
            ("end_turn", "stop", "STOP"),
            ("stop_sequence", "stop", "STOP"),
            ("max_tokens", "length", "MAX_TOKENS"),
            ("refusal", "content_filter", "SAFETY"),
        ];
        for (anthropic, openai, gemini) in cases {
            let body = ANTHROPIC_RESPONSE
                .replace(r#""stop_reason":"tool_use""#, &format!(r#""stop_reason":"{anthropic}""#))
                .replace(
                    r#",
        {"type":"tool_use","id":"toolu_01","name":"get_weather","input":{"city":"Paris"}}"#,
                    "",
                );
            let o = parse(
                &convert_response(Protocol::Anthropic, Protocol::OpenAi, body.as_bytes(), &meta())
                    .unwrap()
                    .body,
            );
            assert_eq!(o["choices"][0]["finish_reason"], openai, "{anthropic}");
            let g = parse(
                &convert_response(Protocol::Anthropic, Protocol::Gemini, body.as_bytes(), &meta())
                    .unwrap()
                    .body,
            );
            assert_eq!(g["candidates"][0]["finishReason"], gemini, "{anthropic}");
        }
        let length =
            OPENAI_RESPONSE.replace(r#""finish_reason":"tool_calls""#, r#""finish_reason":"length""#);
        let a = parse(
            &convert_response(Protocol::OpenAi, Protocol::Anthropic, length.as_bytes(), &meta())
                .unwrap()
                .body,
        );
        assert_eq!(a["stop_reason"], "max_tokens");
    }

    #[test]
    fn tool_calls_round_trip_through_a_gemini_channel() {
        // The Gemini upstream answers with an id-less call; the OpenAI client sees a generated id ...
        let reply = convert_response(Protocol::Gemini, Protocol::OpenAi, GEMINI_RESPONSE.as_bytes(), &meta())
            .unwrap();
        let reply = parse(&reply.body);
        let call = reply["choices"][0]["message"]["tool_calls"][0].clone();
        assert_eq!(call["id"], "call_req42_0");
        // ... and answers with it; the next Gemini request names the function again.
        let next = json!({"model":"gpt-4o","messages":[
            {"role":"user","content":"weather?"},
            {"role":"assistant","content":null,"tool_calls":[call]},
            {"role":"tool","tool_call_id":"call_req42_0","content":"{\"temp\":18}"}]});
        let body = serde_json::to_vec(&next).unwrap();
        let out =
            parse(&convert_request(Protocol::OpenAi, Protocol::Gemini, &body, "g", &opts()).unwrap().body);
        assert_eq!(
            out["contents"][2]["parts"][0],
            json!({"functionResponse":{"name":"get_weather","response":{"temp":18}}})
        );
    }

    #[test]
    fn tool_calls_round_trip_between_anthropic_clients_and_openai_channels() {
        let reply = parse(
            &convert_response(Protocol::OpenAi, Protocol::Anthropic, OPENAI_RESPONSE.as_bytes(), &meta())
                .unwrap()
                .body,
        );
        let tool_use = reply["content"][1].clone();
        let next = json!({"model":"claude","max_tokens":10,"messages":[
            {"role":"user","content":"weather?"},
            {"role":"assistant","content":[tool_use]},
            {"role":"user","content":[{"type":"tool_result","tool_use_id":"call_abc","content":"18C"}]}]});
        let body = serde_json::to_vec(&next).unwrap();
        let out = parse(
            &convert_request(Protocol::Anthropic, Protocol::OpenAi, &body, "gpt-4o", &opts()).unwrap().body,
        );
        assert_eq!(out["messages"][1]["tool_calls"][0]["id"], "call_abc");
        assert_eq!(out["messages"][2], json!({"role":"tool","tool_call_id":"call_abc","content":"18C"}));
    }

    #[test]
    fn upstream_errors_are_read_in_each_protocol() {
        assert_eq!(
            upstream_error_message(Protocol::OpenAi, br#"{"error":{"message":"a"}}"#).as_deref(),
            Some("a")
        );
        assert_eq!(
            upstream_error_message(Protocol::Anthropic, br#"{"type":"error","error":{"message":"b"}}"#)
                .as_deref(),
            Some("b")
        );
        assert_eq!(
            upstream_error_message(Protocol::Gemini, br#"{"error":{"code":429,"message":"c"}}"#).as_deref(),
            Some("c")
        );
    }

    #[test]
    fn response_text_reads_completion_for_local_counting() {
        assert_eq!(
            response_text(Protocol::Anthropic, ANTHROPIC_RESPONSE.as_bytes()).unwrap(),
            "Checking.get_weather{\"city\":\"Paris\"}"
        );
    }

    // -- Stream fixtures: one streamed turn with reasoning, text and a tool call, as each provider
    // -- documents it.

    const OPENAI_STREAM: &str = concat!(
        "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"logprobs\":null,\"finish_reason\":null}]}\n\n",
        "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{\"reasoning_content\":\"Paris, so \"},\"logprobs\":null,\"finish_reason\":null}]}\n\n",
        "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Check\"},\"logprobs\":null,\"finish_reason\":null}]}\n\n",
        "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"ing. \\u00e9\"},\"logprobs\":null,\"finish_reason\":null}]}\n\n",
        "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"call_abc\",\"type\":\"function\",\"function\":{\"name\":\"get_weather\",\"arguments\":\"\"}}]},\"logprobs\":null,\"finish_reason\":null}]}\n\n",
        "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"{\\\"city\\\":\"}}]},\"logprobs\":null,\"finish_reason\":null}]}\n\n",
        "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"\\\"Paris\\\"}\"}}]},\"logprobs\":null,\"finish_reason\":null}]}\n\n",
        "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{},\"logprobs\":null,\"finish_reason\":\"tool_calls\"}]}\n\n",
        "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o\",\"choices\":[],\"usage\":{\"prompt_tokens\":100,\"completion_tokens\":20,\"total_tokens\":120,\"prompt_tokens_details\":{\"cached_tokens\":64},\"completion_tokens_details\":{\"reasoning_tokens\":5}}}\n\n",
        "data: [DONE]\n\n",
    );

    const ANTHROPIC_STREAM: &str = concat!(
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":\"claude-sonnet-4-5\",\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":36,\"cache_creation_input_tokens\":0,\"cache_read_input_tokens\":64,\"output_tokens\":1}}}\n\n",
        "event: ping\ndata: {\"type\": \"ping\"}\n\n",
        "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"thinking\",\"thinking\":\"\",\"signature\":\"\"}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"thinking_delta\",\"thinking\":\"Paris, so \"}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"signature_delta\",\"signature\":\"EqQBCgIYAhIM\"}}\n\n",
        "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
        "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":1,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"text_delta\",\"text\":\"Check\"}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"text_delta\",\"text\":\"ing. \\u00e9\"}}\n\n",
        "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":1}\n\n",
        "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":2,\"content_block\":{\"type\":\"tool_use\",\"id\":\"toolu_01\",\"name\":\"get_weather\",\"input\":{}}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":2,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\\\"city\\\":\"}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":2,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"\\\"Paris\\\"}\"}}\n\n",
        "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":2}\n\n",
        "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"tool_use\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":20}}\n\n",
        "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
    );

    const GEMINI_STREAM: &str = concat!(
        "data: {\"candidates\": [{\"content\": {\"parts\": [{\"text\": \"Paris, so \",\"thought\": true}],\"role\": \"model\"},\"index\": 0}],\"usageMetadata\": {\"promptTokenCount\": 100,\"totalTokenCount\": 100,\"cachedContentTokenCount\": 64},\"modelVersion\": \"gemini-2.5-flash\",\"responseId\": \"r1\"}\r\n\r\n",
        "data: {\"candidates\": [{\"content\": {\"parts\": [{\"text\": \"Check\"}],\"role\": \"model\"},\"index\": 0}],\"usageMetadata\": {\"promptTokenCount\": 100,\"totalTokenCount\": 100,\"cachedContentTokenCount\": 64},\"modelVersion\": \"gemini-2.5-flash\",\"responseId\": \"r1\"}\r\n\r\n",
        "data: {\"candidates\": [{\"content\": {\"parts\": [{\"text\": \"ing. \\u00e9\"}],\"role\": \"model\"},\"index\": 0}],\"usageMetadata\": {\"promptTokenCount\": 100,\"totalTokenCount\": 100,\"cachedContentTokenCount\": 64},\"modelVersion\": \"gemini-2.5-flash\",\"responseId\": \"r1\"}\r\n\r\n",
        "data: {\"candidates\": [{\"content\": {\"parts\": [{\"functionCall\": {\"name\": \"get_weather\",\"args\": {\"city\": \"Paris\"}}}],\"role\": \"model\"},\"finishReason\": \"STOP\",\"index\": 0}],\"usageMetadata\": {\"promptTokenCount\": 100,\"candidatesTokenCount\": 15,\"thoughtsTokenCount\": 5,\"totalTokenCount\": 120,\"cachedContentTokenCount\": 64},\"modelVersion\": \"gemini-2.5-flash\",\"responseId\": \"r1\"}\r\n\r\n",
    );

    fn stream_fixture(p: Protocol) -> &'static str {
        match p {
            Protocol::OpenAi => OPENAI_STREAM,
            Protocol::Anthropic => ANTHROPIC_STREAM,
            Protocol::Gemini => GEMINI_STREAM,
        }
    }

    /// Feeds `input` cut at `cuts`, then finishes.
    fn run(
        upstream: Protocol,
        client: Protocol,
        input: &[u8],
        cuts: &[usize],
    ) -> (BytesMut, StreamConverter) {
        let mut conv = StreamConverter::new(upstream, client, &meta(), true);
        let mut out = BytesMut::new();
        let mut points: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
        points.sort_unstable();
        let mut last = 0;
        for p in points.into_iter().chain([input.len()]) {
            conv.feed(&input[last..p], &mut out);
            last = p;
        }
        conv.finish(&mut out);
        (out, conv)
    }

    /// What a client SDK would assemble from a stream: text, reasoning, tool calls, finish, usage.
    #[derive(Debug, PartialEq)]
    struct Assembled {
        text: String,
        thinking: String,
        calls: Vec<(String, String, Value)>,
        finish: Option<FinishReason>,
        usage: Option<(i64, i64, i64)>,
    }

    fn assemble(protocol: Protocol, stream: &[u8]) -> Assembled {
        let mut conv = StreamConverter::new(protocol, protocol, &meta(), true);
        let mut events = Vec::new();
        conv.sse.feed(stream);
        while let Some(ev) = conv.sse.next_event() {
            conv.decoder.decode(&ev, &mut events);
        }
        conv.decoder.finish(&mut events);
        let mut a = Assembled {
            text: String::new(),
            thinking: String::new(),
            calls: vec![],
            finish: None,
            usage: None,
        };
        let mut args: Vec<String> = vec![];
        for ev in events {
            match ev {
                StreamEvent::Text(t) => a.text.push_str(&t),
                StreamEvent::Thinking(t) => a.thinking.push_str(&t),
                StreamEvent::ToolCallStart { id, name, .. } => {
                    a.calls.push((id, name, Value::Null));
                    args.push(String::new());
                }
                StreamEvent::ToolCallArgs { index, json } => args[index].push_str(&json),
                StreamEvent::Finish(f) => a.finish = Some(f),
                StreamEvent::Usage(u) => {
                    a.usage = Some((u.prompt_tokens, u.completion_tokens, u.cached_tokens))
                }
                _ => {}
            }
        }
        for (call, json) in a.calls.iter_mut().zip(args) {
            call.2 = serde_json::from_str(&json).unwrap();
        }
        a
    }

    #[test]
    fn every_stream_direction_delivers_the_same_turn() {
        for upstream in ALL {
            let expected = assemble(upstream, stream_fixture(upstream).as_bytes());
            for client in ALL {
                let (out, conv) = run(upstream, client, stream_fixture(upstream).as_bytes(), &[]);
                let got = assemble(client, &out);
                assert_eq!(got.text, "Checking. é", "{upstream:?}->{client:?}");
                assert_eq!(got.thinking, "Paris, so ", "{upstream:?}->{client:?}");
                assert_eq!(got.calls, expected.calls, "{upstream:?}->{client:?}");
                assert_eq!(got.calls[0].2, json!({"city":"Paris"}), "{upstream:?}->{client:?}");
                assert_eq!(got.finish, Some(FinishReason::ToolCalls), "{upstream:?}->{client:?}");
                assert_eq!(got.usage, Some((100, 20, 64)), "{upstream:?}->{client:?}");
                let u = conv.usage().unwrap();
                assert_eq!((u.prompt_tokens, u.completion_tokens, u.total_tokens), (100, 20, 120));
                assert!(conv.delivered_text().contains("Checking. é"), "{upstream:?}->{client:?}");
                assert!(conv.delivered_text().contains("get_weather"), "{upstream:?}->{client:?}");
            }
        }
    }

    #[test]
    fn same_protocol_streams_pass_bytes_through() {
        for p in ALL {
            let (out, conv) = run(p, p, stream_fixture(p).as_bytes(), &[7, 300, 301]);
            assert_eq!(&out[..], stream_fixture(p).as_bytes(), "{p:?}");
            assert_eq!(conv.usage().map(|u| u.total_tokens), Some(120), "{p:?}");
        }
    }

    fn event_names(out: &[u8]) -> Vec<String> {
        let mut sse = SseDecoder::new();
        sse.feed(out);
        std::iter::from_fn(|| sse.next_event()).map(|e| e.event.unwrap_or_default()).collect()
    }

    /// message_start, then blocks each opened, filled and closed in turn, then message_delta and
    /// message_stop.
    fn assert_anthropic_order(out: &[u8]) {
        let names = event_names(out);
        assert_eq!(names.first().map(String::as_str), Some("message_start"));
        assert_eq!(names[names.len() - 2..], ["message_delta", "message_stop"]);
        let mut open = false;
        for name in &names[1..names.len() - 2] {
            match name.as_str() {
                "content_block_start" => {
                    assert!(!open);
                    open = true;
                }
                "content_block_delta" => assert!(open),
                "content_block_stop" => {
                    assert!(open);
                    open = false;
                }
                other => panic!("unexpected event {other}"),
            }
        }
        assert!(!open);
    }

    #[test]
    fn anthropic_clients_get_the_exact_event_order_from_any_upstream() {
        for upstream in [Protocol::OpenAi, Protocol::Gemini] {
            let (out, _) = run(upstream, Protocol::Anthropic, stream_fixture(upstream).as_bytes(), &[]);
            assert_anthropic_order(&out);
        }
    }

    #[test]
    fn anthropic_clients_learn_the_prompt_size_at_message_start_when_the_upstream_tells_it() {
        let (out, _) = run(Protocol::Gemini, Protocol::Anthropic, GEMINI_STREAM.as_bytes(), &[]);
        let mut sse = SseDecoder::new();
        sse.feed(&out);
        let start = parse(&sse.next_event().unwrap().data);
        assert_eq!(start["message"]["usage"]["input_tokens"], 36);
        assert_eq!(start["message"]["usage"]["cache_read_input_tokens"], 64);
    }

    #[test]
    fn openai_clients_get_usage_last_then_done_only_when_asked() {
        let (out, _) = run(Protocol::Anthropic, Protocol::OpenAi, ANTHROPIC_STREAM.as_bytes(), &[]);
        let text = String::from_utf8(out.to_vec()).unwrap();
        let datas: Vec<&str> = text.split("\n\n").filter(|s| !s.is_empty()).collect();
        assert_eq!(datas[datas.len() - 1], "data: [DONE]");
        let usage = parse(&datas[datas.len() - 2].as_bytes()[6..]);
        assert_eq!(usage["usage"]["prompt_tokens_details"]["cached_tokens"], 64);
        let mut conv = StreamConverter::new(Protocol::Anthropic, Protocol::OpenAi, &meta(), false);
        let mut out = BytesMut::new();
        conv.feed(ANTHROPIC_STREAM.as_bytes(), &mut out);
        conv.finish(&mut out);
        assert!(!String::from_utf8_lossy(&out).contains("\"usage\""));
        assert_eq!(conv.usage().map(|u| u.total_tokens), Some(120), "usage is collected for billing anyway");
    }

    #[test]
    fn gemini_clients_get_finish_and_usage_in_the_last_chunk() {
        let (out, _) = run(Protocol::OpenAi, Protocol::Gemini, OPENAI_STREAM.as_bytes(), &[]);
        let mut sse = SseDecoder::new();
        sse.feed(&out);
        let last = std::iter::from_fn(|| sse.next_event()).last().unwrap();
        let last = parse(&last.data);
        assert_eq!(last["candidates"][0]["finishReason"], "STOP");
        assert_eq!(
            last["usageMetadata"],
            json!({"promptTokenCount":100,"candidatesTokenCount":15,"totalTokenCount":120,"cachedContentTokenCount":64,"thoughtsTokenCount":5})
        );
    }

    #[test]
    fn a_cut_off_upstream_still_ends_the_client_stream() {
        let cut = &ANTHROPIC_STREAM.as_bytes()[..ANTHROPIC_STREAM
            .find("event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":1}")
            .unwrap()];
        let (out, conv) = run(Protocol::Anthropic, Protocol::OpenAi, cut, &[]);
        assert!(out.ends_with(b"data: [DONE]\n\n"));
        assert_eq!(conv.delivered_text(), "Paris, so Checking. é");
        let (out, _) = run(Protocol::OpenAi, Protocol::Anthropic, &OPENAI_STREAM.as_bytes()[..700], &[]);
        assert_anthropic_order(&out);
    }

    #[test]
    fn upstream_stream_errors_reach_the_client_in_its_protocol() {
        let err = "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n";
        let (out, _) = run(Protocol::Anthropic, Protocol::OpenAi, err.as_bytes(), &[]);
        assert_eq!(
            &out[..],
            b"data: {\"error\":{\"message\":\"Overloaded\",\"type\":\"upstream_error\"}}\n\n"
        );
        let (out, _) = run(Protocol::Anthropic, Protocol::Gemini, err.as_bytes(), &[]);
        assert!(String::from_utf8_lossy(&out).contains("\"message\":\"Overloaded\""));
    }

    proptest! {
        #[test]
        fn stream_output_is_the_same_whatever_the_chunking(
            pair in 0usize..9,
            cuts in proptest::collection::vec(0usize..5000, 0..24),
        ) {
            let (upstream, client) = (ALL[pair / 3], ALL[pair % 3]);
            let input = stream_fixture(upstream).as_bytes();
            let (whole, _) = run(upstream, client, input, &[]);
            let (split, conv) = run(upstream, client, input, &cuts);
            prop_assert_eq!(&whole[..], &split[..]);
            prop_assert_eq!(conv.usage().map(|u| u.total_tokens), Some(120));
        }

        #[test]
        fn arbitrary_bytes_never_panic_a_converter(
            pair in 0usize..9,
            bytes in proptest::collection::vec(any::<u8>(), 0..400),
        ) {
            let (upstream, client) = (ALL[pair / 3], ALL[pair % 3]);
            let mut conv = StreamConverter::new(upstream, client, &meta(), true);
            let mut out = BytesMut::new();
            conv.feed(&bytes, &mut out);
            conv.feed(b"\n\ndata: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":7,\"function\":{\"arguments\":\"x\"}}]}}]}\n\n", &mut out);
            conv.finish(&mut out);
            conv.finish(&mut out);
        }

        #[test]
        fn arbitrary_request_json_never_panics_a_conversion(
            from in 0usize..3,
            to in 0usize..3,
            body in "\\{(\"(model|messages|role|content|contents|parts|system|tools|max_tokens)\":(\"[a-z]{0,3}\"|\\[\\]|\\{\\}|1|null),?){0,6}\\}",
        ) {
            let _ = convert_request(ALL[from], ALL[to], body.as_bytes(), "m", &opts());
            let _ = convert_response(ALL[from], ALL[to], body.as_bytes(), &meta());
        }
    }
}
