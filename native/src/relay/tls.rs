//! The relay's TLS identities (rustls): one server configuration for agents
//! and one per ALPN offer for tunnels, sharing one certificate resolver.
//!
//! With the operator's certificate (a wildcard for `*.<domain>` and
//! `<domain>`), every name gets it. With the dev CA, Python mints a leaf per
//! host (with `cryptography`) and hands its PEM over with the route; the
//! leaves share one key, given once. Both TLS 1.2 and 1.3, AEAD suites only
//! (ring's defaults: AES-GCM and ChaCha20-Poly1305 with ECDHE), which is
//! Mozilla's "intermediate" profile.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, RwLock};

use rustls::crypto::ring as provider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::{CertifiedKey, SigningKey};
use rustls::{RootCertStore, ServerConfig};

/// ALPN of the agent endpoint, most wanted first (see `burrow/relay/tls.py`).
pub const AGENT_ALPNS: [&[u8]; 2] = [b"burrow/1+early", b"burrow/1"];

/// ALPN offered by tunnels opened with h2=True.
pub const H2_ALPNS: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// ALPN offered by the other tunnels.
pub const HTTP1_ALPNS: [&[u8]; 1] = [b"http/1.1"];

/// Why a certificate or key cannot be used (one line, for the operator).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadCertificate(pub String);

/// The certificate for each name.
pub struct Resolver {
    /// The operator's certificate; replaced whole by a reload (handshakes under way keep theirs).
    shared: RwLock<Option<Arc<CertifiedKey>>>,
    dev_key: Option<Arc<dyn SigningKey>>,
    hosts: RwLock<HashMap<String, Arc<CertifiedKey>>>,
}

impl fmt::Debug for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Resolver").finish_non_exhaustive()
    }
}

fn chain(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, BadCertificate> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| BadCertificate(format!("not a PEM certificate chain: {e}")))?;
    if certs.is_empty() {
        return Err(BadCertificate("no certificate in the PEM file".into()));
    }
    Ok(certs)
}

fn signing_key(pem: &[u8]) -> Result<Arc<dyn SigningKey>, BadCertificate> {
    let key = PrivateKeyDer::from_pem_slice(pem)
        .map_err(|e| BadCertificate(format!("not a PEM private key: {e}")))?;
    provider::sign::any_supported_type(&key)
        .map_err(|e| BadCertificate(format!("unusable private key: {e}")))
}

fn operator_key(chain_pem: &[u8], key_pem: &[u8]) -> Result<Arc<CertifiedKey>, BadCertificate> {
    let key = CertifiedKey::new(chain(chain_pem)?, signing_key(key_pem)?);
    key.keys_match()
        .map_err(|_| BadCertificate("the key does not match the certificate".into()))?;
    Ok(Arc::new(key))
}

impl Resolver {
    /// The operator's certificate chain and key, served for every name.
    pub fn shared(chain_pem: &[u8], key_pem: &[u8]) -> Result<Self, BadCertificate> {
        Ok(Self {
            shared: RwLock::new(Some(operator_key(chain_pem, key_pem)?)),
            dev_key: None,
            hosts: RwLock::new(HashMap::new()),
        })
    }

    /// Dev CA leaves, all signed for one key.
    pub fn per_host(key_pem: &[u8]) -> Result<Self, BadCertificate> {
        Ok(Self {
            shared: RwLock::new(None),
            dev_key: Some(signing_key(key_pem)?),
            hosts: RwLock::new(HashMap::new()),
        })
    }

    /// True when each host needs a leaf of its own.
    pub fn per_host_leaves(&self) -> bool {
        self.dev_key.is_some()
    }

    /// Serve a new operator certificate chain and key from the next handshake on (a
    /// renewal); connections already up keep theirs. A bad pair changes nothing.
    pub fn reload(&self, chain_pem: &[u8], key_pem: &[u8]) -> Result<(), BadCertificate> {
        if self.dev_key.is_some() {
            return Err(BadCertificate(
                "this relay serves dev CA leaves, not an operator certificate".into(),
            ));
        }
        let key = operator_key(chain_pem, key_pem)?;
        *self.shared.write().unwrap_or_else(|e| e.into_inner()) = Some(key);
        Ok(())
    }

    /// Serve `host` with the leaf in `cert_pem` (dev CA).
    pub fn add(&self, host: &str, cert_pem: &[u8]) -> Result<(), BadCertificate> {
        let Some(key) = &self.dev_key else {
            return Ok(()); // the operator's certificate serves every name
        };
        let leaf = Arc::new(CertifiedKey::new(chain(cert_pem)?, key.clone()));
        self.hosts
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(host.to_owned(), leaf);
        Ok(())
    }

    /// Stop serving `host`.
    pub fn forget(&self, host: &str) {
        self.hosts
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(host);
    }

