//! Souk's projector runtime and read models. The read side (JetStream
//! consumers, read-model tables, the `projector` binary) is not built yet;
//! this crate holds its place in the workspace layout.
