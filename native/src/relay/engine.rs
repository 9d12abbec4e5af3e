//! The relay's data plane as the control plane drives it: a tokio runtime
//! and the [`Shared`] state its tasks run on. Every method returns at once.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::runtime::Runtime;

use super::accept::{self, Listening};
use super::events::{Event, Events};
use super::tls::{BadCertificate, Identities, Resolver};
use super::{lock, stats_tuple, Config, Route, Shared};

/// The certificates the relay serves.
pub enum Certificates<'a> {
    /// The operator's chain and key, for every name.
    Operator { chain: &'a [u8], key: &'a [u8] },
    /// Dev CA leaves (one key); the agent endpoint's leaf is given now, the tunnels' with their
    /// routes; with `loopback`, the leaf of tunnels' own loopback ports ([`Engine::listen_tls`]).
    Dev {
        key: &'a [u8],
        agent: &'a [u8],
        loopback: Option<&'a [u8]>,
    },
}

pub struct Engine {
    runtime: Option<Runtime>,
    shared: Arc<Shared>,
    watched: Option<UnixStream>,
    pid: u32,
}

impl Engine {
    pub fn new(
        config: Config,
        certificates: Certificates<'_>,
        threads: usize,
        relay_budget: i64,
    ) -> Result<Self, String> {
        let (resolver, loopback) = match certificates {
            Certificates::Operator { chain, key } => (Resolver::shared(chain, key), None),
            Certificates::Dev {
                key,
                agent,
                loopback,
            } => (
                Resolver::per_host(key).and_then(|r| {
                    r.add(&config.domain, agent)?;
                    Ok(r)
                }),
                loopback,
            ),
        };
        let resolver = resolver.map_err(|BadCertificate(why)| why)?;
        let identities = Identities::new(resolver, loopback).map_err(|BadCertificate(why)| why)?;
        let (events, watched) = Events::new().map_err(|e| e.to_string())?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name("burrow-relay")
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the data plane's threads: {e}"))?;
        Ok(Self {
            runtime: Some(runtime),
            shared: Arc::new(Shared::new(config, events, identities, relay_budget)),
            watched: Some(watched),
            pid: std::process::id(),
        })
    }

    fn runtime(&self) -> &Runtime {
        self.runtime
            .as_ref()
            .expect("the runtime lives as long as the engine")
    }

    /// The socket Python watches for events (taken once).
    pub fn take_watched(&mut self) -> Option<UnixStream> {
        self.watched.take()
    }

    pub fn take_events(&self) -> Vec<Event> {
        self.shared.events.take()
    }

    /// Listen on the TLS port; returns the bound port.
    pub fn listen(&self, host: IpAddr, port: u16) -> io::Result<u16> {
        let listener = accept::bind_listener(SocketAddr::new(host, port))?;
        let bound = listener.local_addr()?.port();
        let _entered = self.runtime().enter();
        let listener = TcpListener::from_std(listener)?;
        let task = self.runtime().spawn(accept::tls_port(
            self.shared.clone(),
            Listening::new(listener).0,
            None,
        ));
        lock(&self.shared.accepting).push(task.abort_handle());
        Ok(bound)
    }

    /// Hold a raw TCP listener for the tunnel on the first port of `ports` free on every host.
    pub fn listen_tcp(&self, tunnel_id: &str, hosts: &[IpAddr], ports: &[u16]) -> io::Result<u16> {
        self.listen_tunnel(tunnel_id, hosts, ports, false)
    }