    /// Leaves held (dev CA): one per routed host, plus the agent endpoint's.
    pub fn leaves(&self) -> usize {
        self.hosts.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    fn lookup(&self, host: &str) -> Option<Arc<CertifiedKey>> {
        if self.dev_key.is_none() {
            return self
                .shared
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
        }
        self.hosts
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(host)
            .cloned()
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello
            .server_name()?
            .trim_end_matches('.')
            .to_ascii_lowercase();
        self.lookup(&name)
    }
}

/// One certificate whatever the name asked for (a tunnel's loopback port).
#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// A tunnel's server configurations, one per ALPN answer.
pub struct TunnelConfigs {
    /// ALPN `http/1.1` (and `h2` first with h2=True) ...
    http1: Arc<ServerConfig>,
    h2: Arc<ServerConfig>,
    /// ... and none to a client whose offer names neither (rustls would refuse it, while a
    /// tunnel may carry any protocol over TLS: PostgreSQL's direct TLS asks for "postgresql").
    any: Arc<ServerConfig>,
}

impl TunnelConfigs {
    fn new(
        resolver: Arc<dyn ResolvesServerCert>,
        clients: Option<Arc<dyn ClientCertVerifier>>,
    ) -> Result<Self, BadCertificate> {
        Ok(Self {
            http1: config(resolver.clone(), &HTTP1_ALPNS, clients.clone())?,
            h2: config(resolver.clone(), &H2_ALPNS, clients.clone())?,
            any: config(resolver, &[], clients)?,
        })
    }

    /// The configuration for a tunnel's client, by what its ClientHello offers.
    pub fn for_alpn(&self, h2: bool, offered: Option<Vec<&[u8]>>) -> Arc<ServerConfig> {
        let ours: &[&[u8]] = if h2 { &H2_ALPNS } else { &HTTP1_ALPNS };
        let speaks = offered.is_some_and(|offer| offer.iter().any(|p| ours.contains(p)));
        match (speaks, h2) {
            (false, _) => self.any.clone(),
            (true, true) => self.h2.clone(),
            (true, false) => self.http1.clone(),
        }
    }
}

/// The server configurations of the TLS port (and of tunnels' loopback ports).
pub struct Identities {
    pub resolver: Arc<Resolver>,
    pub agent: Arc<ServerConfig>,
    /// Tunnels reached by name on the TLS port.
    pub tunnels: TunnelConfigs,
    /// Tunnels' own loopback ports (dev relays that give `https://localhost:PORT`).
    pub loopback: Option<TunnelConfigs>,
    loopback_resolver: Option<Arc<dyn ResolvesServerCert>>,
}

/// A tunnel's configurations when its owner requires client certificates (mutual TLS).
pub struct ClientAuth {
    pub tunnels: TunnelConfigs,
    pub loopback: Option<TunnelConfigs>,
}

impl fmt::Debug for ClientAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientAuth").finish_non_exhaustive()
    }
}

/// Most CA certificates a tunnel's client-certificate roots may hold.
pub const MAX_CLIENT_CAS: usize = 16;

fn config(
    resolver: Arc<dyn ResolvesServerCert>,
    alpn: &[&[u8]],
    clients: Option<Arc<dyn ClientCertVerifier>>,
) -> Result<Arc<ServerConfig>, BadCertificate> {
    let builder = ServerConfig::builder_with_provider(Arc::new(provider::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| BadCertificate(e.to_string()))?;
    let builder = match clients {
        Some(verifier) => builder.with_client_cert_verifier(verifier),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(resolver);
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

impl Identities {
    /// With `loopback_leaf` (dev CA), tunnels may also get loopback ports serving that leaf.
    pub fn new(resolver: Resolver, loopback_leaf: Option<&[u8]>) -> Result<Self, BadCertificate> {
        let resolver = Arc::new(resolver);
        let loopback_resolver: Option<Arc<dyn ResolvesServerCert>> =
            match (loopback_leaf, &resolver.dev_key) {
                (Some(leaf), Some(key)) => Some(Arc::new(Fixed(Arc::new(CertifiedKey::new(
                    chain(leaf)?,
                    key.clone(),
                ))))),
                _ => None,
            };
        let loopback = match &loopback_resolver {
            Some(fixed) => Some(TunnelConfigs::new(fixed.clone(), None)?),
            None => None,
        };
        Ok(Self {
            agent: config(resolver.clone(), &AGENT_ALPNS, None)?,
            tunnels: TunnelConfigs::new(resolver.clone(), None)?,
            loopback,
            loopback_resolver,
            resolver,
        })
    }

    /// A tunnel's configurations that require a client certificate issued by one of `cas`
    /// (PEM); the tunnel's own certificates as for any tunnel.
    pub fn client_auth(&self, cas: &[u8]) -> Result<ClientAuth, BadCertificate> {
        let mut roots = RootCertStore::empty();
        let certificates = chain(cas)?;
        if certificates.len() > MAX_CLIENT_CAS {
            return Err(BadCertificate(format!(
                "{} CA certificates; at most {MAX_CLIENT_CAS}",
                certificates.len()
            )));
        }
        for certificate in certificates {
            roots
                .add(certificate)
                .map_err(|e| BadCertificate(format!("not a CA certificate: {e}")))?;
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(provider::default_provider()),
        )
        .build()
        .map_err(|e| BadCertificate(format!("cannot verify clients with it: {e}")))?;
        let loopback = match &self.loopback_resolver {
            Some(fixed) => Some(TunnelConfigs::new(fixed.clone(), Some(verifier.clone()))?),
            None => None,
        };
        Ok(ClientAuth {
            tunnels: TunnelConfigs::new(self.resolver.clone(), Some(verifier))?,
            loopback,
        })
    }
}
