//! The relay's data plane: accept, TLS, SNI routing, raw TCP listeners, the
//! agent sessions and their streams, on a multi-threaded tokio runtime.
//!
//! It decides nothing. The control plane (Python, `burrow/relay/control.py`)
//! installs routes (SNI name or TCP port -> tunnel -> session), answers the
//! requests handed up ([`events`]), and reads counters. Each connection is a
//! task; a failing task ends its connection and nothing else.
//!
//! - [`accept`]: the TLS port and the raw TCP listeners, within the caps on
//!   pending handshakes and descriptors, and the ClientHello routing.
//! - [`session`]: one agent's multiplexed link.
//! - [`public`]: one public connection, pumped to and from its stream.

pub mod accept;
pub mod access;
pub mod engine;
pub mod events;
pub mod observe;
pub mod public;
pub mod session;
pub mod tls;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::AbortHandle;

use events::Events;
use session::Session;
use tls::Identities;

/// Everything the data plane is told at start (see `RelayConfig` in Python).
#[derive(Clone, Debug)]
pub struct Config {
    pub domain: String,
    pub handshake_timeout: Duration,
    pub hello_timeout: Duration,
    pub heartbeat_timeout: Duration,
    /// The most a stream may be granted (`--window`).
    pub window: u32,
    /// What every stream is granted whatever the budgets (announced in WELCOME).
    pub base_window: u32,
    /// Credit beyond `base_window` that one session's streams may hold in all.
    pub session_budget: i64,
    pub max_frame: u32,
    pub max_pending: usize,
    pub max_pending_per_source: usize,
    pub max_streams_per_session: usize,
    pub max_streams_per_tunnel: usize,
    /// Connections are reset at accept when their descriptor is this high.
    pub fd_ceiling: i64,
}

/// A tunnel's counters, read by the control plane.
#[derive(Debug, Default)]
pub struct Stats {
    pub open: AtomicI64,
    pub total: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    /// Bytes from the agent waiting here to be written to the tunnel's public clients.
    pub buffered: AtomicI64,
}

/// Where a routed tunnel's connections go.
#[derive(Clone, Debug)]
pub struct Route {
    pub host: String,
    pub session: String,
    pub h2: bool,
    /// The networks clients may come from (empty: anyone).
    pub allow: Arc<[access::Network]>,
    /// 0, or the PROXY protocol version whose header goes before a connection's bytes.
    pub proxy: u8,
    /// The cap on public connections open at once that this tunnel shares with its tenant's others.
    pub quota: Option<Arc<access::Quota>>,
    /// The owner requires client certificates (mutual TLS) on the tunnel's TLS addresses.
    pub client_auth: Option<Arc<tls::ClientAuth>>,
}

/// What the data plane holds for one tunnel.
pub struct Tunnel {
    pub id: String,
    pub route: Mutex<Option<Route>>,
    pub stats: Stats,
    /// Set when the tunnel is removed: its connections are reset.
    pub closed: Closed,
    pub listeners: Mutex<Vec<AbortHandle>>,
    /// Credit beyond base windows this tunnel's streams may hold: half a session's budget,
    /// so one tunnel whose clients stop reading leaves room for the session's others.
    pub budget: Arc<Budget>,
    /// Its open public connections, for the operator's listing.
    pub connections: observe::Connections,
}

/// A flag set once, that tasks can wait on (a watch channel did the same in 344 bytes a tunnel).
#[derive(Default)]
pub struct Closed {
    set: AtomicBool,
    notify: Notify,
}

impl Closed {
    pub fn set(&self) {
        self.set.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    pub fn is_set(&self) -> bool {
        self.set.load(Ordering::Acquire)
    }

    /// Return once set (at once if it is).
    pub async fn wait(&self) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable(); // (before the look: a set() meanwhile wakes it)
            if self.is_set() {
                return;
            }
            notified.await;
        }
    }
}

