//! Rebuilds the crate when a migration changes: `sqlx::migrate!` embeds `../migrations` at compile time.
//! Must never do anything else.

fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
