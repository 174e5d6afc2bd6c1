//! `burncloud-mock`: the project's mock upstream (OpenAI, Anthropic and Gemini endpoints) as a process.
//!
//! Owns only the command line: parses the flags into a [`MockConfig`], starts the workers and
//! prints `listening on ADDR` once they accept. Everything else lives in `burncloud_tests::mock`.
//! It never panics on bad flags: it prints the usage and exits 2.

use std::io::Write;
use std::process::ExitCode;

use burncloud_tests::mock::{self, MockConfig};

const USAGE: &str = "usage: burncloud-mock --listen ADDR [--workers N] [--prompt-tokens N] \
[--completion-tokens N] [--chunks N] [--chunk-gap-ms N] [--latency-ms N]";

fn parse(args: &[String]) -> Result<MockConfig, String> {
    let mut config = MockConfig::default();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let number = || value.parse::<u64>().map_err(|_| format!("{flag}: not a number: {value}"));
        let count = || value.parse::<usize>().map_err(|_| format!("{flag}: not a number: {value}"));
        match flag.as_str() {
            "--listen" => {
                config.listen = value.parse().map_err(|_| format!("--listen: not an address: {value}"))?
            }
            "--workers" => config.workers = count()?.max(1),
            "--prompt-tokens" => config.prompt_tokens = number()?,
            "--completion-tokens" => config.completion_tokens = number()?,
            "--chunks" => config.chunks = count()?.max(1),
            "--chunk-gap-ms" => config.chunk_gap_ms = number()?,
            "--latency-ms" => config.latency_ms = number()?,
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    Ok(config)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let config = match parse(&args) {
        Ok(config) => config,
        Err(message) => {
            eprintln!("burncloud-mock: {message}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let running = match mock::start(config) {
        Ok(running) => running,
        Err(e) => {
            eprintln!("burncloud-mock: cannot listen: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut out = std::io::stdout();
    let _ = writeln!(out, "listening on {}", running.addr);
    let _ = out.flush();
    for worker in running.workers {
        let _ = worker.join();
    }
    ExitCode::FAILURE
}
