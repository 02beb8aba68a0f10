//! Souk's read API. Not built yet: it serves the read models of the
//! `projections` crate once they exist. This crate holds its place in the
//! workspace layout.
