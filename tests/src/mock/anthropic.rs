//! The Anthropic Messages wire bodies the mock answers with.
//!
//! Owns the text of `POST /v1/messages` answers: a whole `message` (text or one `tool_use` block), its
//! stream in Anthropic's exact event order (`message_start`, `content_block_start`,
//! `content_block_delta` × chunks, `content_block_stop`, `message_delta` with the stop reason and
//! `usage.output_tokens`, `message_stop`; no `ping`), and the error shape. Pure string building, like
//! [`super::openai`].

use super::openai::{Call, pieces, quoted, split_even};

/// Identity and numbers of one message.
#[derive(Debug, Clone)]
pub struct Message<'a> {
    pub id: &'a str,
    pub model: &'a str,
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// `event: NAME\ndata: JSON\n\n`.
pub fn event(name: &str, json: &str) -> String {
    format!("event: {name}\ndata: {json}\n\n")
}

impl Message<'_> {
    fn envelope(&self, content: &str, stop_reason: &str, usage: &str) -> String {
        format!(
            r#"{{"id":{},"type":"message","role":"assistant","model":{},"content":[{content}],"stop_reason":{stop_reason},"stop_sequence":null,"usage":{usage}}}"#,
            quoted(self.id),
            quoted(self.model),
        )
    }

    fn usage(&self) -> String {
        format!(r#"{{"input_tokens":{},"output_tokens":{}}}"#, self.input_tokens, self.output_tokens)
    }

    /// The whole non-streamed message answering with `text` (stop reason `end_turn`).
    pub fn full(&self, text: &str) -> String {
        self.envelope(
            &format!(r#"{{"type":"text","text":{}}}"#, quoted(text)),
            r#""end_turn""#,
            &self.usage(),
        )
    }

    /// The whole non-streamed message calling `call` (stop reason `tool_use`).
    pub fn full_tool_use(&self, call: &Call) -> String {
        let block = format!(
            r#"{{"type":"tool_use","id":{},"name":{},"input":{}}}"#,
            quoted(call.id),
            quoted(call.name),
            call.arguments
        );
        self.envelope(&block, r#""tool_use""#, &self.usage())
    }

    /// The stream of a message answering with `text` in `chunks` deltas.
    pub fn events(&self, text: &str, chunks: usize) -> Vec<String> {
        let deltas = pieces(text, chunks).into_iter().map(|p| {
            format!(
                r#"{{"type":"content_block_delta","index":0,"delta":{{"type":"text_delta","text":{}}}}}"#,
                quoted(p)
            )
        });
        self.stream(r#"{"type":"text","text":""}"#, deltas, "end_turn")
    }

    /// The stream of a message calling `call`, its input JSON in `chunks` deltas.
    pub fn tool_use_events(&self, call: &Call, chunks: usize) -> Vec<String> {
        let start = format!(
            r#"{{"type":"tool_use","id":{},"name":{},"input":{{}}}}"#,
            quoted(call.id),
            quoted(call.name)
        );
        let deltas = split_even(call.arguments, chunks).into_iter().map(|p| {
            format!(
                r#"{{"type":"content_block_delta","index":0,"delta":{{"type":"input_json_delta","partial_json":{}}}}}"#,
                quoted(p)
            )
        });
        self.stream(&start, deltas, "tool_use")
    }

    fn stream(&self, block: &str, deltas: impl Iterator<Item = String>, stop_reason: &str) -> Vec<String> {
        // As Anthropic does: the start reports the input and a first output token, the final
        // `message_delta` the cumulative output.
        let start_usage = format!(
            r#"{{"input_tokens":{},"output_tokens":{}}}"#,
            self.input_tokens,
            self.output_tokens.min(1)
        );
        let mut events = vec![
            event(
                "message_start",
                &format!(
                    r#"{{"type":"message_start","message":{}}}"#,
                    self.envelope("", "null", &start_usage)
                ),
            ),
            event(
                "content_block_start",
                &format!(r#"{{"type":"content_block_start","index":0,"content_block":{block}}}"#),
            ),
        ];
        events.extend(deltas.map(|d| event("content_block_delta", &d)));
        events.push(event("content_block_stop", r#"{"type":"content_block_stop","index":0}"#));
        events.push(event(
            "message_delta",
            &format!(
                r#"{{"type":"message_delta","delta":{{"stop_reason":"{stop_reason}","stop_sequence":null}},"usage":{{"output_tokens":{}}}}}"#,
                self.output_tokens
            ),
        ));
        events.push(event("message_stop", r#"{"type":"message_stop"}"#));
        events
    }
}

/// The Anthropic error shape, its `error.type` derived from `status`.
pub fn error(status: u16, message: &str) -> String {
    let kind = match status {
        400 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        529 => "overloaded_error",
        _ => "api_error",
    };
    format!(r#"{{"type":"error","error":{{"type":"{kind}","message":{}}}}}"#, quoted(message))
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    fn message() -> Message<'static> {
        Message { id: "msg-1", model: "claude\"x", input_tokens: 3, output_tokens: 4 }
    }

    /// (event name, data JSON) of each event.
    fn parse(events: &[String]) -> Vec<(String, Value)> {
        events
            .iter()
            .map(|e| {
                let (name, data) = e.trim_end().split_once('\n').unwrap();
                let name = name.strip_prefix("event: ").unwrap().to_owned();
                let data: Value = serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap();
                assert_eq!(data["type"], name.as_str());
                (name, data)
            })
            .collect()
    }

    #[test]
    fn a_message_carries_text_stop_reason_and_usage() {
        let v: Value = serde_json::from_str(&message().full("hi")).unwrap();
        assert_eq!((v["type"].as_str(), v["model"].as_str()), (Some("message"), Some("claude\"x")));
        assert_eq!(v["content"][0]["text"], "hi");
        assert_eq!(v["stop_reason"], "end_turn");
        assert_eq!(v["usage"], serde_json::json!({"input_tokens": 3, "output_tokens": 4}));
    }

    #[test]
    fn the_stream_follows_anthropics_event_order() {
        let events = parse(&message().events("a b c", 3));
        let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        assert_eq!(events[0].1["message"]["usage"]["input_tokens"], 3);
        let text: String = events[2..5].iter().map(|(_, d)| d["delta"]["text"].as_str().unwrap()).collect();
        assert_eq!(text, "a b c");
        assert_eq!(events[6].1["usage"]["output_tokens"], 4);
        assert_eq!(events[6].1["delta"]["stop_reason"], "end_turn");
    }

    #[test]
    fn a_tool_use_answers_with_a_tool_use_block_whole_and_streamed() {
        let call = Call { id: "toolu-1", name: "f", arguments: r#"{"a":[1,2]}"# };
        let v: Value = serde_json::from_str(&message().full_tool_use(&call)).unwrap();
        assert_eq!(v["content"][0]["input"], serde_json::json!({"a": [1, 2]}));
        assert_eq!(v["stop_reason"], "tool_use");
        let events = parse(&message().tool_use_events(&call, 2));
        assert_eq!(events[1].1["content_block"]["type"], "tool_use");
        let json: String =
            events[2..4].iter().map(|(_, d)| d["delta"]["partial_json"].as_str().unwrap()).collect();
        assert_eq!(json, call.arguments);
        assert_eq!(events[5].1["delta"]["stop_reason"], "tool_use");
    }

    #[test]
    fn errors_name_the_anthropic_type() {
        let v: Value = serde_json::from_str(&error(401, "no")).unwrap();
        assert_eq!(
            (v["type"].as_str(), v["error"]["type"].as_str()),
            (Some("error"), Some("authentication_error"))
        );
    }
}
