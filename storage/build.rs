//! Intentionally empty: this package's build-dependencies exist only to pin
//! the features of RocksDB's build-time crates (see Cargo.toml).
fn main() {}
