//! The OpenAI wire bodies the mock answers with.
//!
//! Owns the text of every response: chat completions (text or a tool call) and their stream chunks,
//! text completions, embeddings, the model list and the error shape; also the text helpers the
//! Anthropic and Gemini bodies share ([`quoted`], [`generated_text`], [`pieces`], [`split_even`]). Pure string building (no I/O, no clock: the
//! caller passes `created` and the id); the JSON is written directly rather than through a value
//! tree so the mock stays cheap under load.

use serde_json::Value;

/// Models `GET /v1/models` lists.
pub const MODELS: &[&str] = &["gpt-4o-mini", "gpt-4o", "text-embedding-3-small", "gpt-3.5-turbo-instruct"];
/// Length of every embedding vector.
pub const EMBEDDING_DIMENSION: usize = 8;
/// The end of an OpenAI event stream.
pub const DONE: &[u8] = b"data: [DONE]\n\n";

const WORDS: &[&str] = &["Hello", "from", "the", "mock", "upstream", "of", "BurnCloud"];

/// Which OpenAI endpoint family a completion belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Chat,
    Text,
}

/// Identity and numbers of one completion.
#[derive(Debug, Clone)]
pub struct Completion<'a> {
    pub api: Api,
    pub id: &'a str,
    pub created: u64,
    pub model: &'a str,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// A JSON string literal, quoted and escaped.
pub fn quoted(s: &str) -> String {
    Value::String(s.to_owned()).to_string()
}

/// `words` words of generated text (about one token each).
pub fn generated_text(words: u64) -> String {
    let mut text = String::new();
    for i in 0..words {
        if i > 0 {
            text.push(' ');
        }
        text.push_str(WORDS[(i % WORDS.len() as u64) as usize]);
    }
    text
}

/// Splits `text` at word boundaries into `parts` pieces (some may be empty); concatenated they give
/// back `text`.
pub fn pieces(text: &str, parts: usize) -> Vec<&str> {
    let parts = parts.max(1);
    let bounds: Vec<usize> = std::iter::once(0)
        .chain(text.match_indices(' ').map(|(i, _)| i))
        .chain(std::iter::once(text.len()))
        .collect();
    let words = bounds.len() - 1;
    (0..parts)
        .map(|k| {
            let from = bounds[k * words / parts];
            let to = bounds[(k + 1) * words / parts];
            &text[from..to]
        })
        .collect()
}

/// A tool call to answer with: its id, its function name and its arguments as JSON text.
#[derive(Debug, Clone, Copy)]
pub struct Call<'a> {
    pub id: &'a str,
    pub name: &'a str,
    pub arguments: &'a str,
}

/// Splits `text` into `parts` pieces of about equal length at character boundaries (some may be
/// empty); concatenated they give back `text`.
pub fn split_even(text: &str, parts: usize) -> Vec<&str> {
    let parts = parts.max(1);
    let bounds: Vec<usize> = text.char_indices().map(|(i, _)| i).chain(std::iter::once(text.len())).collect();
    let chars = bounds.len() - 1;
    (0..parts).map(|k| &text[bounds[k * chars / parts]..bounds[(k + 1) * chars / parts]]).collect()
}

