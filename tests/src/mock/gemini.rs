//! The Gemini `generateContent` wire bodies the mock answers with, and its routes.
//!
//! Owns the text of `POST /v1beta/models/{model}:generateContent` and `:streamGenerateContent`
//! answers: a whole response (one candidate with a text or a `functionCall` part, `finishReason`
//! `STOP`, `usageMetadata`), its `alt=sse` stream (text in `chunks` chunks, the last with
//! `finishReason` and `usageMetadata`; a function call arrives whole in one chunk, as Gemini sends
//! it), and the error shape. Pure string building, like [`super::openai`].

use super::openai::{pieces, quoted};

/// What a Gemini model route asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Generate,
    StreamGenerate,
    /// Any other `:method`.
    Other,
}

/// The model and action of `/v1beta/models/{model}:{action}` (or `/v1/models/…`), if `path` is one.
pub fn route(path: &str) -> Option<(&str, Action)> {
    let rest = path.strip_prefix("/v1beta/models/").or_else(|| path.strip_prefix("/v1/models/"))?;
    let (model, action) = rest.rsplit_once(':')?;
    let action = match action {
        "generateContent" => Action::Generate,
        "streamGenerateContent" => Action::StreamGenerate,
        _ => Action::Other,
    };
    Some((model, action))
}

/// Identity and numbers of one generation.
#[derive(Debug, Clone)]
pub struct Generation<'a> {
    pub id: &'a str,
    pub model: &'a str,
    pub prompt_tokens: u64,
    pub candidates_tokens: u64,
}

impl Generation<'_> {
    fn usage(&self) -> String {
        format!(
            r#","usageMetadata":{{"promptTokenCount":{},"candidatesTokenCount":{},"totalTokenCount":{}}}"#,
            self.prompt_tokens,
            self.candidates_tokens,
            self.prompt_tokens + self.candidates_tokens
        )
    }

    /// One response (or stream chunk) with `parts`; the last one carries `finishReason` and usage.
    fn response(&self, parts: &str, last: bool) -> String {
        let (finish, usage) =
            if last { (r#","finishReason":"STOP""#, self.usage()) } else { ("", String::new()) };
        format!(
            r#"{{"candidates":[{{"content":{{"role":"model","parts":[{parts}]}}{finish},"index":0}}]{usage},"modelVersion":{},"responseId":{}}}"#,
            quoted(self.model),
            quoted(self.id)
        )
    }

    /// The whole response answering with `text`.
    pub fn full(&self, text: &str) -> String {
        self.response(&text_part(text), true)
    }

    /// The whole response calling function `name` with `args` (a JSON object).
    pub fn full_call(&self, name: &str, args: &str) -> String {
        self.response(&call_part(name, args), true)
    }

    /// The `alt=sse` stream answering with `text` in `chunks` chunks.
    pub fn events(&self, text: &str, chunks: usize) -> Vec<String> {
        let parts = pieces(text, chunks);
        let n = parts.len();
        parts
            .into_iter()
            .enumerate()
            .map(|(k, p)| super::openai::sse(&self.response(&text_part(p), k + 1 == n)))
            .collect()
    }

    /// The `alt=sse` stream calling function `name`: one chunk with the whole call.
    pub fn call_events(&self, name: &str, args: &str) -> Vec<String> {
        vec![super::openai::sse(&self.full_call(name, args))]
    }
}

fn text_part(text: &str) -> String {
    format!(r#"{{"text":{}}}"#, quoted(text))
}

fn call_part(name: &str, args: &str) -> String {
    format!(r#"{{"functionCall":{{"name":{},"args":{args}}}}}"#, quoted(name))
}

/// The Gemini (Google RPC) error shape, its `status` derived from the HTTP status.
pub fn error(status: u16, message: &str) -> String {
    let name = match status {
        400 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        429 => "RESOURCE_EXHAUSTED",
        503 => "UNAVAILABLE",
        504 => "DEADLINE_EXCEEDED",
        _ => "INTERNAL",
    };
    format!(r#"{{"error":{{"code":{status},"message":{},"status":"{name}"}}}}"#, quoted(message))
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn generation() -> Generation<'static> {
        Generation { id: "r-1", model: "gemini-x", prompt_tokens: 3, candidates_tokens: 4 }
    }

    fn data(event: &str) -> Value {
        serde_json::from_str(event.strip_prefix("data: ").unwrap().trim_end()).unwrap()
    }

    #[test]
    fn routes_name_the_model_and_the_action() {
        assert_eq!(route("/v1beta/models/gemini-x:generateContent"), Some(("gemini-x", Action::Generate)));
        assert_eq!(route("/v1/models/a.b-1:streamGenerateContent"), Some(("a.b-1", Action::StreamGenerate)));
        assert_eq!(route("/v1beta/models/m:countTokens"), Some(("m", Action::Other)));
        assert_eq!(route("/v1/models"), None);
        assert_eq!(route("/v1/chat/completions"), None);
    }

    #[test]
    fn a_response_carries_text_finish_reason_and_usage() {
        let v: Value = serde_json::from_str(&generation().full("hi")).unwrap();
        assert_eq!(v["candidates"][0]["content"]["parts"][0]["text"], "hi");
        assert_eq!(v["candidates"][0]["content"]["role"], "model");
        assert_eq!(v["candidates"][0]["finishReason"], "STOP");
        assert_eq!(
            v["usageMetadata"],
            json!({"promptTokenCount": 3, "candidatesTokenCount": 4, "totalTokenCount": 7})
        );
    }

    #[test]
    fn the_stream_sends_usage_and_finish_reason_on_the_last_chunk_only() {
        let events: Vec<Value> = generation().events("a b c", 3).iter().map(|e| data(e)).collect();
        assert_eq!(events.len(), 3);
        assert!(events[..2].iter().all(|e| e.get("usageMetadata").is_none()));
        assert!(events[..2].iter().all(|e| e["candidates"][0].get("finishReason").is_none()));
        assert_eq!(events[2]["usageMetadata"]["totalTokenCount"], 7);
        let text: String = events
            .iter()
            .map(|e| e["candidates"][0]["content"]["parts"][0]["text"].as_str().unwrap())
            .collect();
        assert_eq!(text, "a b c");
    }

    #[test]
    fn a_function_call_arrives_whole() {
        let events = generation().call_events("f", r#"{"a":1}"#);
        let v = data(&events[0]);
        assert_eq!(events.len(), 1);
        assert_eq!(
            v["candidates"][0]["content"]["parts"][0]["functionCall"],
            json!({"name": "f", "args": {"a": 1}})
        );
        assert_eq!(v["candidates"][0]["finishReason"], "STOP");
    }

    #[test]
    fn errors_carry_code_and_status() {
        let v: Value = serde_json::from_str(&error(401, "no")).unwrap();
        assert_eq!(v["error"], json!({"code": 401, "message": "no", "status": "UNAUTHENTICATED"}));
    }
}
