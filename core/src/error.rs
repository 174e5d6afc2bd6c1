//! The one error type of the gateway.
//!
//! A [`GatewayError`] carries a [`ErrorKind`] (what went wrong, which decides the HTTP status and the
//! machine-readable `code`), an [`ErrorSource`] (whose fault: the client, the upstream, or us), whether
//! another channel may be tried, and a human message. It renders itself in the client's protocol.
//! No I/O here; the runtime writes the rendered bytes.

use serde_json::json;

/// What went wrong. Each kind has exactly one HTTP status and one `code` (see `shared/API.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    InvalidApiKey,
    TokenDisabled,
    TokenExpired,
    TokenQuotaExhausted,
    ModelNotAllowed,
    IpNotAllowed,
    InsufficientUserQuota,
    /// The model has neither a ratio nor a fixed price (and unpriced models are not free).
    ModelPriceNotConfigured,
    RateLimited {
        retry_after_secs: u32,
    },
    ModelNotAvailable,
    InvalidRequest,
    RequestTooLarge,
    HeaderTooLarge,
    RequestTimeout,
    ContentFiltered,
    NotFound,
    MethodNotAllowed,
    /// Every upstream attempt failed. `status` is the upstream's status when it was a client error the
    /// client should see (4xx), otherwise 502.
    Upstream {
        status: u16,
    },
    /// A dependency of the gateway (storage, ledger) is unavailable right now.
    Unavailable,
    Internal,
}

/// Whose fault the error is; decides logging level and whether a channel is blamed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorSource {
    Downstream,
    Upstream,
    Internal,
}

/// The client protocol an error is rendered in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    OpenAi,
    Anthropic,
    Gemini,
}

impl ErrorKind {
    pub fn status(self) -> u16 {
        match self {
            ErrorKind::InvalidApiKey => 401,
            ErrorKind::TokenDisabled
            | ErrorKind::TokenExpired
            | ErrorKind::TokenQuotaExhausted
            | ErrorKind::ModelNotAllowed
            | ErrorKind::IpNotAllowed
            | ErrorKind::InsufficientUserQuota
            | ErrorKind::ModelPriceNotConfigured => 403,
            ErrorKind::RateLimited { .. } => 429,
            ErrorKind::ModelNotAvailable | ErrorKind::Unavailable => 503,
            ErrorKind::InvalidRequest | ErrorKind::ContentFiltered => 400,
            ErrorKind::RequestTooLarge => 413,
            ErrorKind::HeaderTooLarge => 431,
            ErrorKind::RequestTimeout => 408,
            ErrorKind::NotFound => 404,
            ErrorKind::MethodNotAllowed => 405,
            ErrorKind::Upstream { status } => {
                if (400..500).contains(&status) && status != 429 && status != 408 { status } else { 502 }
            }
            ErrorKind::Internal => 500,
        }
    }

    /// The machine-readable `code` of the OpenAI error shape.
    pub fn code(self) -> &'static str {
        match self {
            ErrorKind::InvalidApiKey => "invalid_api_key",
            ErrorKind::TokenDisabled => "token_disabled",
            ErrorKind::TokenExpired => "token_expired",
            ErrorKind::TokenQuotaExhausted => "token_quota_exhausted",
            ErrorKind::ModelNotAllowed => "model_not_allowed",
            ErrorKind::IpNotAllowed => "ip_not_allowed",
            ErrorKind::InsufficientUserQuota => "insufficient_user_quota",
            ErrorKind::ModelPriceNotConfigured => "model_price_not_configured",
            ErrorKind::RateLimited { .. } => "rate_limit_exceeded",
            ErrorKind::ModelNotAvailable => "model_not_available",
            ErrorKind::InvalidRequest => "invalid_request",
            ErrorKind::RequestTooLarge | ErrorKind::HeaderTooLarge => "request_too_large",
            ErrorKind::RequestTimeout => "request_timeout",
            ErrorKind::ContentFiltered => "content_filtered",
            ErrorKind::NotFound => "not_found",
            ErrorKind::MethodNotAllowed => "method_not_allowed",
            ErrorKind::Upstream { .. } => "upstream_error",
            ErrorKind::Unavailable => "service_unavailable",
            ErrorKind::Internal => "internal_error",
        }
    }

    /// The OpenAI `type` field.
    fn openai_type(self) -> &'static str {
        match self.status() {
            401 => "authentication_error",
            403 => "permission_error",
            429 => "rate_limit_error",
            400 | 404 | 405 | 408 | 413 | 431 => "invalid_request_error",
            _ => "server_error",
        }
    }

    /// The Anthropic `error.type` field.
    fn anthropic_type(self) -> &'static str {
        match self.status() {
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            413 => "request_too_large",
            429 => "rate_limit_error",
            400 | 405 | 408 | 431 => "invalid_request_error",
            503 | 529 => "overloaded_error",
            _ => "api_error",
        }
    }

    /// The Gemini (Google RPC) `error.status` field.
    fn gemini_status(self) -> &'static str {
        match self.status() {
            400 | 413 | 431 => "INVALID_ARGUMENT",
            401 => "UNAUTHENTICATED",
            403 => "PERMISSION_DENIED",
            404 => "NOT_FOUND",
            408 => "DEADLINE_EXCEEDED",
            429 => "RESOURCE_EXHAUSTED",
            503 => "UNAVAILABLE",
            _ => "INTERNAL",
        }
    }
}