impl Completion<'_> {
    fn usage(&self) -> String {
        format!(
            r#"{{"prompt_tokens":{},"completion_tokens":{},"total_tokens":{}}}"#,
            self.prompt_tokens,
            self.completion_tokens,
            self.prompt_tokens + self.completion_tokens
        )
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.api, chunk) {
            (Api::Chat, false) => "chat.completion",
            (Api::Chat, true) => "chat.completion.chunk",
            (Api::Text, _) => "text_completion",
        }
    }

    fn envelope(&self, chunk: bool, choices: &str, usage: &str) -> String {
        format!(
            r#"{{"id":{},"object":"{}","created":{},"model":{},"choices":[{}]{}}}"#,
            quoted(self.id),
            self.object(chunk),
            self.created,
            quoted(self.model),
            choices,
            usage
        )
    }

    /// The whole non-streamed response.
    pub fn full(&self, text: &str) -> String {
        let choice = match self.api {
            Api::Chat => format!(
                r#"{{"index":0,"message":{{"role":"assistant","content":{},"refusal":null}},"logprobs":null,"finish_reason":"stop"}}"#,
                quoted(text)
            ),
            Api::Text => {
                format!(r#"{{"text":{},"index":0,"logprobs":null,"finish_reason":"stop"}}"#, quoted(text))
            }
        };
        self.envelope(false, &choice, &format!(r#","usage":{}"#, self.usage()))
    }

    /// Stream event `k` of `n` carrying `piece`: the first also carries the role, the last the
    /// finish reason. `usage_null` adds `"usage":null` as OpenAI does when usage was requested.
    pub fn event(&self, k: usize, n: usize, piece: &str, usage_null: bool) -> String {
        let finish = if k + 1 == n { r#""stop""# } else { "null" };
        let choice = match self.api {
            Api::Chat => {
                let role = if k == 0 { r#""role":"assistant","# } else { "" };
                format!(
                    r#"{{"index":0,"delta":{{{role}"content":{}}},"logprobs":null,"finish_reason":{finish}}}"#,
                    quoted(piece)
                )
            }
            Api::Text => {
                format!(r#"{{"text":{},"index":0,"logprobs":null,"finish_reason":{finish}}}"#, quoted(piece))
            }
        };
        sse(&self.envelope(true, &choice, if usage_null { r#","usage":null"# } else { "" }))
    }

    /// The whole non-streamed chat response calling `call` (finish reason `tool_calls`).
    pub fn full_tool_call(&self, call: &Call) -> String {
        let choice = format!(
            r#"{{"index":0,"message":{{"role":"assistant","content":null,"tool_calls":[{{"id":{},"type":"function","function":{{"name":{},"arguments":{}}}}}],"refusal":null}},"logprobs":null,"finish_reason":"tool_calls"}}"#,
            quoted(call.id),
            quoted(call.name),
            quoted(call.arguments)
        );
        self.envelope(false, &choice, &format!(r#","usage":{}"#, self.usage()))
    }

    /// The stream events of a chat response calling `call`: one naming the call (with the role), the
    /// arguments in `chunks` pieces, then an empty delta with finish reason `tool_calls`.
    pub fn tool_call_events(&self, call: &Call, chunks: usize, usage_null: bool) -> Vec<String> {
        let usage = if usage_null { r#","usage":null"# } else { "" };
        let event = |delta: String, finish: &str| {
            let choice = format!(r#"{{"index":0,"delta":{delta},"logprobs":null,"finish_reason":{finish}}}"#);
            sse(&self.envelope(true, &choice, usage))
        };
        let mut events = vec![event(
            format!(
                r#"{{"role":"assistant","content":null,"tool_calls":[{{"index":0,"id":{},"type":"function","function":{{"name":{},"arguments":""}}}}]}}"#,
                quoted(call.id),
                quoted(call.name)
            ),
            "null",
        )];
        for piece in split_even(call.arguments, chunks) {
            events.push(event(
                format!(r#"{{"tool_calls":[{{"index":0,"function":{{"arguments":{}}}}}]}}"#, quoted(piece)),
                "null",
            ));
        }
        events.push(event("{}".to_owned(), r#""tool_calls""#));
        events
    }

    /// The final usage-only event sent when `stream_options.include_usage` is true.
    pub fn usage_event(&self) -> String {
        sse(&self.envelope(true, "", &format!(r#","usage":{}"#, self.usage())))
    }
}

/// `data: JSON\n\n`.
pub fn sse(json: &str) -> String {
    format!("data: {json}\n\n")
}

/// One embedding per input item.
pub fn embeddings(model: &str, items: usize, prompt_tokens: u64) -> String {
    let mut data = String::new();
    for i in 0..items {
        if i > 0 {
            data.push(',');
        }
        let vector: Vec<String> = (0..EMBEDDING_DIMENSION)
            .map(|j| format!("{:.3}", ((i + 1) * (j + 3) % 17) as f64 / 17.0))
            .collect();
        data.push_str(&format!(r#"{{"object":"embedding","index":{i},"embedding":[{}]}}"#, vector.join(",")));
    }
    format!(
        r#"{{"object":"list","data":[{data}],"model":{},"usage":{{"prompt_tokens":{prompt_tokens},"total_tokens":{prompt_tokens}}}}}"#,
        quoted(model)
    )
}

/// How many embeddings an `input` asks for: a string or a token array is one, an array of strings
/// or of token arrays is one per element.
pub fn embedding_items(input: &Value) -> usize {
    match input {
        Value::Array(items) if items.iter().all(Value::is_number) => 1,
        Value::Array(items) => items.len(),
        _ => 1,
    }
}

pub fn models(created: u64) -> String {
    let data: Vec<String> = MODELS
        .iter()
        .map(|m| {
            format!(
                r#"{{"id":{},"object":"model","created":{created},"owned_by":"burncloud-mock"}}"#,
                quoted(m)
            )
        })
        .collect();
    format!(r#"{{"object":"list","data":[{}]}}"#, data.join(","))
}

/// The OpenAI error shape.
pub fn error(message: &str, kind: &str, code: &str) -> String {
    format!(r#"{{"error":{{"message":{},"type":"{kind}","param":null,"code":"{code}"}}}}"#, quoted(message))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn completion(api: Api) -> Completion<'static> {
        Completion { api, id: "id-1", created: 7, model: "m\"x", prompt_tokens: 3, completion_tokens: 4 }
    }

    fn json(s: &str) -> Value {
        serde_json::from_str(s.trim_start_matches("data: ").trim_end()).unwrap()
    }

    #[test]
    fn a_chat_completion_carries_model_content_and_usage() {
        let v = json(&completion(Api::Chat).full("hi"));
        assert_eq!(v["model"], "m\"x");
        assert_eq!(v["choices"][0]["message"]["content"], "hi");
        assert_eq!(v["usage"]["total_tokens"], 7);
    }

    #[test]
    fn stream_events_mark_the_first_with_the_role_and_the_last_with_the_finish_reason() {
        let c = completion(Api::Chat);
        let first = json(&c.event(0, 2, "a", false));
        let last = json(&c.event(1, 2, " b", true));
        assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
        assert!(first.get("usage").is_none());
        assert_eq!(last["choices"][0]["finish_reason"], "stop");
        assert!(last["usage"].is_null());
        assert_eq!(json(&c.usage_event())["choices"].as_array().unwrap().len(), 0);
    }

    #[test]
    fn pieces_rebuild_the_text() {
        let text = generated_text(10);
        for parts in 1..14 {
            let p = pieces(&text, parts);
            assert_eq!((p.len(), p.concat()), (parts, text.clone()));
        }
        assert_eq!(pieces("", 3).concat(), "");
    }

    #[test]
    fn a_tool_call_answers_with_tool_calls_whole_and_streamed() {
        let c = completion(Api::Chat);
        let call = Call { id: "call-1", name: "get_weather", arguments: r#"{"city":"Paris"}"# };
        let v = json(&c.full_tool_call(&call));
        assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
        assert!(v["choices"][0]["message"]["content"].is_null());
        assert_eq!(v["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"], call.arguments);
        let events: Vec<Value> = c.tool_call_events(&call, 3, false).iter().map(|e| json(e)).collect();
        assert_eq!(events.len(), 5);
        assert_eq!(events[0]["choices"][0]["delta"]["tool_calls"][0]["id"], "call-1");
        let args: String = events[1..4]
            .iter()
            .map(|e| e["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"].as_str().unwrap())
            .collect();
        assert_eq!(args, call.arguments);
        assert_eq!(events[4]["choices"][0]["finish_reason"], "tool_calls");
    }

    #[test]
    fn split_even_rebuilds_the_text_at_character_boundaries() {
        for parts in 1..8 {
            assert_eq!(split_even("héllo wörld", parts).concat(), "héllo wörld");
            assert_eq!(split_even("héllo wörld", parts).len(), parts);
        }
    }

    #[test]
    fn embeddings_come_one_per_input_item() {
        let v = json(&embeddings("e", 3, 5));
        assert_eq!(v["data"].as_array().unwrap().len(), 3);
        assert_eq!(v["data"][2]["embedding"].as_array().unwrap().len(), EMBEDDING_DIMENSION);
        assert_eq!(embedding_items(&serde_json::json!([1, 2, 3])), 1);
        assert_eq!(embedding_items(&serde_json::json!(["a", "b"])), 2);
        assert_eq!(embedding_items(&serde_json::json!("a")), 1);
    }
}
