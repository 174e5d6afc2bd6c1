//! # burncloud-runtime
//!
//! The server: thread-per-core executors and their listeners, the HTTP/1.1 codec, the upstream
//! client, the relay pipeline, the management API, the control thread and the `burncloud` binary.

pub mod admin;
pub mod billing;
pub mod config;
pub mod http;
pub mod images;
pub mod logging;
pub mod models;
pub mod probe;
pub mod relay;
pub mod rt;
pub mod server;
pub mod signals;
pub mod state;
pub mod upstream;
