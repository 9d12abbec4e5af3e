//! What the relay's operators read (`burrow relay --metrics`, `burrow status`): TLS handshake
//! failures by reason, how long a public connection waits for its stream, and each tunnel's
//! open connections. Counted with relaxed atomics on the paths that already count bytes, and
//! read when Python asks (a scrape, a status request): nothing crosses per connection.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::lock;

/// Why a TLS handshake on a relay port did not become an agent session or a public connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// No ClientHello, or no finished handshake, within the handshake deadline.
    Timeout,
    /// The client hung up (or its connection failed) before the handshake was done.
    Closed,
    /// The first bytes are not a TLS ClientHello (plain HTTP, a scanner, garbage).
    NotTls,
    /// The ClientHello names no server (an IP literal, or a client that sends no SNI).
    NoServerName,
    /// The ClientHello names a host that is neither the agent endpoint nor a routed tunnel.
    UnknownServerName,
    /// No ALPN protocol in common (an agent endpoint client without `burrow/1`).
    Alpn,
    /// A tunnel that requires client certificates got none, or one its CAs do not vouch for.
    ClientCertificate,
    /// The client ended the handshake with an alert (often: it does not trust our certificate).
    ClientAlert,
    /// Any other TLS protocol error.
    Protocol,
}

impl HandshakeFailure {
    pub const ALL: [Self; 9] = [
        Self::Timeout,
        Self::Closed,
        Self::NotTls,
        Self::NoServerName,
        Self::UnknownServerName,
        Self::Alpn,
        Self::ClientCertificate,
        Self::ClientAlert,
        Self::Protocol,
    ];

    /// The label value in `burrow_tls_handshake_failures_total{reason}`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::Closed => "closed",
            Self::NotTls => "not_tls",
            Self::NoServerName => "no_server_name",
            Self::UnknownServerName => "unknown_server_name",
            Self::Alpn => "alpn",
            Self::ClientCertificate => "client_certificate",
            Self::ClientAlert => "client_alert",
            Self::Protocol => "protocol",
        }
    }

    /// The reason of an I/O error from rustls' handshake (its errors travel inside io::Error).
    pub fn of(error: &std::io::Error) -> Self {
        let tls = error
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>());
        match tls {
            Some(rustls::Error::NoApplicationProtocol) => Self::Alpn,
            Some(rustls::Error::NoCertificatesPresented | rustls::Error::InvalidCertificate(_)) => {
                Self::ClientCertificate
            }
            Some(rustls::Error::AlertReceived(_)) => Self::ClientAlert,
            Some(_) => Self::Protocol,
            None => Self::Closed,
        }
    }
}

/// Handshake failures counted by reason.
#[derive(Debug, Default)]
pub struct HandshakeFailures {
    counts: [AtomicU64; HandshakeFailure::ALL.len()],
}

