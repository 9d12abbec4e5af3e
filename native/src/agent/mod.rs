//! The agent's data plane (issue 14, stage 3): the TLS link to a relay and the streams on it,
//! each dialled to its tunnel's local service, on a tokio runtime beside the interpreter.
//!
//! Python keeps the session's conversation (`burrow/agent/native_session.py`): it writes
//! HELLO, BIND and UNBIND (`send_control`) and hears WELCOME, BOUND, BIND_FAILED, UNBOUND and
//! GOAWAY through the same events queue and watched descriptor as the relay's engine. It
//! says which tunnels the link serves (`add_tunnel`) and where each one's connections go.
//! Here: the link (one task reading, one writing, one for heartbeats), OPEN (the stream is
//! dialled, with retries until the tunnel's connect timeout; what the client sends meanwhile
//! waits, at most one window since no credit is granted for it), the bytes each way under the
//! relay's windows, half-close, resets, and each tunnel's counters.

mod json;
mod link;
mod stream;

use std::collections::HashMap;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio::runtime::Runtime;

use crate::relay::events::{Event, Events};
use crate::relay::lock;
pub use link::Link;

/// Where a tunnel's connections go.
#[derive(Clone, Debug)]
pub enum Target {
    /// A TCP port on the first of `hosts` that accepts (a bare port: IPv4 then IPv6 loopback).
    Tcp { hosts: Vec<String>, port: u16 },
    /// A unix socket.
    Unix(PathBuf),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
            Self::Tcp { hosts, port } if hosts.len() > 1 => write!(f, "local port {port}"),
            Self::Tcp { hosts, port } => match hosts.first() {
                Some(host) if host.contains(':') => write!(f, "[{host}]:{port}"),
                Some(host) => write!(f, "{host}:{port}"),
                None => write!(f, "local port {port}"),
            },
        }
    }
}

/// A tunnel's counters, kept across sessions (a reconnect keeps the tunnel and its numbers).
#[derive(Debug, Default)]
pub struct Counters {
    pub open: AtomicI64,
    pub total: AtomicU64,
    /// From public clients towards the service.
    pub bytes_in: AtomicU64,
    /// From the service towards public clients.
    pub bytes_out: AtomicU64,
}

/// A tunnel a link serves: where its streams go, for how long a dial may retry, its counters.
pub struct Tunnel {
    pub target: Target,
    pub connect_timeout: Duration,
    pub counters: Arc<Counters>,
}

/// What a link needs to know at its start.
#[derive(Clone, Debug)]
pub struct LinkConfig {
    /// The window we announced in HELLO: what the relay may send a stream before our WINDOW.
    pub window: u32,
    /// The largest DATA payload we read.
    pub max_frame: u32,
    pub heartbeat_timeout: Duration,
}

pub struct Shared {
    pub events: Events,
    pub links: Mutex<HashMap<String, Arc<Link>>>,
    pub counters: Mutex<HashMap<u64, Arc<Counters>>>,
}

impl Shared {
    pub fn log(&self, kind: &'static str, level: u8, message: String) {
        self.events.log(kind, level, message);
    }
}

pub struct Agent {
    runtime: Option<Runtime>,
    shared: Arc<Shared>,
    watched: Option<UnixStream>,
    pid: u32,
}

/// How a dial to a relay ended, for Python's one-line errors.
fn failure(error: &std::io::Error) -> &'static str {
    if let Some(tls) = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        return match tls {
            rustls::Error::InvalidCertificate(_) => "certificate",
            rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => {
                "not_tls"
            }
            rustls::Error::AlertReceived(_) => "alert",
            rustls::Error::NoApplicationProtocol => "alpn",
            _ => "tls",
        };
    }
    match error.kind() {
        std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset => "closed",
        std::io::ErrorKind::InvalidData => "not_tls",
        _ => "os",
    }
}

impl Agent {
    pub fn new(threads: usize) -> Result<Self, String> {
        let (events, watched) = Events::new().map_err(|e| e.to_string())?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name("burrow-agent")
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the data plane's threads: {e}"))?;
        Ok(Self {
            runtime: Some(runtime),
            shared: Arc::new(Shared {
                events,
                links: Mutex::new(HashMap::new()),
                counters: Mutex::new(HashMap::new()),
            }),
            watched: Some(watched),
            pid: std::process::id(),
        })
    }

    fn runtime(&self) -> &Runtime {
        self.runtime
            .as_ref()
            .expect("the runtime lives as long as the engine")
    }

    pub fn take_watched(&mut self) -> Option<UnixStream> {
        self.watched.take()
    }

    pub fn take_events(&self) -> Vec<Event> {
        self.shared.events.take()
    }

