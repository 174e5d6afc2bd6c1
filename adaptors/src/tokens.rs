//! Token counting with OpenAI's BPE encodings, for the prompt estimate behind a pre-deduction and
//! for completions whose upstream reported no usage.
//!
//! Two encodings, both compiled into the binary by `tiktoken-rs` (no download, works offline):
//!
//! - **o200k_base** for the gpt-4o, chatgpt-4o, gpt-4.1, gpt-4.5, gpt-5, gpt-oss and o-series
//!   (`o1`, `o3`, `o4-mini`, …) families and `codex-mini`;
//! - **cl100k_base** for gpt-3.5, gpt-4 and the embedding models, and for every other model. Claude,
//!   Gemini and open models have their own tokenizers, which are not public or not shipped here:
//!   their counts are a cl100k approximation, typically within ±20% of the provider's, which is what
//!   an estimate needs; their upstreams report real usage for billing.
//!
//! Each encoding is loaded once per process, on first use (a few hundred milliseconds, tens of MB),
//! and then shared read-only by every worker. Should an encoding fail to load, counts fall back to
//! one token per four bytes of UTF-8, rounded up.
//!
//! Text is encoded as ordinary text: special-token markers such as `<|endoftext|>` in user input are
//! counted as the characters they are, never as control tokens.
//!
//! Pure: no I/O, no clocks; the first call to a not yet loaded encoding takes its time to load.

use std::sync::OnceLock;

use tiktoken_rs::CoreBPE;

use crate::ir::{ChatRequest, Part, Role, Tool};

/// Framing tokens OpenAI adds around each chat message (`<|start|>{role}<|message|>…<|end|>`).
pub const TOKENS_PER_MESSAGE: u32 = 3;
/// Extra token for a message that carries a `name`.
pub const TOKENS_PER_NAME: u32 = 1;
/// Tokens that prime the reply (`<|start|>assistant<|message|>`), once per request.
pub const REPLY_PRIMING_TOKENS: u32 = 3;

/// A BPE encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    O200k,
    Cl100k,
}

/// Model-name prefixes (after any `provider/` path and `ft:` prefix) that use o200k_base.
const O200K_PREFIXES: &[&str] =
    &["gpt-4o", "chatgpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "gpt-oss", "codex-mini", "omni-moderation"];

/// The encoding used to count tokens for `model` (ASCII case-insensitive; `openai/gpt-4o`,
/// `ft:gpt-4o-mini:org::id` and `gpt-4o-2024-08-06` all count as gpt-4o).
pub fn encoding_for(model: &str) -> Encoding {
    let base = model.rsplit('/').next().unwrap_or(model);
    let base = strip_prefix_ignore_case(base, "ft:").unwrap_or(base);
    let o_series = base.len() >= 2
        && base.as_bytes()[0].eq_ignore_ascii_case(&b'o')
        && base.as_bytes()[1].is_ascii_digit();
    if o_series || O200K_PREFIXES.iter().any(|p| strip_prefix_ignore_case(base, p).is_some()) {
        Encoding::O200k
    } else {
        Encoding::Cl100k
    }
}

fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix).then(|| &s[prefix.len()..])
}

impl Encoding {
    /// Tokens in `text`.
    pub fn count(self, text: &str) -> u32 {
        if text.is_empty() {
            return 0;
        }
        let n = match self.bpe() {
            Some(bpe) => bpe.encode_ordinary(text).len(),
            None => text.len().div_ceil(4),
        };
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// The encoding's tables, loaded on first use; `None` if they failed to load.
    fn bpe(self) -> Option<&'static CoreBPE> {
        static O200K: OnceLock<Option<CoreBPE>> = OnceLock::new();
        static CL100K: OnceLock<Option<CoreBPE>> = OnceLock::new();
        match self {
            Encoding::O200k => O200K.get_or_init(|| tiktoken_rs::o200k_base().ok()).as_ref(),
            Encoding::Cl100k => CL100K.get_or_init(|| tiktoken_rs::cl100k_base().ok()).as_ref(),
        }
    }
}

/// Tokens in `text` for `model`.
pub fn count_text(model: &str, text: &str) -> u32 {
    encoding_for(model).count(text)
}

/// One chat message as OpenAI's counting rule sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PromptMessage<'a> {
    pub role: &'a str,
    pub content: &'a str,
    pub name: Option<&'a str>,
}