    /// Hold a TLS listener of the tunnel's own (the loopback certificate; see `accept::handshake`).
    pub fn listen_tls(&self, tunnel_id: &str, hosts: &[IpAddr], ports: &[u16]) -> io::Result<u16> {
        if self.shared.identities.loopback.is_none() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "no loopback certificate: this relay gives no tunnel a TLS port of its own",
            ));
        }
        self.listen_tunnel(tunnel_id, hosts, ports, true)
    }

    fn listen_tunnel(
        &self,
        tunnel_id: &str,
        hosts: &[IpAddr],
        ports: &[u16],
        tls: bool,
    ) -> io::Result<u16> {
        let mut last = io::Error::new(io::ErrorKind::AddrNotAvailable, "no port to try");
        let bind = |port: u16| -> io::Result<Vec<_>> {
            hosts
                .iter()
                .map(|&host| accept::bind_listener(SocketAddr::new(host, port)))
                .collect()
        };
        for &port in ports {
            let bound = bind(port).or_else(|error| {
                // a tunnel's own listener that is closing (a resumed tunnel wants its port back)
                if error.kind() == io::ErrorKind::AddrInUse && self.shared.wait_port_closed(port) {
                    bind(port)
                } else {
                    Err(error)
                }
            });
            let listeners = match bound {
                Ok(listeners) => listeners,
                Err(error) => {
                    last = error;
                    continue;
                }
            };
            let tunnel = self.shared.tunnel_entry(tunnel_id);
            let _entered = self.runtime().enter();
            // one token for the port, whatever addresses it is bound on (127.0.0.1 and ::1): the
            // port is free only when the last of its listeners is gone
            let alive = Arc::new(());
            self.shared
                .port_listening(port, Arc::downgrade(&alive), &tunnel);
            for listener in listeners {
                let listening = Listening::sharing(TcpListener::from_std(listener)?, alive.clone());
                let task = if tls {
                    let pinned = Some(tunnel.clone());
                    self.runtime()
                        .spawn(accept::tls_port(self.shared.clone(), listening, pinned))
                } else {
                    self.runtime().spawn(accept::tcp_port(
                        self.shared.clone(),
                        listening,
                        tunnel.clone(),
                    ))
                };
                lock(&tunnel.listeners).push(task.abort_handle());
            }
            return Ok(port);
        }
        Err(last)
    }

    /// Route a tunnel's connections to its session (with its dev leaf, if any).
    pub fn add_route(
        &self,
        tunnel_id: &str,
        route: Route,
        leaf: Option<&[u8]>,
    ) -> Result<(), String> {
        if let Some(leaf) = leaf {
            self.shared
                .identities
                .resolver
                .add(&route.host, leaf)
                .map_err(|BadCertificate(why)| why)?;
        }
        self.shared.add_route(tunnel_id, route);
        Ok(())
    }

    pub fn remove_route(&self, tunnel_id: &str) {
        self.shared.remove_route(tunnel_id);
    }

    /// Configurations requiring client certificates issued by `cas` (PEM).
    pub fn client_auth(&self, cas: &[u8]) -> Result<super::tls::ClientAuth, BadCertificate> {
        self.shared.identities.client_auth(cas)
    }

    /// A tenant's connection quota (see [`super::Shared::quota`]).
    pub fn quota(&self, key: &str, max: i64) -> Arc<super::access::Quota> {
        self.shared.quota(key, max)
    }

    pub fn per_host_leaves(&self) -> bool {
        self.shared.identities.resolver.per_host_leaves()
    }

    /// Serve a renewed operator certificate from the next handshake on.
    pub fn reload_certificate(&self, chain: &[u8], key: &[u8]) -> Result<(), BadCertificate> {
        self.shared.identities.resolver.reload(chain, key)
    }

    pub fn session_open(&self, session_id: &str) -> bool {
        self.shared
            .session(session_id)
            .is_some_and(|s| s.state() == super::session::State::Open)
    }

    pub fn welcome(&self, session_id: &str, frame: &[u8], peer_window: u32, send_payload: u32) {
        if let Some(session) = self.shared.session(session_id) {
            session.welcome(frame, peer_window, send_payload);
        }
    }

    pub fn send_control(&self, session_id: &str, frame: &[u8]) {
        if let Some(session) = self.shared.session(session_id) {
            session.send_control(frame);
        }
    }

    pub fn close_session(&self, session_id: &str, goaway: &[u8]) {
        if let Some(session) = self.shared.session(session_id) {
            session.close_with(goaway);
        }
    }

    pub fn goaway(&self, goaway: &[u8]) {
        let sessions: Vec<_> = lock(&self.shared.sessions).values().cloned().collect();
        for session in sessions {
            session.goaway(goaway);
        }
    }

    pub fn stats(&self, tunnel_id: &str) -> (i64, u64, u64, u64) {
        self.shared
            .tunnel(tunnel_id)
            .map(|t| stats_tuple(&t.stats))
            .unwrap_or_default()
    }

    /// Bytes held for the tunnel's public clients (written to none of them yet).
    pub fn buffered(&self, tunnel_id: &str) -> i64 {
        self.shared
            .tunnel(tunnel_id)
            .map(|t| t.stats.buffered.load(std::sync::atomic::Ordering::Relaxed))
            .unwrap_or(0)
    }

    /// TLS handshake failures by reason, zeros included.
    pub fn handshake_failures(&self) -> Vec<(&'static str, u64)> {
        self.shared.observed.handshakes.read()
    }

    /// The stream-open latency histogram: (bounds, per-bucket counts and +Inf, sum of seconds).
    pub fn open_latency(&self) -> (Vec<f64>, Vec<u64>, f64) {
        self.shared.observed.open_latency.read()
    }

    /// How many public connections the tunnel has open, and the `limit` oldest of them.
    pub fn connections(
        &self,
        tunnel_id: &str,
        limit: usize,
    ) -> (usize, Vec<super::observe::Listing>) {
        self.shared
            .tunnel(tunnel_id)
            .map(|t| t.connections.read(limit))
            .unwrap_or_default()
    }

    /// Credit the relay may still lend beyond base windows.
    pub fn budget_left(&self) -> i64 {
        self.shared.budget.left()
    }

    pub fn session_ids(&self) -> Vec<String> {
        self.shared.session_ids()
    }

    /// (sessions, tunnels, leaves) held.
    pub fn census(&self) -> (usize, usize, usize) {
        let tunnels = lock(&self.shared.routes).by_id.len();
        (
            lock(&self.shared.sessions).len(),
            tunnels,
            self.shared.identities.resolver.leaves(),
        )
    }

    pub fn open_streams(&self) -> usize {
        self.shared.open_streams()
    }

    pub fn stop_listening(&self) {
        self.shared.stop_listening();
    }

    /// Close everything now: listeners, routes (connections reset), sessions.
    pub fn close(&mut self, goaway: &[u8]) {
        self.shared.stop_listening();
        let tunnels: Vec<String> = lock(&self.shared.routes).by_id.keys().cloned().collect();
        for tunnel in tunnels {
            self.shared.remove_route(&tunnel);
        }
        let sessions: Vec<_> = lock(&self.shared.sessions).values().cloned().collect();
        for session in sessions {
            session.close_with(goaway);
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            if self.pid == std::process::id() {
                runtime.shutdown_background();
            } else {
                // a forked child: the runtime's threads were not copied, so waiting for
                // them would hang; its memory is the parent's to free
                std::mem::forget(runtime);
            }
        }
    }
}
