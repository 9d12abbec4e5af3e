//! What a tunnel's owner says about its public connections: the networks
//! clients may come from, and the PROXY protocol header that tells the
//! service who a client is (haproxy's proxy-protocol.txt, versions 1 and 2).

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

/// Public connections open at once across a tenant's tunnels, and the cap on them.
#[derive(Debug)]
pub struct Quota {
    open: AtomicI64,
    max: AtomicI64,
}

impl Quota {
    pub fn new(max: i64) -> Self {
        Self {
            open: AtomicI64::new(0),
            max: AtomicI64::new(max),
        }
    }

    pub fn set_max(&self, max: i64) {
        self.max.store(max, Ordering::Relaxed);
    }

    pub fn open(&self) -> i64 {
        self.open.load(Ordering::Relaxed)
    }

    /// One more connection, held until the guard drops; None at the cap.
    pub fn take(self: &Arc<Self>) -> Option<QuotaHeld> {
        let max = self.max.load(Ordering::Relaxed);
        let before = self.open.fetch_add(1, Ordering::AcqRel);
        if before >= max {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(QuotaHeld(self.clone()))
    }
}

/// A connection counted against a [`Quota`]; dropping it gives the place back.
pub struct QuotaHeld(Arc<Quota>);

impl Drop for QuotaHeld {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A network, `address/prefix`, as the control plane normalised it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Network {
    address: IpAddr,
    prefix: u8,
}

impl Network {
    /// Parse `203.0.113.0/24` or `2001:db8::/32`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = || format!("{text:?} is not an IP network (address/prefix)");
        let (address, prefix) = text.split_once('/').ok_or_else(bad)?;
        let address: IpAddr = address.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        let bits = if address.is_ipv4() { 32 } else { 128 };
        if prefix > bits {
            return Err(bad());
        }
        Ok(Self { address, prefix })
    }

    /// True when `ip` is in this network (an IPv4-mapped IPv6 address counts as its IPv4 one).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.address, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                prefix_match(&net.octets(), &ip.octets(), self.prefix)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                prefix_match(&net.octets(), &ip.octets(), self.prefix)
            }
            _ => false,
        }
    }
}

fn prefix_match(net: &[u8], ip: &[u8], prefix: u8) -> bool {
    let whole = usize::from(prefix / 8);
    if net[..whole] != ip[..whole] {
        return false;
    }
    let rest = prefix % 8;
    rest == 0 || {
        let mask = 0xffu8 << (8 - rest);
        net[whole] & mask == ip[whole] & mask
    }
}

/// True when `allow` is empty (anyone) or one of its networks holds `ip`.
pub fn allowed(allow: &[Network], ip: IpAddr) -> bool {
    allow.is_empty() || allow.iter().any(|network| network.contains(ip))
}

/// The v2 header's fixed start: a signature no text protocol begins with.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Version 2, command PROXY (the connection was relayed for a client).
const V2_PROXY: u8 = 0x21;
/// Address family and transport: TCP over IPv4, TCP over IPv6.
const V2_TCP4: u8 = 0x11;
const V2_TCP6: u8 = 0x21;

/// The PROXY protocol header (version 1 or 2) for a connection from `client` to `relay`.
pub fn proxy_header(version: u8, client: SocketAddr, relay: SocketAddr) -> Vec<u8> {
    let (client_ip, relay_ip) = (client.ip().to_canonical(), relay.ip().to_canonical());
    // both ends in one family: IPv4 ones become IPv4-mapped IPv6 when the other end is IPv6
    let (source, destination) = match (client_ip, relay_ip) {
        (IpAddr::V4(a), IpAddr::V4(b)) => (IpAddr::V4(a), IpAddr::V4(b)),
        (a, b) => (IpAddr::V6(v6(a)), IpAddr::V6(v6(b))),
    };
    let (source_port, destination_port) = (client.port(), relay.port());
    if version == 1 {
        let family = if source.is_ipv4() { "TCP4" } else { "TCP6" };
        return format!(
            "PROXY {family} {source} {destination} {source_port} {destination_port}\r\n"
        )
        .into_bytes();
    }
    let mut header = V2_SIGNATURE.to_vec();
    header.push(V2_PROXY);
    let addresses: Vec<u8> = match (source, destination) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            header.push(V2_TCP4);
            [a.octets(), b.octets()].concat()
        }
        (a, b) => {
            header.push(V2_TCP6);
            [v6(a).octets(), v6(b).octets()].concat()
        }
    };
    let length = (addresses.len() + 4) as u16; // (12 or 36: fits)
    header.extend_from_slice(&length.to_be_bytes());
    header.extend_from_slice(&addresses);
    header.extend_from_slice(&source_port.to_be_bytes());
    header.extend_from_slice(&destination_port.to_be_bytes());
    header
}

