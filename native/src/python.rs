//! The PyO3 face of the crate: small, private (`burrow._native`), and every
//! error raised as burrow's own exception, one line each.

use std::net::IpAddr;
use std::time::Duration;

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::agent::{Agent, LinkConfig, Target};
use crate::frames::{self, OwnedFrame};
use std::sync::Arc;

use crate::relay::access::Network;
use crate::relay::engine::{Certificates, Engine};
use crate::relay::events::Event;
use crate::relay::tls::BadCertificate;
use crate::relay::{Config, Route};
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

/// `OSError(errno, strerror)`, as Python's own socket calls raise it.
fn os_error(error: std::io::Error) -> PyErr {
    match error.raw_os_error() {
        Some(errno) => PyOSError::new_err((errno, error.to_string())),
        None => PyOSError::new_err(error.to_string()),
    }
}

fn addresses(hosts: Vec<String>) -> PyResult<Vec<IpAddr>> {
    hosts
        .iter()
        .map(|h| {
            h.parse::<IpAddr>()
                .map_err(|_| PyValueError::new_err(format!("{h:?} is not an IP address")))
        })
        .collect()
}

/// An event for Python: `("hello", session, peer, payload)`, `("request", session, type,
/// payload)`, `("closed", session)`, `("connected", link, alpn)`, `("failed", link, kind,
/// message)` or `("log", kind, level, message)`.
type PyEvent = (&'static str, Py<PyAny>, Py<PyAny>, Py<PyAny>);

/// Events as Python takes them (see [`PyEvent`]).
fn to_py_events(py: Python<'_>, events: Vec<Event>) -> PyResult<Vec<PyEvent>> {
    let none = || py.None();
    events
        .into_iter()
        .map(|event| {
            Ok(match event {
                Event::Hello {
                    session,
                    peer,
                    payload,
                } => (
                    "hello",
                    session.into_pyobject(py)?.into_any().unbind(),
                    peer.into_pyobject(py)?.into_any().unbind(),
                    PyBytes::new(py, &payload).into_any().unbind(),
                ),
                Event::Request {
                    session,
                    kind,
                    payload,
                } => (
                    "request",
                    session.into_pyobject(py)?.into_any().unbind(),
                    kind.into_pyobject(py)?.into_any().unbind(),
                    PyBytes::new(py, &payload).into_any().unbind(),
                ),
                Event::SessionClosed { session } => (
                    "closed",
                    session.into_pyobject(py)?.into_any().unbind(),
                    none(),
                    none(),
                ),
                Event::Connected { session, alpn } => (
                    "connected",
                    session.into_pyobject(py)?.into_any().unbind(),
                    match alpn {
                        Some(alpn) => PyBytes::new(py, &alpn).into_any().unbind(),
                        None => none(),
                    },
                    none(),
                ),
                Event::Failed {
                    session,
                    kind,
                    message,
                } => (
                    "failed",
                    session.into_pyobject(py)?.into_any().unbind(),
                    kind.into_pyobject(py)?.into_any().unbind(),
                    message.into_pyobject(py)?.into_any().unbind(),
                ),
                Event::Log {
                    kind,
                    level,
                    message,
                } => (
                    "log",
                    kind.into_pyobject(py)?.into_any().unbind(),
                    level.into_pyobject(py)?.into_any().unbind(),
                    message.into_pyobject(py)?.into_any().unbind(),
                ),
            })
        })
        .collect()
}

/// The agent's data plane (see `burrow/agent/native_session.py`, which drives it).
#[pyclass(module = "burrow._native")]
struct AgentEngine {
    agent: Agent,
}

#[pymethods]
impl AgentEngine {
    #[new]
    fn new(threads: usize) -> PyResult<Self> {
        Ok(Self {
            agent: Agent::new(threads).map_err(PyValueError::new_err)?,
        })
    }

    fn take_watched_fd(&mut self) -> Option<i32> {
        self.agent
            .take_watched()
            .map(std::os::fd::IntoRawFd::into_raw_fd)
    }

    fn take_events(&self, py: Python<'_>) -> PyResult<Vec<PyEvent>> {
        to_py_events(py, self.agent.take_events())
    }

    /// Dial a relay; `("connected", id, alpn)` or `("failed", id, kind, message)` follows.
    #[pyo3(signature = (link_id, hosts, port, server_name, roots, alpn, timeout, window, max_frame, heartbeat_timeout))]
    #[allow(clippy::too_many_arguments)]
    fn connect(
        &self,
        link_id: String,
        hosts: Vec<String>,
        port: u16,
        server_name: String,
        roots: &[u8],
        alpn: Vec<Vec<u8>>,
        timeout: f64,
        window: u32,
        max_frame: u32,
        heartbeat_timeout: f64,
    ) -> PyResult<()> {
        let seconds = |s: f64| {
            Duration::try_from_secs_f64(s).map_err(|e| PyValueError::new_err(e.to_string()))
        };
        let config = LinkConfig {
            window,
            max_frame: check_max_payload(max_frame)?,
            heartbeat_timeout: seconds(heartbeat_timeout)?,
        };
        self.agent
            .connect(
                link_id,
                hosts,
                port,
                server_name,
                roots,
                alpn,
                seconds(timeout)?,
                config,
            )
            .map_err(PyValueError::new_err)
    }

    fn send_control(&self, link_id: &str, frame: &[u8]) -> bool {
        self.agent.send_control(link_id, frame)
    }

    fn welcomed(&self, link_id: &str, peer_window: u32, send_payload: u32) {
        self.agent.welcomed(link_id, peer_window, send_payload);
    }

    /// Streams of `tunnel_id` on the link go to a TCP port (`port` on the first of `hosts`
    /// that accepts) or, with `path`, a unix socket; counted under `key`.
    #[pyo3(signature = (link_id, tunnel_id, key, connect_timeout, hosts, port, path=None))]
    #[allow(clippy::too_many_arguments)]
    fn add_tunnel(
        &self,
        link_id: &str,
        tunnel_id: &str,
        key: u64,
        connect_timeout: f64,
        hosts: Vec<String>,
        port: u16,
        path: Option<std::path::PathBuf>,
    ) -> PyResult<()> {
        let timeout = Duration::try_from_secs_f64(connect_timeout)
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        let target = match path {
            Some(path) => Target::Unix(path),
            None => Target::Tcp { hosts, port },
        };
        self.agent
            .add_tunnel(link_id, tunnel_id, key, target, timeout);
        Ok(())
    }

    fn remove_tunnel(&self, link_id: &str, tunnel_id: &str) {
        self.agent.remove_tunnel(link_id, tunnel_id);
    }

    fn counters(&self, key: u64) -> (i64, u64, u64, u64) {
        self.agent.counters(key)
    }

    fn forget_counters(&self, key: u64) {
        self.agent.forget_counters(key);
    }

    fn close(&self, link_id: &str, goaway: &[u8]) {
        self.agent.close(link_id, goaway);
    }

    fn unsent(&self, link_id: &str) -> usize {
        self.agent.unsent(link_id)
    }

    fn link_ids(&self) -> Vec<String> {
        self.agent.link_ids()
    }

    fn open_streams(&self) -> usize {
        self.agent.open_streams()
    }
}

/// The most connections one listing of a tunnel holds (its true count comes with it).
const MAX_LISTED_CONNECTIONS: usize = 1000;

/// The relay's data plane (see `burrow/relay/native_plane.py`, which drives it).
#[pyclass(module = "burrow._native")]
struct RelayEngine {
    engine: Engine,
}

#[pymethods]
impl RelayEngine {
    #[new]
    #[pyo3(signature = (*, domain, threads, handshake_timeout, hello_timeout, heartbeat_timeout,
        window, base_window, session_budget, relay_budget, max_frame, max_pending, max_pending_per_source, max_streams_per_session,
        max_streams_per_tunnel, fd_ceiling, chain=None, key=None, dev_key=None, agent_leaf=None,
        loopback_leaf=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        domain: String,
        threads: usize,
        handshake_timeout: f64,
        hello_timeout: f64,
        heartbeat_timeout: f64,
        window: u32,
        base_window: u32,
        session_budget: i64,
        relay_budget: i64,
        max_frame: u32,
        max_pending: usize,
        max_pending_per_source: usize,
        max_streams_per_session: usize,
        max_streams_per_tunnel: usize,
        fd_ceiling: i64,
        chain: Option<Vec<u8>>,
        key: Option<Vec<u8>>,
        dev_key: Option<Vec<u8>>,
        agent_leaf: Option<Vec<u8>>,
        loopback_leaf: Option<Vec<u8>>,
    ) -> PyResult<Self> {
        let seconds = |s: f64| {
            Duration::try_from_secs_f64(s).map_err(|e| PyValueError::new_err(e.to_string()))
        };
        let config = Config {
            domain,
            handshake_timeout: seconds(handshake_timeout)?,
            hello_timeout: seconds(hello_timeout)?,
            heartbeat_timeout: seconds(heartbeat_timeout)?,
            window,
            base_window,
            session_budget,
            max_frame: check_max_payload(max_frame)?,
            max_pending,
            max_pending_per_source,
            max_streams_per_session,
            max_streams_per_tunnel,
            fd_ceiling,
        };
        let certificates = match (&chain, &key, &dev_key, &agent_leaf) {
            (Some(chain), Some(key), _, _) => Certificates::Operator { chain, key },
            (_, _, Some(key), Some(agent)) => Certificates::Dev {
                key,
                agent,
                loopback: loopback_leaf.as_deref(),
            },
            _ => {
                return Err(PyValueError::new_err(
                    "give chain and key, or dev_key and agent_leaf",
                ))
            }
        };
        let engine = Engine::new(config, certificates, threads, relay_budget)
            .map_err(PyValueError::new_err)?;
        Ok(Self { engine })
    }

    /// The socket that becomes readable when events wait (its descriptor is Python's to close).
    fn take_watched_fd(&mut self) -> Option<i32> {
        self.engine
            .take_watched()
            .map(std::os::fd::IntoRawFd::into_raw_fd)
    }

    fn take_events(&self, py: Python<'_>) -> PyResult<Vec<PyEvent>> {
        to_py_events(py, self.engine.take_events())
    }

    /// Listen for TLS on `host:port`; returns the port bound. OSError as `socket.bind` raises.
    fn listen(&self, host: String, port: u16) -> PyResult<u16> {
        let host = addresses(vec![host])?[0];
        self.engine.listen(host, port).map_err(os_error)
    }

    /// A raw TCP listener for the tunnel on the first port of `ports` free on all `hosts`.
    fn listen_tcp(&self, tunnel_id: &str, hosts: Vec<String>, ports: Vec<u16>) -> PyResult<u16> {
        let hosts = addresses(hosts)?;
        self.engine
            .listen_tcp(tunnel_id, &hosts, &ports)
            .map_err(os_error)
    }

    fn listen_tls(&self, tunnel_id: &str, hosts: Vec<String>, ports: Vec<u16>) -> PyResult<u16> {
        let hosts = addresses(hosts)?;
        self.engine
            .listen_tls(tunnel_id, &hosts, &ports)
            .map_err(os_error)
    }

    #[pyo3(signature = (tunnel_id, host, session_id, h2, leaf=None, allow=Vec::new(), proxy=0, quota=None, client_ca=None))]
    #[allow(clippy::too_many_arguments)]
    fn add_route(
        &self,
        tunnel_id: &str,
        host: String,
        session_id: String,
        h2: bool,
        leaf: Option<Vec<u8>>,
        allow: Vec<String>,
        proxy: u8,
        quota: Option<(String, i64)>,
        client_ca: Option<Vec<u8>>,
    ) -> PyResult<()> {
        if proxy > 2 {
            return Err(PyValueError::new_err(format!(
                "PROXY protocol version {proxy} (1 or 2)"
            )));
        }
        let allow = allow
            .iter()
            .map(|text| Network::parse(text))
            .collect::<Result<Vec<_>, _>>()
            .map_err(PyValueError::new_err)?;
        let route = Route {
            host,
            session: session_id,
            h2,
            allow: allow.into(),
            proxy,
            quota: quota.map(|(key, max)| self.engine.quota(&key, max)),
            client_auth: match client_ca {
                Some(pem) => Some(Arc::new(
                    self.engine
                        .client_auth(&pem)
                        .map_err(|BadCertificate(why)| PyValueError::new_err(why))?,
                )),
                None => None,
            },
        };
        self.engine
            .add_route(tunnel_id, route, leaf.as_deref())
            .map_err(PyValueError::new_err)
    }

    fn remove_route(&self, tunnel_id: &str) {
        self.engine.remove_route(tunnel_id);
    }

    #[getter]
    fn per_host_leaves(&self) -> bool {
        self.engine.per_host_leaves()
    }

    /// Serve a renewed certificate chain and key (PEM) from the next handshake on;
    /// ValueError (and the old pair kept) if they are not a matching pair.
    fn reload_certificate(&self, chain: &[u8], key: &[u8]) -> PyResult<()> {
        self.engine
            .reload_certificate(chain, key)
            .map_err(|BadCertificate(why)| PyValueError::new_err(why))
    }

    fn session_open(&self, session_id: &str) -> bool {
        self.engine.session_open(session_id)
    }

    fn welcome(&self, session_id: &str, frame: &[u8], peer_window: u32, send_payload: u32) {
        self.engine
            .welcome(session_id, frame, peer_window, send_payload);
    }

    fn send_control(&self, session_id: &str, frame: &[u8]) {
        self.engine.send_control(session_id, frame);
    }

    fn close_session(&self, session_id: &str, goaway: &[u8]) {
        self.engine.close_session(session_id, goaway);
    }

    fn goaway(&self, goaway: &[u8]) {
        self.engine.goaway(goaway);
    }

    /// `(open, total, bytes_in, bytes_out)` of a tunnel.
    fn stats(&self, tunnel_id: &str) -> (i64, u64, u64, u64) {
        self.engine.stats(tunnel_id)
    }

    fn buffered(&self, tunnel_id: &str) -> i64 {
        self.engine.buffered(tunnel_id)
    }

    /// `[(reason, count)]` of TLS handshakes that failed, every reason listed.
    fn handshake_failures(&self) -> Vec<(&'static str, u64)> {
        self.engine.handshake_failures()
    }

    /// `(bounds, counts, sum)`: the stream-open latency histogram (one count per bound, then +Inf).
    fn open_latency(&self) -> (Vec<f64>, Vec<u64>, f64) {
        self.engine.open_latency()
    }

    /// `(open, [(client, bytes_in, bytes_out, age_seconds)])`: how many public connections the
    /// tunnel has open and the `limit` oldest (at most [`MAX_LISTED_CONNECTIONS`]). Without the
    /// GIL: a tunnel may hold thousands, and the data plane's tasks never wait for Python.
    fn connections(
        &self,
        py: Python<'_>,
        tunnel_id: &str,
        limit: usize,
    ) -> (usize, Vec<crate::relay::observe::Listing>) {
        let limit = limit.min(MAX_LISTED_CONNECTIONS);
        py.detach(|| self.engine.connections(tunnel_id, limit))
    }

    /// Credit the relay may still lend to streams beyond their base windows.
    #[getter]
    fn budget_left(&self) -> i64 {
        self.engine.budget_left()
    }

    fn session_ids(&self) -> Vec<String> {
        self.engine.session_ids()
    }

    /// `(sessions, tunnels, leaves)` the engine holds.
    fn census(&self) -> (usize, usize, usize) {
        self.engine.census()
    }

    fn open_streams(&self) -> usize {
        self.engine.open_streams()
    }

    fn stop_listening(&self) {
        self.engine.stop_listening();
    }

    fn close(&mut self, goaway: &[u8]) {
        self.engine.close(goaway);
    }
}

#[pymodule]
fn _native(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add_class::<FrameDecoder>()?;
    module.add_class::<RelayEngine>()?;
    module.add_class::<AgentEngine>()?;
    module.add_function(wrap_pyfunction!(encode, module)?)?;
    module.add_function(wrap_pyfunction!(peek_client_hello, module)?)?;
    module.add("HEADER_SIZE", frames::HEADER_SIZE)?;
    module.add("MAX_FRAME_PAYLOAD", frames::MAX_FRAME_PAYLOAD)?;
    module.add("MAX_CONTROL_PAYLOAD", frames::MAX_CONTROL_PAYLOAD)?;
    Ok(())
}
