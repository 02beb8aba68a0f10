//! Rebuilds the crate when a migration is added: `sqlx::migrate!` embeds the
//! files, but cargo only watches them when told to.
fn main() {
    println!("cargo:rerun-if-changed=sql");
}