/// Prompt tokens of a chat request, by OpenAI's documented rule: per message 3 framing tokens plus
/// its role and content (and its name plus 1 when it has one), plus 3 tokens priming the reply.
/// Matches what the OpenAI API reports for text-only messages.
pub fn count_messages(model: &str, messages: &[PromptMessage<'_>]) -> u32 {
    let enc = encoding_for(model);
    let body = messages.iter().fold(0u32, |sum, m| {
        let name = m.name.map_or(0, |n| enc.count(n).saturating_add(TOKENS_PER_NAME));
        sum.saturating_add(TOKENS_PER_MESSAGE)
            .saturating_add(enc.count(m.role))
            .saturating_add(enc.count(m.content))
            .saturating_add(name)
    });
    body.saturating_add(REPLY_PRIMING_TOKENS)
}

/// Prompt tokens of a request in neutral form, for any client protocol.
///
/// The system prompt counts as a `system` message, each message by the rule of [`count_messages`]
/// with its parts counted one by one: text and reasoning, a tool call's name and arguments, a tool
/// result's content. Images count 0 here: their cost comes from [`crate::vision`]. Each tool counts
/// as the JSON text `{"name":…,"description":…,"parameters":…}`, a slight over-estimate of the
/// provider's own rendering of function definitions.
pub fn count_chat_prompt(model: &str, request: &ChatRequest) -> u32 {
    let enc = encoding_for(model);
    chat_prompt_with(request, |text| enc.count(text))
}

/// An upper bound of an OpenAI or Anthropic chat body's prompt tokens read from the raw body alone,
/// when it can be had without decoding: the body's length, since every prompt byte (text, tool
/// definitions, tool-call arguments) appears in it at least once and each message's JSON framing is
/// longer than the tokens that framing costs. `None` when the body may hold an image (whose cost is
/// not in its bytes) or a `\u00..` escape (which could spell one); the caller then decodes the body
/// and uses [`chat_prompt_upper_bound`].
pub fn chat_body_upper_bound(body: &[u8]) -> Option<u32> {
    if memchr::memmem::find(body, b"image").is_some() || memchr::memmem::find(body, b"\\u00").is_some() {
        return None;
    }
    u32::try_from(body.len()).ok()
}

/// An upper bound of [`count_chat_prompt`] in a fraction of its time: the same framing, with every text
/// counted as its length in bytes (a BPE token always stands for at least one byte, so this never
/// undercounts; English text runs about four bytes a token).
pub fn chat_prompt_upper_bound(request: &ChatRequest) -> u32 {
    chat_prompt_with(request, |text| u32::try_from(text.len()).unwrap_or(u32::MAX))
}

fn chat_prompt_with(request: &ChatRequest, count: impl Fn(&str) -> u32) -> u32 {
    let framed =
        |role: &str, content: u32| TOKENS_PER_MESSAGE.saturating_add(count(role)).saturating_add(content);
    let mut total = REPLY_PRIMING_TOKENS;
    if !request.system.is_empty() {
        total = total.saturating_add(framed("system", count(&request.system)));
    }
    for message in &request.messages {
        let role = match message.role {
            Role::User => "user",
            Role::Assistant => "assistant",
        };
        let content =
            message.parts.iter().fold(0u32, |sum, part| sum.saturating_add(count_part(&count, part)));
        total = total.saturating_add(framed(role, content));
    }
    request.tools.iter().fold(total, |sum, tool| sum.saturating_add(count_tool(&count, tool)))
}

fn count_part(count: &impl Fn(&str) -> u32, part: &Part) -> u32 {
    match part {
        Part::Text(text) => count(text),
        Part::Thinking { text, .. } => count(text),
        Part::ToolCall(call) => count(&call.name).saturating_add(count(&call.arguments)),
        Part::ToolResult(result) => count(&result.content),
        Part::Image(_) => 0,
    }
}

fn count_tool(count: &impl Fn(&str) -> u32, tool: &Tool) -> u32 {
    let json = serde_json::json!({
        "name": tool.name,
        "description": tool.description,
        "parameters": tool.parameters,
    });
    count(&json.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{Message, ToolCall};

    #[test]
    fn the_byte_bound_never_undercounts_the_tokenizer() {
        let request = ChatRequest {
            system: "You are terse. 你好，世界".into(),
            messages: vec![Message {
                role: Role::User,
                parts: vec![Part::Text("Say hello in one short sentence, then count to ten.".into())],
            }],
            ..ChatRequest::default()
        };
        for model in ["gpt-4o", "gpt-4", "claude-3-5-sonnet-20241022"] {
            let exact = count_chat_prompt(model, &request);
            let bound = chat_prompt_upper_bound(&request);
            assert!(bound >= exact && bound <= exact * 6, "{model}: {bound} vs {exact}");
        }
    }

    #[test]
    fn the_raw_body_bound_covers_the_decoded_bound_and_the_tokenizer() {
        let opts = crate::convert::RequestOptions::default();
        let bodies: [(crate::Protocol, &str); 6] = [
            (crate::Protocol::OpenAi, r#"{"model":"m","messages":[{"role":"user","content":""}]}"#),
            (
                crate::Protocol::OpenAi,
                r#"{"model":"m","messages":[{"role":"system","content":"s"},{"role":"user","content":"a"},{"role":"assistant","content":"b"},{"role":"user","content":"c"}]}"#,
            ),
            (
                crate::Protocol::OpenAi,
                r#"{"model":"m","messages":[{"role":"user","content":"你好，世界。東京は晴れ。"}]}"#,
            ),
            (
                crate::Protocol::OpenAi,
                r#"{"model":"m","tools":[{"type":"function","function":{"name":"w","description":"weather","parameters":{"type":"object","properties":{"c":{"type":"string"}}}}}],"messages":[{"role":"user","content":"x"},{"role":"assistant","content":null,"tool_calls":[{"id":"1","type":"function","function":{"name":"w","arguments":"{\"c\":\"Paris\"}"}}]},{"role":"tool","tool_call_id":"1","content":"sunny"}]}"#,
            ),
            (
                crate::Protocol::Anthropic,
                r#"{"model":"m","max_tokens":5,"system":"s","messages":[{"role":"user","content":"a"},{"role":"user","content":[{"type":"text","text":"b"}]}]}"#,
            ),
            (
                crate::Protocol::Anthropic,
                r#"{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"q"},{"role":"assistant","content":[{"type":"tool_use","id":"t","name":"w","input":{"c":"P"}}]},{"role":"user","content":[{"type":"tool_result","tool_use_id":"t","content":"ok"}]}]}"#,
            ),
        ];
        for (protocol, body) in bodies {
            let request = crate::convert::decode_request(protocol, body.as_bytes(), &opts).unwrap();
            let raw = chat_body_upper_bound(body.as_bytes()).unwrap();
            assert!(raw >= chat_prompt_upper_bound(&request), "{body}");
            assert!(raw >= count_chat_prompt("gpt-4o", &request), "{body}");
        }
        for body in [
            r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"https://x/y.png"}}]}]}"#,
            r#"{"model":"m","messages":[{"role":"user","content":[{"type":"\u0069mage_url"}]}]}"#,
        ] {
            assert_eq!(chat_body_upper_bound(body.as_bytes()), None, "{body}");
        }
    }

    #[test]
    fn hello_world_is_two_tokens_in_both_encodings() {
        assert_eq!(Encoding::O200k.count("hello world"), 2);
        assert_eq!(Encoding::Cl100k.count("hello world"), 2);
    }

    #[test]
    fn the_cookbook_example_is_six_tokens_in_cl100k() {
        // OpenAI's token-counting cookbook: "tiktoken is great!" → t|ik|token| is| great|!
        assert_eq!(count_text("gpt-4", "tiktoken is great!"), 6);
    }

    #[test]
    fn empty_text_is_zero_tokens() {
        assert_eq!(count_text("gpt-4o", ""), 0);
    }

    #[test]
    fn special_token_markers_in_text_count_as_ordinary_text() {
        assert!(count_text("gpt-4o", "<|endoftext|>") > 1);
    }

    #[test]
    fn o200k_serves_the_gpt_4o_4_1_5_and_o_families() {
        for model in [
            "gpt-4o",
            "gpt-4o-mini-2024-07-18",
            "GPT-4.1-nano",
            "gpt-5",
            "gpt-5.1-codex",
            "o1",
            "o3-mini",
            "o4-mini",
            "chatgpt-4o-latest",
            "gpt-oss-120b",
        ] {
            assert_eq!(encoding_for(model), Encoding::O200k, "{model}");
        }
    }

    #[test]
    fn cl100k_serves_gpt_3_5_gpt_4_embeddings_and_everything_else() {
        for model in [
            "gpt-3.5-turbo",
            "gpt-4",
            "gpt-4-turbo",
            "text-embedding-3-small",
            "claude-sonnet-4-5",
            "gemini-2.5-pro",
            "omega-7b",
            "o",
            "",
        ] {
            assert_eq!(encoding_for(model), Encoding::Cl100k, "{model}");
        }
    }

    #[test]
    fn provider_paths_and_fine_tune_prefixes_are_seen_through() {
        assert_eq!(encoding_for("openai/gpt-4o"), Encoding::O200k);
        assert_eq!(encoding_for("ft:gpt-4o-mini-2024-07-18:org::abc"), Encoding::O200k);
    }

    /// The example conversation of OpenAI's token-counting cookbook.
    fn cookbook_messages() -> Vec<PromptMessage<'static>> {
        let m = |role, name, content| PromptMessage { role, content, name };
        vec![
            m(
                "system",
                None,
                "You are a helpful, pattern-following assistant that translates corporate jargon into plain English.",
            ),
            m("system", Some("example_user"), "New synergies will help drive top-line growth."),
            m("system", Some("example_assistant"), "Things working well together will increase revenue."),
            m(
                "system",
                Some("example_user"),
                "Let's circle back when we have more bandwidth to touch base on opportunities for increased leverage.",
            ),
            m(
                "system",
                Some("example_assistant"),
                "Let's talk later when we're less busy about how to do better.",
            ),
            m(
                "user",
                None,
                "This late pivot means we don't have time to boil the ocean for the client deliverable.",
            ),
        ]
    }

    #[test]
    fn the_cookbook_conversation_is_129_prompt_tokens_for_gpt_4() {
        assert_eq!(count_messages("gpt-4-0613", &cookbook_messages()), 129);
    }

    #[test]
    fn the_cookbook_conversation_is_124_prompt_tokens_for_gpt_4o() {
        assert_eq!(count_messages("gpt-4o", &cookbook_messages()), 124);
    }

    #[test]
    fn a_name_costs_its_tokens_plus_one() {
        let plain = PromptMessage { role: "user", content: "hi", name: None };
        let named = PromptMessage { name: Some("bob"), ..plain };
        assert_eq!(
            count_messages("gpt-4o", &[named]) - count_messages("gpt-4o", &[plain]),
            count_text("gpt-4o", "bob") + 1
        );
    }

    #[test]
    fn an_empty_conversation_is_the_reply_priming() {
        assert_eq!(count_messages("gpt-4o", &[]), REPLY_PRIMING_TOKENS);
    }

    #[test]
    fn a_neutral_request_counts_like_the_same_openai_messages() {
        let request = ChatRequest {
            system: "You are terse.".into(),
            messages: vec![Message { role: Role::User, parts: vec![Part::Text("hello world".into())] }],
            ..ChatRequest::default()
        };
        let openai = [
            PromptMessage { role: "system", content: "You are terse.", name: None },
            PromptMessage { role: "user", content: "hello world", name: None },
        ];
        assert_eq!(count_chat_prompt("gpt-4o", &request), count_messages("gpt-4o", &openai));
    }

    #[test]
    fn tool_calls_count_their_name_and_arguments() {
        let call = |arguments: &str| ChatRequest {
            messages: vec![Message {
                role: Role::Assistant,
                parts: vec![Part::ToolCall(ToolCall {
                    id: "c1".into(),
                    name: "get_weather".into(),
                    arguments: arguments.into(),
                })],
            }],
            ..ChatRequest::default()
        };
        let args = r#"{"city":"Paris"}"#;
        assert_eq!(
            count_chat_prompt("gpt-4o", &call(args)) - count_chat_prompt("gpt-4o", &call("")),
            count_text("gpt-4o", args)
        );
    }

    #[test]
    fn tools_count_as_their_json() {
        let tool = Tool {
            name: "get_weather".into(),
            description: Some("Weather of a city".into()),
            parameters: serde_json::json!({"type": "object", "properties": {"city": {"type": "string"}}}),
        };
        let with = ChatRequest { tools: vec![tool.clone()], ..ChatRequest::default() };
        let json = serde_json::json!({"name": tool.name, "description": tool.description, "parameters": tool.parameters});
        assert_eq!(
            count_chat_prompt("gpt-4o", &with) - REPLY_PRIMING_TOKENS,
            count_text("gpt-4o", &json.to_string())
        );
    }

    #[test]
    fn images_count_nothing_here() {
        let image = crate::ir::Image {
            source: crate::ir::ImageSource::Url { url: "https://example.com/a.png".into(), media_type: None },
            detail: None,
        };
        let request = ChatRequest {
            messages: vec![Message { role: Role::User, parts: vec![Part::Image(image)] }],
            ..ChatRequest::default()
        };
        assert_eq!(
            count_chat_prompt("gpt-4o", &request),
            REPLY_PRIMING_TOKENS + TOKENS_PER_MESSAGE + count_text("gpt-4o", "user")
        );
    }

    /// `cargo test --release -p burncloud-adaptors --lib -- tokens::tests::timing --ignored --nocapture`
    #[test]
    #[ignore]
    fn timing_count_text_of_10_kb_english() {
        let sentence =
            "The gateway counts tokens locally when the upstream reports no usage, so billing stays exact. ";
        let text = sentence.repeat(10_000 / sentence.len() + 1);
        for (name, model) in [("cl100k", "gpt-4"), ("o200k", "gpt-4o")] {
            let start = std::time::Instant::now();
            let tokens = count_text(model, "warm up");
            let load = start.elapsed();
            let n = 200;
            let start = std::time::Instant::now();
            let mut total = tokens;
            for _ in 0..n {
                total = total.wrapping_add(count_text(model, std::hint::black_box(&text)));
            }
            let per = start.elapsed() / n;
            println!(
                "{name}: first load {load:?}; count_text({} bytes) {per:?} ({} tokens)",
                text.len(),
                count_text(model, &text)
            );
            assert!(total > 0);
        }
    }
}
