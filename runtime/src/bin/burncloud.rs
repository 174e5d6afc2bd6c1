//! The `burncloud` binary: `serve` (default) and `migrate`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;

use burncloud_runtime::config::Settings;
use burncloud_runtime::server::Server;

const USAGE: &str = "usage: burncloud [serve|migrate] [--config PATH]\n\
  serve    start the gateway (default)\n\
  migrate  run database migrations and exit\n\
settings: BURNCLOUD_* environment variables override the TOML file (see README.md)";

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut command = None;
    let mut config: Option<PathBuf> = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--config" | "-c" => match args.next() {
                Some(p) => config = Some(PathBuf::from(p)),
                None => return fail("--config needs a path"),
            },
            "-h" | "--help" | "help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            "-V" | "--version" => {
                println!("burncloud {}", env!("CARGO_PKG_VERSION"));
                return ExitCode::SUCCESS;
            }
            "serve" | "migrate" if command.is_none() => command = Some(arg),
            other => return fail(&format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    let env: HashMap<String, String> = std::env::vars().collect();
    let settings = match Settings::load(config.as_deref(), &env) {
        Ok(s) => s,
        Err(e) => return fail(&e.0),
    };
    burncloud_runtime::logging::init(&settings.log);
    match command.as_deref().unwrap_or("serve") {
        "migrate" => match burncloud_storage::migrate(&settings.database_url) {
            Ok(()) => {
                println!("migrations applied to {}", settings.database_url);
                ExitCode::SUCCESS
            }
            Err(e) => fail(&format!("BURNCLOUD_DATABASE_URL: {e}")),
        },
        _ => serve(settings),
    }
}

fn serve(settings: Settings) -> ExitCode {
    let signals = match burncloud_runtime::signals::Signals::install() {
        Ok(s) => s,
        Err(e) => return fail(&format!("cannot install signal handlers: {e}")),
    };
    let server = match Server::start(settings) {
        Ok(s) => s,
        Err(e) => return fail(&e.0),
    };
    println!("listening on {}", server.addr);
    signals.wait();
    tracing::info!("shutting down: draining connections and flushing storage");
    match server.shutdown() {
        Ok(()) => {
            tracing::info!("stopped cleanly");
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e.0),
    }
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("burncloud: {msg}");
    ExitCode::FAILURE
}
