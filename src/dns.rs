//! Upstream name resolution, with a pure-Rust resolver (hickory).
//!
//! A statically linked binary cannot load glibc's NSS modules, so `getaddrinfo` fails
//! in an empty (distroless/scratch) image; hickory reads `/etc/resolv.conf` and
//! `/etc/hosts` itself and gives answers with their TTLs. Invariant: the address list
//! is replaced whole, never left empty by a failed refresh (the last good answer stays).

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use hickory_resolver::{
    TokioResolver,
    config::{LookupIpStrategy, ResolveHosts},
};

use crate::config::{Upstream, UpstreamHost};

/// Bounds on the time between refreshes, whatever the record's TTL says.
const MIN_REFRESH: Duration = Duration::from_secs(5);
const MAX_REFRESH: Duration = Duration::from_secs(60);

/// The upstream's addresses: fixed for an IP, re-resolved for a DNS name.
pub struct Resolver {
    pub target: Upstream,
    addrs: RwLock<Arc<[SocketAddr]>>,
    /// Built on first use: `/etc/resolv.conf` may appear after start-up.
    resolver: Mutex<Option<TokioResolver>>,
}

impl Resolver {
    pub fn new(target: Upstream) -> Resolver {
        let addrs: Arc<[SocketAddr]> = match target.host {
            UpstreamHost::Ip(ip) => Arc::new([SocketAddr::new(ip, target.port)]),
            UpstreamHost::Dns(_) => Arc::new([]),
        };
        Resolver {
            target,
            addrs: RwLock::new(addrs),
            resolver: Mutex::new(None),
        }
    }

    pub fn is_dns(&self) -> bool {
        matches!(self.target.host, UpstreamHost::Dns(_))
    }

    /// The known addresses; resolves on the spot when none is known yet.
    pub async fn addrs(&self) -> Result<Arc<[SocketAddr]>, String> {
        let known = self.known();
        if !known.is_empty() {
            return Ok(known);
        }
        self.refresh().await?;
        Ok(self.known())
    }

    /// Replaces the address list (tests inject addresses DNS cannot give here).
    #[cfg(test)]
    pub fn addrs_mut(&self) -> std::sync::RwLockWriteGuard<'_, Arc<[SocketAddr]>> {
        self.addrs.write().unwrap_or_else(|p| p.into_inner())
    }

    fn known(&self) -> Arc<[SocketAddr]> {
        match self.addrs.read() {
            Ok(a) => a.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Resolves again; returns how long the answer may be trusted (clamped).
    pub async fn refresh(&self) -> Result<Duration, String> {
        let UpstreamHost::Dns(name) = &self.target.host else {
            return Ok(MAX_REFRESH);
        };
        let resolver = self.resolver()?;
        let lookup = resolver
            .lookup_ip(name.as_str())
            .await
            .map_err(|e| e.to_string())?;
        let found: Vec<SocketAddr> = lookup
            .iter()
            .map(|ip| SocketAddr::new(ip, self.target.port))
            .collect();
        if found.is_empty() {
            return Err(format!("{name} has no A or AAAA records"));
        }
        let ttl = lookup
            .valid_until()
            .saturating_duration_since(Instant::now());
        match self.addrs.write() {
            Ok(mut a) => *a = found.into(),
            Err(p) => *p.into_inner() = found.into(),
        }
        Ok(ttl.clamp(MIN_REFRESH, MAX_REFRESH))
    }

    fn resolver(&self) -> Result<TokioResolver, String> {
        let mut slot = self.resolver.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = slot.as_ref() {
            return Ok(r.clone());
        }
        let mut builder = TokioResolver::builder_tokio()
            .map_err(|e| format!("cannot read the system DNS configuration: {e}"))?;
        let options = builder.options_mut();
        // Every address, so a failing one can be skipped; /etc/hosts honoured.
        options.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        options.use_hosts_file = ResolveHosts::Always;
        let resolver = builder.build();
        *slot = Some(resolver.clone());
        Ok(resolver)
    }
}