    /// Dial a relay (each of `hosts` in turn while they refuse), TLS with `roots` (PEM) as the
    /// only trust anchors, offering `alpn`; then run the link. Events: `Connected` or `Failed`,
    /// later the frames Python answers and `SessionClosed`.
    #[allow(clippy::too_many_arguments)]
    pub fn connect(
        &self,
        id: String,
        hosts: Vec<String>,
        port: u16,
        server_name: String,
        roots: &[u8],
        alpn: Vec<Vec<u8>>,
        timeout: Duration,
        config: LinkConfig,
    ) -> Result<(), String> {
        let mut store = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(roots) {
            let cert = cert.map_err(|e| format!("cannot read the CA certificates: {e}"))?;
            // (a system bundle holds certificates rustls refuses as anchors: skip those)
            let _ = store.add(cert);
        }
        if store.is_empty() {
            return Err("no CA certificate to trust the relay with".into());
        }
        // AES-128-GCM first (rustls would offer AES-256 first, and a relay follows the client's
        // order): the same AEAD strength class as TLS 1.3 requires, a quarter fewer rounds per
        // byte on both ends of the busiest link; what ssh's aes128-gcm peer pays
        let mut provider = rustls::crypto::ring::default_provider();
        provider
            .cipher_suites
            .sort_by_key(|suite| suite.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(store)
            .with_no_client_auth();
        tls.alpn_protocols = alpn;
        let name = ServerName::try_from(server_name.clone())
            .map_err(|_| format!("{server_name:?} is not a host name"))?;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
        let shared = self.shared.clone();
        self.runtime().spawn(async move {
            let dialled = tokio::time::timeout(timeout, async {
                let mut last = None;
                for (index, host) in hosts.iter().enumerate() {
                    match TcpStream::connect((host.as_str(), port)).await {
                        Ok(tcp) => {
                            let _ = tcp.set_nodelay(true);
                            return connector.connect(name, tcp).await;
                        }
                        Err(error)
                            if error.kind() == std::io::ErrorKind::ConnectionRefused
                                && index + 1 < hosts.len() =>
                        {
                            last = Some(error);
                        }
                        Err(error) => return Err(error),
                    }
                }
                Err(last.unwrap_or_else(|| std::io::Error::other("no address to dial")))
            })
            .await;
            match dialled {
                Err(_) => shared.events.control(Event::Failed {
                    session: id,
                    kind: "timeout",
                    message: format!("no answer within {:.0} s", timeout.as_secs_f64()),
                }),
                Ok(Err(error)) => shared.events.control(Event::Failed {
                    session: id,
                    kind: failure(&error),
                    message: error.to_string(),
                }),
                Ok(Ok(tls)) => {
                    let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
                    let link = Link::new(id.clone(), shared.clone(), config);
                    lock(&shared.links).insert(id.clone(), link.clone());
                    shared
                        .events
                        .control(Event::Connected { session: id, alpn });
                    link.serve(tls).await;
                }
            }
        });
        Ok(())
    }

    fn link(&self, id: &str) -> Option<Arc<Link>> {
        lock(&self.shared.links).get(id).cloned()
    }

    /// Queue a frame Python encoded (HELLO, BIND, UNBIND) on the link.
    pub fn send_control(&self, id: &str, frame: &[u8]) -> bool {
        self.link(id).is_some_and(|link| link.send_control(frame))
    }

    /// The relay's WELCOME, as Python checked it: the window it grants each stream, its largest frame.
    pub fn welcomed(&self, id: &str, peer_window: u32, send_payload: u32) {
        if let Some(link) = self.link(id) {
            link.welcomed(peer_window, send_payload);
        }
    }

    /// Streams the relay opens for `tunnel_id` on this link go to `target`.
    pub fn add_tunnel(
        &self,
        id: &str,
        tunnel_id: &str,
        key: u64,
        target: Target,
        connect_timeout: Duration,
    ) {
        let counters = lock(&self.shared.counters).entry(key).or_default().clone();
        if let Some(link) = self.link(id) {
            link.add_tunnel(
                tunnel_id,
                Arc::new(Tunnel {
                    target,
                    connect_timeout,
                    counters,
                }),
            );
        }
    }

    pub fn remove_tunnel(&self, id: &str, tunnel_id: &str) {
        if let Some(link) = self.link(id) {
            link.remove_tunnel(tunnel_id);
        }
    }

    /// (open, total, bytes in, bytes out) of the tunnel Python knows as `key`.
    pub fn counters(&self, key: u64) -> (i64, u64, u64, u64) {
        lock(&self.shared.counters)
            .get(&key)
            .map_or((0, 0, 0, 0), |c| {
                (
                    c.open.load(Ordering::Relaxed),
                    c.total.load(Ordering::Relaxed),
                    c.bytes_in.load(Ordering::Relaxed),
                    c.bytes_out.load(Ordering::Relaxed),
                )
            })
    }

    /// The tunnel is gone for good: its counters too.
    pub fn forget_counters(&self, key: u64) {
        lock(&self.shared.counters).remove(&key);
    }

    /// End the link: `goaway` (Python's GOAWAY frame, may be empty) goes out first.
    pub fn close(&self, id: &str, goaway: &[u8]) {
        if let Some(link) = self.link(id) {
            link.close_with(goaway);
        }
    }

    /// Bytes the link holds for the relay (0 once it is gone).
    pub fn unsent(&self, id: &str) -> usize {
        self.link(id).map_or(0, |link| link.unsent())
    }

    pub fn link_ids(&self) -> Vec<String> {
        lock(&self.shared.links).keys().cloned().collect()
    }

    pub fn open_streams(&self) -> usize {
        lock(&self.shared.links)
            .values()
            .map(|link| link.stream_count())
            .sum()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            if std::process::id() == self.pid {
                runtime.shutdown_timeout(Duration::from_millis(100));
            } else {
                // a forked child: the runtime's threads were not copied; never wait for them
                std::mem::forget(runtime);
            }
        }
    }
}