fn v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn networks_hold_what_their_prefix_says() {
        let net = Network::parse("203.0.113.0/25").unwrap();
        assert!(net.contains(ip("203.0.113.0")) && net.contains(ip("203.0.113.127")));
        assert!(!net.contains(ip("203.0.113.128")) && !net.contains(ip("203.0.112.1")));
        assert!(net.contains(ip("::ffff:203.0.113.5"))); // a dual-stack socket's view of IPv4
        assert!(!net.contains(ip("2001:db8::1")));
        let v6 = Network::parse("2001:db8::/33").unwrap();
        assert!(v6.contains(ip("2001:db8:7fff::1")) && !v6.contains(ip("2001:db8:8000::1")));
        assert!(Network::parse("0.0.0.0/0")
            .unwrap()
            .contains(ip("198.51.100.1")));
        assert!(Network::parse("198.51.100.7/32")
            .unwrap()
            .contains(ip("198.51.100.7")));
        assert!(!Network::parse("198.51.100.7/32")
            .unwrap()
            .contains(ip("198.51.100.6")));
        for bad in [
            "10.0.0.0",
            "10.0.0.0/33",
            "::/129",
            "x/8",
            "10.0.0.0/-1",
            "10.0.0.0/8/8",
        ] {
            assert!(Network::parse(bad).is_err(), "{bad}");
        }
        assert!(allowed(&[], ip("192.0.2.1")));
    }

    #[test]
    fn a_quota_holds_its_cap_and_gives_places_back() {
        let quota = Arc::new(Quota::new(2));
        let first = quota.take().unwrap();
        let _second = quota.take().unwrap();
        assert!(quota.take().is_none());
        assert_eq!(quota.open(), 2);
        drop(first);
        assert!(quota.take().is_some()); // (and given back at once: the temporary drops)
        assert_eq!(quota.open(), 1);
        quota.set_max(1);
        assert!(quota.take().is_none());
    }

    #[test]
    fn proxy_headers_match_the_specification() {
        let client: SocketAddr = "192.0.2.10:51234".parse().unwrap();
        let relay: SocketAddr = "198.51.100.1:443".parse().unwrap();
        assert_eq!(
            proxy_header(1, client, relay),
            b"PROXY TCP4 192.0.2.10 198.51.100.1 51234 443\r\n"
        );
        let v2 = proxy_header(2, client, relay);
        assert_eq!(&v2[..12], b"\r\n\r\n\0\r\nQUIT\n");
        assert_eq!(&v2[12..16], &[0x21, 0x11, 0, 12]);
        assert_eq!(&v2[16..24], &[192, 0, 2, 10, 198, 51, 100, 1]);
        assert_eq!(&v2[24..], &[0xc8, 0x22, 0x01, 0xbb]);
        // a mapped IPv4 client on an IPv6 socket is reported as IPv4
        let mapped: SocketAddr = "[::ffff:192.0.2.10]:51234".parse().unwrap();
        let relay4: SocketAddr = "[::ffff:198.51.100.1]:443".parse().unwrap();
        assert_eq!(
            proxy_header(1, mapped, relay4),
            proxy_header(1, client, relay)
        );
        let client6: SocketAddr = "[2001:db8::5]:4000".parse().unwrap();
        let relay6: SocketAddr = "[2001:db8::1]:443".parse().unwrap();
        assert_eq!(
            proxy_header(1, client6, relay6),
            b"PROXY TCP6 2001:db8::5 2001:db8::1 4000 443\r\n"
        );
        let v2 = proxy_header(2, client6, relay6);
        assert_eq!(&v2[12..16], &[0x21, 0x21, 0, 36]);
        assert_eq!(v2.len(), 16 + 36);
    }
}
