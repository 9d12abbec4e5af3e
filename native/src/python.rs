//! The PyO3 face of the crate: small, private (`burrow._native`), and every
//! error raised as burrow's own exception, one line each.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::frames::{self, OwnedFrame};
use crate::sni;

/// `burrow.errors.RemoteProtocolError(code, message)`: the peer broke the protocol.
fn remote_error(py: Python<'_>, error: &frames::FrameError) -> PyErr {
    let raised = py
        .import("burrow.errors")
        .and_then(|errors| errors.getattr("RemoteProtocolError"))
        .and_then(|class| class.call1((error.code() as u16, error.to_string())));
    match raised {
        Ok(instance) => PyErr::from_value(instance),
        Err(import_failed) => import_failed,
    }
}

/// A frame as the Python model gives one: `(type, stream_id, payload)`.
type PyFrame = (u8, u32, Py<PyBytes>);

fn to_python(py: Python<'_>, frames: Vec<OwnedFrame>) -> Vec<PyFrame> {
    frames
        .into_iter()
        .map(|f| {
            (
                f.kind as u8,
                f.stream_id,
                PyBytes::new(py, &f.payload).unbind(),
            )
        })
        .collect()
}

fn check_max_payload(max_payload: u32) -> PyResult<u32> {
    if (frames::MIN_FRAME_PAYLOAD..=frames::MAX_FRAME_PAYLOAD).contains(&max_payload) {
        Ok(max_payload)
    } else {
        Err(PyValueError::new_err(format!(
            "max_payload {max_payload} is outside {}..{}",
            frames::MIN_FRAME_PAYLOAD,
            frames::MAX_FRAME_PAYLOAD
        )))
    }
}

/// Turns a byte stream cut anywhere into frames (the native twin of
/// `burrow.protocol.frames.FrameDecoder`).
#[pyclass(module = "burrow._native")]
struct FrameDecoder {
    inner: frames::Decoder,
    last: Vec<PyFrame>,
}

#[pymethods]
impl FrameDecoder {
    #[new]
    #[pyo3(signature = (max_payload = frames::MAX_FRAME_PAYLOAD))]
    fn new(max_payload: u32) -> PyResult<Self> {
        Ok(Self {
            inner: frames::Decoder::new(check_max_payload(max_payload)?),
            last: Vec::new(),
        })
    }

    /// Add `data`; return every frame it completes as `(type, stream_id, payload)`.
    ///
    /// Raises `RemoteProtocolError`; `pending()` then gives the frames before the bad one.
    fn feed(&mut self, py: Python<'_>, data: &[u8]) -> PyResult<Vec<PyFrame>> {
        let mut frames = Vec::new();
        let result = self.inner.feed(data, &mut frames);
        self.last = to_python(py, frames);
        match result {
            Ok(()) => Ok(self
                .last
                .iter()
                .map(|(k, s, p)| (*k, *s, p.clone_ref(py)))
                .collect()),
            Err(error) => Err(remote_error(py, &error)),
        }
    }

    /// The frames decoded by the last `feed()` (useful after it raised).
    fn pending(&self, py: Python<'_>) -> Vec<PyFrame> {
        self.last
            .iter()
            .map(|(k, s, p)| (*k, *s, p.clone_ref(py)))
            .collect()
    }

    /// Bytes waiting for the rest of their frame.
    #[getter]
    fn buffered(&self) -> usize {
        self.inner.buffered()
    }
}

/// The bytes of one frame (the native twin of `burrow.protocol.frames.encode`).
#[pyfunction]
fn encode(py: Python<'_>, frame_type: u8, stream_id: u32, payload: &[u8]) -> PyResult<Py<PyBytes>> {
    let kind = frames::FrameType::from_u8(frame_type)
        .ok_or_else(|| PyValueError::new_err(format!("unknown frame type {frame_type}")))?;
    let mut out = Vec::new();
    frames::encode(kind, stream_id, payload, &mut out)
        .map_err(|e| PyValueError::new_err(e.to_string()))?;
    Ok(PyBytes::new(py, &out).unbind())
}

/// The server name and ALPN list of a TLS ClientHello: `(name or None, [alpn, ...])`,
/// or None while more bytes are needed; ValueError for bytes that are not one.
/// A ClientHello as Python sees it: `(server name or None, [alpn, ...])`.
type PyHello = (Option<String>, Vec<Vec<u8>>);

#[pyfunction]
fn peek_client_hello(data: &[u8]) -> PyResult<Option<PyHello>> {
    match sni::peek(data) {
        Ok(sni::Peek::Hello(hello)) => Ok(Some((hello.server_name, hello.alpn))),
        Ok(sni::Peek::NeedMore) => Ok(None),
        Err(refusal) => Err(PyValueError::new_err(refusal.to_string())),
    }
}

#[pymodule]
fn _native(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add_class::<FrameDecoder>()?;
    module.add_function(wrap_pyfunction!(encode, module)?)?;
    module.add_function(wrap_pyfunction!(peek_client_hello, module)?)?;
    module.add("HEADER_SIZE", frames::HEADER_SIZE)?;
    module.add("MAX_FRAME_PAYLOAD", frames::MAX_FRAME_PAYLOAD)?;
    module.add("MAX_CONTROL_PAYLOAD", frames::MAX_CONTROL_PAYLOAD)?;
    Ok(())
}