impl Tunnel {
    pub(crate) fn new(id: &str, budget: i64) -> Self {
        Self {
            budget: Arc::new(Budget::new(budget)),
            id: id.to_owned(),
            route: Mutex::new(None),
            stats: Stats::default(),
            closed: Closed::default(),
            listeners: Mutex::new(Vec::new()),
            connections: observe::Connections::default(),
        }
    }

    pub fn route(&self) -> Option<Route> {
        lock(&self.route).clone()
    }

    /// True when a client at `ip` may connect by the route's allowlist (no route: the
    /// connection is let through, to be dropped for want of a session like any other).
    pub fn allows(&self, ip: std::net::IpAddr) -> bool {
        lock(&self.route)
            .as_ref()
            .is_none_or(|route| access::allowed(&route.allow, ip))
    }

    fn stop_listening(&self) {
        for listener in lock(&self.listeners).drain(..) {
            listener.abort();
        }
    }
}

/// The routing tables.
#[derive(Default)]
pub struct Routes {
    pub by_id: HashMap<String, Arc<Tunnel>>,
    pub by_host: HashMap<String, Arc<Tunnel>>,
}

/// Bytes of credit that may still be lent to streams (beyond their base window).
///
/// Whatever a relay grants a stream, the agent may send and the relay may have
/// to hold while the stream's client does not read; so the sum of what is
/// granted is what a relay may hold, and budgets bound it.
#[derive(Debug)]
pub struct Budget {
    size: i64,
    left: AtomicI64,
}

impl Budget {
    pub fn new(size: i64) -> Self {
        Self {
            size,
            left: AtomicI64::new(size),
        }
    }

    /// What it lends when nothing is out.
    pub fn size(&self) -> i64 {
        self.size
    }

    /// Take up to `want` bytes; returns how many were taken.
    pub fn take(&self, want: i64) -> i64 {
        let mut left = self.left.load(Ordering::Relaxed);
        loop {
            let taken = want.min(left).max(0);
            if taken == 0 {
                return 0;
            }
            match self.left.compare_exchange_weak(
                left,
                left - taken,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return taken,
                Err(now) => left = now,
            }
        }
    }

    pub fn give(&self, size: i64) {
        self.left.fetch_add(size, Ordering::AcqRel);
    }

    pub fn left(&self) -> i64 {
        self.left.load(Ordering::Relaxed)
    }
}

/// Take up to `want` from every budget of the chain (a tunnel's, its session's, the relay's):
/// what all of them could lend.
pub fn borrow(budgets: &[&Budget], want: i64) -> i64 {
    let mut taken = want;
    for (i, budget) in budgets.iter().enumerate() {
        let got = budget.take(taken);
        if got < taken {
            for earlier in &budgets[..i] {
                earlier.give(taken - got);
            }
        }
        taken = got;
    }
    taken
}

/// Give back what [`borrow`] took.
pub fn repay(budgets: &[&Budget], size: i64) {
    for budget in budgets {
        budget.give(size);
    }
}

/// Handshakes in progress, overall and per source address.
#[derive(Default)]
pub struct Pending {
    total: usize,
    by_source: HashMap<IpAddr, usize>,
}

/// One admitted handshake; dropping it frees the slot.
pub struct PendingSlot {
    shared: Arc<Shared>,
    source: IpAddr,
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        let mut pending = lock(&self.shared.pending);
        pending.total -= 1;
        if let Some(count) = pending.by_source.get_mut(&self.source) {
            *count -= 1;
            if *count == 0 {
                pending.by_source.remove(&self.source);
            }
        }
    }
}

/// What every task of the data plane shares.
pub struct Shared {
    pub config: Config,
    pub events: Events,
    pub identities: Identities,
    /// Credit beyond the base windows that all sessions' streams may hold in all.
    pub budget: Arc<Budget>,
    pub routes: Mutex<Routes>,
    pub sessions: Mutex<HashMap<String, Arc<Session>>>,
    pub pending: Mutex<Pending>,
    /// Tenants' connection quotas, by key, while a route holds them.
    pub quotas: Mutex<HashMap<String, std::sync::Weak<access::Quota>>>,
    /// The accept loops of the TLS port.
    pub accepting: Mutex<Vec<AbortHandle>>,
    /// Tunnels' own ports: whether each listener still holds its port, and whose it is.
    pub tunnel_ports: Mutex<HashMap<u16, PortHolder>>,
    /// Handshake failures, stream-open latency: counted here, read at each scrape.
    pub observed: observe::Observed,
}

