//! burrow's native data plane, loaded by Python as `burrow._native`.
//!
//! Python keeps the API, the CLI and every decision; this crate moves bytes.
//! Today it holds the wire format ([`frames`]), checked against the Python
//! reference model by a differential test, and the ClientHello peeker
//! ([`sni`]) that routes the TLS port; the relay's and the agent's data
//! planes grow here behind the seam drawn in `burrow/relay/plane.py`.
//!
//! The pure-Rust core builds and tests without Python (`cargo test`); the
//! PyO3 module is behind the `python` feature, which maturin turns on.

#![forbid(unsafe_code)]

pub mod agent;
pub mod frames;
pub mod relay;
pub mod sni;

#[cfg(feature = "python")]
mod python;