/// An error on its way to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind:?} ({origin:?}): {message}")]
pub struct GatewayError {
    pub kind: ErrorKind,
    pub origin: ErrorSource,
    /// Whether another channel may be tried for the same request.
    pub retryable: bool,
    pub message: String,
}

impl GatewayError {
    /// A client error: never retried, the client's fault.
    pub fn client(kind: ErrorKind, message: impl Into<String>) -> Self {
        GatewayError { kind, origin: ErrorSource::Downstream, retryable: false, message: message.into() }
    }

    /// An upstream failure; `retryable` says whether another channel may serve the request.
    pub fn upstream(status: u16, retryable: bool, message: impl Into<String>) -> Self {
        GatewayError {
            kind: ErrorKind::Upstream { status },
            origin: ErrorSource::Upstream,
            retryable,
            message: message.into(),
        }
    }

    /// A failure inside the gateway.
    pub fn internal(kind: ErrorKind, message: impl Into<String>) -> Self {
        GatewayError { kind, origin: ErrorSource::Internal, retryable: false, message: message.into() }
    }

    pub fn status(&self) -> u16 {
        self.kind.status()
    }

    /// Seconds for a `Retry-After` header, when the kind has one.
    pub fn retry_after(&self) -> Option<u32> {
        match self.kind {
            ErrorKind::RateLimited { retry_after_secs } => Some(retry_after_secs.max(1)),
            _ => None,
        }
    }

    /// The JSON body in the client's protocol.
    pub fn render(&self, protocol: Protocol) -> Vec<u8> {
        let body = match protocol {
            Protocol::OpenAi => json!({"error": {
                "message": self.message,
                "type": self.kind.openai_type(),
                "param": null,
                "code": self.kind.code(),
            }}),
            Protocol::Anthropic => json!({"type": "error", "error": {
                "type": self.kind.anthropic_type(),
                "message": self.message,
            }}),
            Protocol::Gemini => json!({"error": {
                "code": self.status(),
                "message": self.message,
                "status": self.kind.gemini_status(),
            }}),
        };
        body.to_string().into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_client_errors_keep_their_status_and_server_errors_become_502() {
        assert_eq!(ErrorKind::Upstream { status: 400 }.status(), 400);
        assert_eq!(ErrorKind::Upstream { status: 500 }.status(), 502);
        assert_eq!(ErrorKind::Upstream { status: 429 }.status(), 502);
        assert_eq!(ErrorKind::Upstream { status: 0 }.status(), 502);
    }

    #[test]
    fn openai_shape_carries_message_type_and_code() {
        let e = GatewayError::client(ErrorKind::InvalidApiKey, "no key");
        let v: serde_json::Value = serde_json::from_slice(&e.render(Protocol::OpenAi)).unwrap();
        assert_eq!(v["error"]["code"], "invalid_api_key");
        assert_eq!(v["error"]["type"], "authentication_error");
        assert_eq!(v["error"]["message"], "no key");
    }

    #[test]
    fn anthropic_and_gemini_shapes_follow_their_protocols() {
        let e = GatewayError::client(ErrorKind::RateLimited { retry_after_secs: 3 }, "slow down");
        let a: serde_json::Value = serde_json::from_slice(&e.render(Protocol::Anthropic)).unwrap();
        assert_eq!(a["type"], "error");
        assert_eq!(a["error"]["type"], "rate_limit_error");
        let g: serde_json::Value = serde_json::from_slice(&e.render(Protocol::Gemini)).unwrap();
        assert_eq!(g["error"]["code"], 429);
        assert_eq!(g["error"]["status"], "RESOURCE_EXHAUSTED");
        assert_eq!(e.retry_after(), Some(3));
    }
}