/// A tunnel listener's token (alive while it holds its port) and its tunnel.
pub type PortHolder = (Weak<()>, Weak<Tunnel>);

/// How long a resumed tunnel waits for the port its old listener is giving up (closing
/// takes one turn of a runtime thread: microseconds, unless every thread is busy). Only a
/// port known to be closing is waited for, so a generous bound costs nothing otherwise.
const PORT_CLOSE_WAIT: Duration = Duration::from_secs(1);

/// A poisoned lock means a task panicked while holding it; the data is still consistent
/// for our uses (counters and maps updated in one step), so go on with it.
pub fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    pub fn new(config: Config, events: Events, identities: Identities, budget: i64) -> Self {
        Self {
            budget: Arc::new(Budget::new(budget)),
            config,
            events,
            identities,
            routes: Mutex::new(Routes::default()),
            sessions: Mutex::new(HashMap::new()),
            pending: Mutex::new(Pending::default()),
            quotas: Mutex::new(HashMap::new()),
            accepting: Mutex::new(Vec::new()),
            tunnel_ports: Mutex::new(HashMap::new()),
            observed: observe::Observed::default(),
        }
    }

    /// `tunnel`'s listener holds `port` while `alive` upgrades.
    pub fn port_listening(&self, port: u16, alive: Weak<()>, tunnel: &Arc<Tunnel>) {
        let mut ports = lock(&self.tunnel_ports);
        ports.retain(|_, (alive, _)| alive.strong_count() > 0);
        ports.insert(port, (alive, Arc::downgrade(tunnel)));
    }

    /// Wait (briefly, blocking) while `port` is held by a listener of a removed tunnel; true
    /// once it is let go, false when a live tunnel holds it or it takes too long.
    pub fn wait_port_closed(&self, port: u16) -> bool {
        let deadline = std::time::Instant::now() + PORT_CLOSE_WAIT;
        loop {
            let held = lock(&self.tunnel_ports)
                .get(&port)
                .and_then(|(alive, tunnel)| {
                    let closing = tunnel.upgrade().is_none_or(|t| t.closed.is_set());
                    (alive.strong_count() > 0).then_some(closing)
                });
            match held {
                None => return true,
                Some(false) => return false,
                Some(true) if std::time::Instant::now() >= deadline => return false,
                Some(true) => std::thread::sleep(Duration::from_micros(200)),
            }
        }
    }

    /// Count a new handshake from `source`, or say why it must be refused.
    pub fn admit(self: &Arc<Self>, source: IpAddr) -> Result<PendingSlot, String> {
        let mut pending = lock(&self.pending);
        let limit = self.config.max_pending;
        if pending.total >= limit {
            return Err(format!(
                "{} TLS handshakes already pending (limit {limit})",
                pending.total
            ));
        }
        let per_source = self.config.max_pending_per_source;
        let from_source = pending.by_source.get(&source).copied().unwrap_or(0);
        if from_source >= per_source {
            return Err(format!(
                "{from_source} TLS handshakes already pending from it (limit {per_source})"
            ));
        }
        pending.total += 1;
        *pending.by_source.entry(source).or_insert(0) += 1;
        Ok(PendingSlot {
            shared: self.clone(),
            source,
        })
    }

    /// Why a connection given descriptor `fd` must be refused, or None.
    pub fn refuse_descriptor(&self, fd: i64) -> Option<String> {
        let ceiling = self.config.fd_ceiling;
        (fd >= ceiling).then(|| {
            format!(
                "file descriptor {fd} is within the reserve kept below the limit (raise ulimit -n)"
            )
        })
    }

    pub fn tunnel_by_host(&self, host: &str) -> Option<Arc<Tunnel>> {
        lock(&self.routes).by_host.get(host).cloned()
    }

    pub fn tunnel(&self, id: &str) -> Option<Arc<Tunnel>> {
        lock(&self.routes).by_id.get(id).cloned()
    }

    pub fn session(&self, id: &str) -> Option<Arc<Session>> {
        lock(&self.sessions).get(id).cloned()
    }

    /// The tunnel's entry, made if it is new (a raw TCP listener comes before its route).
    pub fn tunnel_entry(&self, id: &str) -> Arc<Tunnel> {
        lock(&self.routes)
            .by_id
            .entry(id.to_owned())
            .or_insert_with(|| Arc::new(Tunnel::new(id, self.config.session_budget / 2)))
            .clone()
    }

    pub fn add_route(&self, id: &str, route: Route) {
        let mut routes = lock(&self.routes);
        let tunnel = routes
            .by_id
            .entry(id.to_owned())
            .or_insert_with(|| Arc::new(Tunnel::new(id, self.config.session_budget / 2)))
            .clone();
        routes.by_host.insert(route.host.clone(), tunnel.clone());
        *lock(&tunnel.route) = Some(route);
    }

    /// The connection quota named `key` (a tenant's), shared by every route given it; `max` is
    /// its cap from now on. Quotas no route holds any more are forgotten.
    pub fn quota(&self, key: &str, max: i64) -> Arc<access::Quota> {
        let mut quotas = lock(&self.quotas);
        if let Some(quota) = quotas.get(key).and_then(std::sync::Weak::upgrade) {
            quota.set_max(max);
            return quota;
        }
        quotas.retain(|_, quota| quota.strong_count() > 0);
        let quota = Arc::new(access::Quota::new(max));
        quotas.insert(key.to_owned(), Arc::downgrade(&quota));
        quota
    }

    /// Unroute a tunnel: its listeners stop, its connections are reset, its leaf is forgotten.
    pub fn remove_route(&self, id: &str) {
        let tunnel = {
            let mut routes = lock(&self.routes);
            let Some(tunnel) = routes.by_id.remove(id) else {
                return;
            };
            if let Some(route) = tunnel.route() {
                if routes
                    .by_host
                    .get(&route.host)
                    .is_some_and(|t| Arc::ptr_eq(t, &tunnel))
                {
                    routes.by_host.remove(&route.host);
                }
                self.identities.resolver.forget(&route.host);
            }
            tunnel
        };
        tunnel.stop_listening();
        tunnel.closed.set();
    }

    /// Accept nothing new: the TLS port and every raw TCP listener.
    pub fn stop_listening(&self) {
        for task in lock(&self.accepting).drain(..) {
            task.abort();
        }
        let tunnels: Vec<_> = lock(&self.routes).by_id.values().cloned().collect();
        for tunnel in tunnels {
            tunnel.stop_listening();
        }
    }

    /// The open sessions' ids.
    pub fn session_ids(&self) -> Vec<String> {
        lock(&self.sessions).keys().cloned().collect()
    }

    /// Streams open across all sessions.
    pub fn open_streams(&self) -> usize {
        let sessions: Vec<_> = lock(&self.sessions).values().cloned().collect();
        sessions.iter().map(|s| s.stream_count()).sum()
    }

    pub fn log(&self, kind: &'static str, level: u8, message: String) {
        self.events.log(kind, level, message);
    }
}

/// `host:port`, `[v6]:port` for IPv6 (as the Python side writes peers).
pub fn format_address(address: std::net::SocketAddr) -> String {
    match address {
        std::net::SocketAddr::V4(a) => format!("{}:{}", a.ip(), a.port()),
        std::net::SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
            Some(v4) => format!("{v4}:{}", a.port()),
            None => format!("[{}]:{}", a.ip(), a.port()),
        },
    }
}

/// The counters as Python reads them: (open, total, in, out).
pub fn stats_tuple(stats: &Stats) -> (i64, u64, u64, u64) {
    (
        stats.open.load(Ordering::Relaxed),
        stats.total.load(Ordering::Relaxed),
        stats.bytes_in.load(Ordering::Relaxed),
        stats.bytes_out.load(Ordering::Relaxed),
    )
}
