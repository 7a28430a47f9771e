//! File descriptors: the soft `RLIMIT_NOFILE` raised to the hard limit at start, and
//! the connection limit fitted under it.
//!
//! A common soft limit is 1024, which runs out near 500 connections; the hard limit is
//! what the operator (or the container runtime) actually allows. Invariant: the
//! connection limit the accept loop enforces leaves `RESERVED` descriptors free, so
//! runnel stops accepting before it runs out instead of failing accepts and dials.

use std::io;

use crate::config::{AlpnPolicy, Config};

/// Descriptors one connection holds: the downstream socket and the upstream one.
pub const PER_CONNECTION: u64 = 2;
/// Descriptors kept free of connections: stdio, the runtime's epoll and wake-ups, both
/// listeners, `/metrics` scrapes, DNS sockets, a Happy Eyeballs race's extra attempts,
/// files read at a reload, the key log.
pub const RESERVED: u64 = 64;

/// The descriptor limit before and after start-up raised it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptors {
    /// The soft limit runnel was started with.
    pub before: u64,
    /// The soft limit now: the hard limit unless raising it failed.
    pub limit: u64,
}

/// How many connections fit in a descriptor limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fit {
    /// Descriptors `RUNNEL_MAX_CONNECTIONS` connections would need, pools and reserve included.
    pub needed: u64,
    /// Connections that fit (at least one): the configured limit, or fewer.
    pub connections: usize,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit. A refusal (a sandbox that does
/// not allow it) leaves the limit as it was; `Fit` then works with that.
pub fn raise_nofile() -> io::Result<Descriptors> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    // `None` is RLIM_INFINITY; no kernel allows that many descriptors, so any finite
    // stand-in far above the need does.
    let finite = |v: Option<u64>| v.unwrap_or(u64::MAX);
    let now = getrlimit(Resource::Nofile);
    let before = finite(now.current);
    if now.current == now.maximum {
        return Ok(Descriptors {
            before,
            limit: before,
        });
    }
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: now.maximum,
            maximum: now.maximum,
        },
    )?;
    Ok(Descriptors {
        before,
        limit: finite(getrlimit(Resource::Nofile).current),
    })
}

/// The soft `RLIMIT_NOFILE` as it is.
pub fn soft_nofile() -> u64 {
    rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(u64::MAX)
}

/// Descriptors the pools may hold at most: one pool per ALPN offer in use.
pub fn pooled(config: &Config) -> u64 {
    let offers = match config.alpn {
        AlpnPolicy::Auto => 2,
        AlpnPolicy::None | AlpnPolicy::List(_) => 1,
    };
    config.pool.max as u64 * offers
}

/// Fits `max_connections` into `limit` descriptors, with `pooled` held by the pools.
pub fn fit(max_connections: usize, pooled: u64, limit: u64) -> Fit {
    let fixed = RESERVED + pooled;
    let needed = (max_connections as u64)
        .saturating_mul(PER_CONNECTION)
        .saturating_add(fixed);
    let room = limit.saturating_sub(fixed) / PER_CONNECTION;
    let connections = usize::try_from(room)
        .unwrap_or(usize::MAX)
        .clamp(1, max_connections.max(1));
    Fit {
        needed,
        connections,
    }
}

pub use crate::error::is_local_exhaustion;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limit_with_room_keeps_the_configured_connections() {
        let f = fit(10_000, 64, 1_048_576);
        assert_eq!(f.connections, 10_000);
        assert_eq!(f.needed, 20_000 + 64 + RESERVED);
    }

    #[test]
    fn a_tight_limit_caps_connections_below_it() {
        // 1024 - 64 reserved - 64 pooled = 896 descriptors: 448 connections.
        let f = fit(10_000, 64, 1024);
        assert_eq!(f.connections, 448);
        assert!(f.connections as u64 * PER_CONNECTION + RESERVED + 64 <= 1024);
        // Below the reserve, one connection still fits (and the warning says why).
        assert_eq!(fit(10_000, 64, 48).connections, 1);
    }

    #[test]
    fn exhaustion_is_told_apart_from_a_refusal() {
        let emfile = io::Error::from_raw_os_error(rustix::io::Errno::MFILE.raw_os_error());
        assert!(is_local_exhaustion(&emfile));
        assert!(!is_local_exhaustion(
            &io::ErrorKind::ConnectionRefused.into()
        ));
        let refused = io::Error::from_raw_os_error(rustix::io::Errno::CONNREFUSED.raw_os_error());
        assert!(!is_local_exhaustion(&refused));
    }
}