impl HandshakeFailures {
    pub fn count(&self, reason: HandshakeFailure) {
        self.counts[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// (reason, count) for every reason, zeros included.
    pub fn read(&self) -> Vec<(&'static str, u64)> {
        HandshakeFailure::ALL
            .iter()
            .map(|&reason| {
                (
                    reason.name(),
                    self.counts[reason as usize].load(Ordering::Relaxed),
                )
            })
            .collect()
    }
}

/// Upper bounds (seconds) of the stream-open latency histogram's buckets: from half a
/// millisecond (a raw TCP connection on loopback) to the 10 s handshake deadline.
pub const OPEN_LATENCY_BOUNDS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// How long public connections waited from accept() to their stream's OPEN being queued for
/// the agent (the TLS handshake on TLS addresses, routing, the caps). The agent does not
/// answer an OPEN (it dials its local service and sends data, or a RST), so that is where
/// the relay's part ends.
#[derive(Debug, Default)]
pub struct Histogram {
    /// One count per bucket (not cumulative), the last for what is above every bound.
    buckets: [AtomicU64; OPEN_LATENCY_BOUNDS.len() + 1],
    sum_nanos: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, waited: Duration) {
        let seconds = waited.as_secs_f64();
        let bucket = OPEN_LATENCY_BOUNDS
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(OPEN_LATENCY_BOUNDS.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(waited.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// (bounds, per-bucket counts with one more for +Inf, sum of seconds).
    pub fn read(&self) -> (Vec<f64>, Vec<u64>, f64) {
        let counts = self
            .buckets
            .iter()
            .map(|count| count.load(Ordering::Relaxed))
            .collect();
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        (OPEN_LATENCY_BOUNDS.to_vec(), counts, sum)
    }
}

/// What the relay-wide observers count.
#[derive(Debug, Default)]
pub struct Observed {
    pub handshakes: HandshakeFailures,
    pub open_latency: Histogram,
    /// Numbers public connections in the order they opened (the listing's order).
    next_connection: AtomicU64,
}

impl Observed {
    pub fn connection_number(&self) -> u64 {
        self.next_connection.fetch_add(1, Ordering::Relaxed)
    }
}

/// One open public connection, as the listing shows it.
#[derive(Debug)]
pub struct Live {
    pub peer: String,
    pub opened: Instant,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
}

/// A tunnel's open public connections, oldest first.
#[derive(Debug, Default)]
pub struct Connections {
    open: Mutex<BTreeMap<u64, Arc<Live>>>,
}

/// A listed connection, unlisted when dropped.
pub struct Listed<'a> {
    connections: &'a Connections,
    number: u64,
    pub live: Arc<Live>,
}

impl Drop for Listed<'_> {
    fn drop(&mut self) {
        lock(&self.connections.open).remove(&self.number);
    }
}

/// One connection of a listing: (client address, bytes in, bytes out, age in seconds).
pub type Listing = (String, u64, u64, f64);

impl Connections {
    /// List a connection from `peer` (its number orders the listing) until the guard drops.
    pub fn list(&self, number: u64, peer: String) -> Listed<'_> {
        let live = Arc::new(Live {
            peer,
            opened: Instant::now(),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
        });
        lock(&self.open).insert(number, live.clone());
        Listed {
            connections: self,
            number,
            live,
        }
    }

    /// How many are open, and the `limit` oldest of them.
    pub fn read(&self, limit: usize) -> (usize, Vec<Listing>) {
        let now = Instant::now();
        let open = lock(&self.open);
        let listed = open
            .values()
            .take(limit)
            .map(|live| {
                (
                    live.peer.clone(),
                    live.bytes_in.load(Ordering::Relaxed),
                    live.bytes_out.load(Ordering::Relaxed),
                    now.saturating_duration_since(live.opened).as_secs_f64(),
                )
            })
            .collect();
        (open.len(), listed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_land_in_the_first_bucket_that_holds_them() {
        let histogram = Histogram::default();
        histogram.observe(Duration::from_micros(100));
        histogram.observe(Duration::from_millis(1));
        histogram.observe(Duration::from_millis(30));
        histogram.observe(Duration::from_secs(60));
        let (bounds, counts, sum) = histogram.read();
        assert_eq!(counts.len(), bounds.len() + 1);
        assert_eq!((counts[0], counts[1], counts[6]), (1, 1, 1));
        assert_eq!(counts[bounds.len()], 1);
        assert_eq!(counts.iter().sum::<u64>(), 4);
        assert!((sum - 60.0311).abs() < 1e-9);
    }

    #[test]
    fn a_listing_is_oldest_first_bounded_and_forgets_closed_connections() {
        let connections = Connections::default();
        let first = connections.list(7, "192.0.2.1:1000".into());
        let second = connections.list(9, "192.0.2.2:2000".into());
        let third = connections.list(8, "[2001:db8::1]:3000".into());
        second.live.bytes_in.fetch_add(5, Ordering::Relaxed);
        let (open, listed) = connections.read(2);
        assert_eq!(open, 3);
        let peers: Vec<_> = listed.iter().map(|l| l.0.as_str()).collect();
        assert_eq!(peers, ["192.0.2.1:1000", "[2001:db8::1]:3000"]);
        drop(first);
        drop(third);
        let (open, listed) = connections.read(10);
        assert_eq!(
            (open, listed[0].0.as_str(), listed[0].1),
            (1, "192.0.2.2:2000", 5)
        );
        drop(second);
        assert_eq!(connections.read(10).0, 0);
    }

    #[test]
    fn handshake_errors_are_told_apart_by_their_rustls_error() {
        use std::io::{Error, ErrorKind};
        let wrapped = |e: rustls::Error| Error::new(ErrorKind::InvalidData, e);
        assert_eq!(
            HandshakeFailure::of(&wrapped(rustls::Error::NoApplicationProtocol)),
            HandshakeFailure::Alpn
        );
        assert_eq!(
            HandshakeFailure::of(&wrapped(rustls::Error::NoCertificatesPresented)),
            HandshakeFailure::ClientCertificate
        );
        let alert = rustls::Error::AlertReceived(rustls::AlertDescription::UnknownCA);
        assert_eq!(
            HandshakeFailure::of(&wrapped(alert)),
            HandshakeFailure::ClientAlert
        );
        let garbled = rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType);
        assert_eq!(
            HandshakeFailure::of(&wrapped(garbled)),
            HandshakeFailure::Protocol
        );
        assert_eq!(
            HandshakeFailure::of(&Error::from(ErrorKind::UnexpectedEof)),
            HandshakeFailure::Closed
        );
    }
}
