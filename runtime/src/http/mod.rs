//! The HTTP/1.1 server codec, on httparse and the `http` crate's types.
//!
//! Owns the client side of the wire: reading request heads and bodies under [`Limits`], keep-alive
//! and pipelining, `Expect: 100-continue`, the protocol errors (400, 408, 413, 431, each in the
//! OpenAI error shape followed by a close), and writing responses whole or streamed through a
//! [`Responder`]. A [`Service`] sees only complete [`Request`]s. The chunked framing lives in
//! [`chunked`] so the upstream client can reuse the decoder.
//!
//! Executor-agnostic: it speaks only to [`crate::rt`]. It never routes, authenticates or looks at a
//! body's meaning, never panics on any input, and never lets one connection hold its worker: every
//! wait is bounded by a timeout or ends on shutdown.

pub mod chunked;
mod request;
mod response;
mod server;
mod shutdown;

pub use chunked::{ChunkedDecoder, ChunkedError, LAST_CHUNK, encode_chunk};
pub use request::Request;
pub use response::Responder;
pub use server::{Limits, Service, serve_connection};
pub use shutdown::{ShutdownSignal, Triggered};
