//! SIGTERM / SIGINT: the main thread waits here until one arrives.

use signal_hook::consts::{SIGINT, SIGTERM};

pub struct Signals(signal_hook::iterator::Signals);

impl Signals {
    /// Installs the handlers; do this before starting threads so no signal is missed.
    pub fn install() -> std::io::Result<Signals> {
        signal_hook::iterator::Signals::new([SIGTERM, SIGINT]).map(Signals)
    }

    /// Blocks the calling thread until SIGTERM or SIGINT.
    pub fn wait(mut self) {
        let _ = self.0.forever().next();
    }
}
