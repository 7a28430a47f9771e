//! Configuration: the only reader of the environment.
//!
//! `VARS` is the single table of variables (name, default, help); it feeds the parser,
//! `runnel --help` and the README test. Parsing turns strings into types once, so a
//! `Config` cannot hold an invalid value. Invariant: nothing else in the crate calls
//! `std::env`.
//!
//! Configuration is the bottom of the crate's layers: it parses and checks, and
//! imports only `error` and `material` (TLS material is loaded at parse time, so a
//! bad key stops start-up), never the runtime modules built from a `Config`.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    num::NonZeroUsize,
    time::Duration,
};

use rustls::pki_types::ServerName;

use crate::{
    error::ConfigError,
    material::{Material, Source, Sources},
};

/// One environment variable runnel reads.
pub struct Var {
    pub name: &'static str,
    pub default: &'static str,
    pub help: &'static str,
}

/// Every variable runnel reads, in the order `--help` and the README list them.
pub const VARS: &[Var] = &[
    Var {
        name: "PORT",
        default: "8080",
        help: "Cloud Run's port; used when RUNNEL_LISTEN is unset",
    },
    Var {
        name: "RUNNEL_LISTEN",
        default: "0.0.0.0:$PORT",
        help: "downstream listen address (IPv6 [::]:p accepted)",
    },
    Var {
        name: "RUNNEL_UPSTREAM",
        default: "(required)",
        help: "host:port of the internal load balancer / gateway; host is a DNS name or an IP",
    },
    Var {
        name: "RUNNEL_SERVER_NAME",
        default: "host of RUNNEL_UPSTREAM if a DNS name",
        help: "SNI sent and name verified in the gateway certificate; required when the upstream is an IP",
    },
    Var {
        name: "RUNNEL_TLS_CA_FILE",
        default: "(one of _FILE/_PEM required)",
        help: "trust anchors for the gateway certificate (only these), PEM file",
    },
    Var {
        name: "RUNNEL_TLS_CA_PEM",
        default: "",
        help: "the same, PEM text",
    },
    Var {
        name: "RUNNEL_TLS_CERT_FILE",
        default: "(one of _FILE/_PEM required)",
        help: "client certificate chain, PEM file",
    },
    Var {
        name: "RUNNEL_TLS_CERT_PEM",
        default: "",
        help: "the same, PEM text",
    },
    Var {
        name: "RUNNEL_TLS_KEY_FILE",
        default: "(one of _FILE/_PEM required)",
        help: "client private key (PKCS#8, SEC1 or PKCS#1), PEM file",
    },
    Var {
        name: "RUNNEL_TLS_KEY_PEM",
        default: "",
        help: "the same, PEM text",
    },
    Var {
        name: "RUNNEL_TLS_MIN_VERSION",
        default: "1.2",
        help: "lowest TLS version offered: 1.2 or 1.3",
    },
    Var {
        name: "RUNNEL_ALPN",
        default: "auto",
        help: "auto (h2 for an h2c preface, else http/1.1), none, or a comma list sent as is",
    },
    Var {
        name: "RUNNEL_CONNECT_TIMEOUT",
        default: "5s",
        help: "TCP connect + TLS handshake, one deadline",
    },
    Var {
        name: "RUNNEL_IDLE_TIMEOUT",
        default: "1h",
        help: "no bytes either way for this long closes the pair; 0 = off",
    },
    Var {
        name: "RUNNEL_DRAIN_TIMEOUT",
        default: "8s",
        help: "after SIGTERM, how long open connections may finish",
    },
    Var {
        name: "RUNNEL_POOL_MIN",
        default: "2",
        help: "pre-handshaken idle upstream connections kept per ALPN offer, at least",
    },
    Var {
        name: "RUNNEL_POOL_MAX",
        default: "32",
        help: "at most (the pool grows with the rate of new connections); 0 = no pool",
    },
    Var {
        name: "RUNNEL_POOL_MAX_IDLE",
        default: "2m",
        help: "pooled connections are replaced before this age",
    },
    Var {
        name: "RUNNEL_MAX_CONNECTIONS",
        default: "derived from the memory limit",
        help: "downstream connections at once; more wait in the backlog. Default: (memory limit - 64 MiB) / 300 KiB, the worst case per connection, at most 10000; lowered further to fit the file descriptor limit",
    },
    Var {
        name: "RUNNEL_METRICS_ADDR",
        default: "0.0.0.0:9090",
        help: "Prometheus /metrics address, or off; must not be the listen port",
    },
    Var {
        name: "RUNNEL_LOG",
        default: "info",
        help: "log filter (tracing EnvFilter syntax)",
    },
    Var {
        name: "RUNNEL_LOG_FORMAT",
        default: "json",
        help: "json (Cloud Logging) or text",
    },
    Var {
        name: "RUNNEL_ACCESS_LOG",
        default: "off",
        help: "on: one JSON line per closed connection",
    },
    Var {
        name: "RUNNEL_TLS_RELOAD_INTERVAL",
        default: "30s",
        help: "how often CA, certificate and key files are checked for changes (SIGHUP: now); 0 = never",
    },
    Var {
        name: "RUNNEL_CERT_MIN_VALIDITY",
        default: "24h",
        help: "/readyz fails when the client certificate expires within this",
    },
    Var {
        name: "SSLKEYLOGFILE",
        default: "",
        help: "debugging only: append TLS secrets to this file (NSS key log format); a warning at start-up",
    },
    Var {
        name: "RUNNEL_WORKERS",
        default: "CPUs available (cgroup aware)",
        help: "runtime worker threads",
    },
];

/// A fully parsed and checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub upstream: Upstream,
    pub server_name: ServerName<'static>,
    pub tls: Material,
    /// Where the material came from, for reloads.
    pub tls_sources: Sources,
    /// `None` when reloading is off.
    pub tls_reload_interval: Option<Duration>,
    pub cert_min_validity: Duration,
    pub access_log: bool,
    /// `SSLKEYLOGFILE`: where to write TLS secrets for debugging; `None` normally.
    pub key_log: Option<std::path::PathBuf>,
    pub min_version: TlsMinVersion,
    pub alpn: AlpnPolicy,
    pub connect_timeout: Duration,
    /// `None` when the idle timeout is off.
    pub idle_timeout: Option<Duration>,
    pub drain_timeout: Duration,
    pub max_connections: usize,
    pub pool: PoolConfig,
    /// `None` when metrics are off.
    pub metrics_addr: Option<SocketAddr>,
    pub log_filter: String,
    pub log_format: LogFormat,
    pub workers: usize,
}

/// The upstream as configured: a DNS name or an IP, and a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    pub host: UpstreamHost,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamHost {
    Dns(String),
    Ip(IpAddr),
}

impl std::fmt::Display for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.host {
            UpstreamHost::Dns(name) => write!(f, "{name}:{}", self.port),
            UpstreamHost::Ip(ip) => write!(f, "{}", SocketAddr::new(*ip, self.port)),
        }
    }
}

/// Sizing of the pools of pre-handshaken upstream connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolConfig {
    pub min: usize,
    /// 0 disables pooling.
    pub max: usize,
    pub max_idle: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMinVersion {
    Tls12,
    Tls13,
}

/// What runnel offers in ALPN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AlpnPolicy {
    /// Peek at the first downstream bytes: the h2c preface means `h2`, anything else `http/1.1`.
    Auto,
    /// Offer no ALPN.
    None,
    /// Offer exactly this list, in order.
    List(Vec<Vec<u8>>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
}

/// Warnings found while parsing, logged once logging is up.
pub type Warnings = Vec<String>;

impl Config {
    /// Reads the process environment. The only call to `std::env` in the crate.
    pub fn from_env() -> Result<(Config, Warnings), ConfigError> {
        let mut vars = Vec::new();
        for (name, value) in std::env::vars_os() {
            let Some(name) = name.to_str().map(str::to_owned) else {
                continue;
            };
            if !is_ours(&name) {
                continue;
            }
            let value = value
                .into_string()
                .map_err(|_| ConfigError::new(name.clone(), "value is not valid UTF-8"))?;
            vars.push((name, value));
        }
        Self::from_vars(vars)
    }

    /// Parses a configuration from name/value pairs (tests inject these).
    pub fn from_vars<I, K, V>(vars: I) -> Result<(Config, Warnings), ConfigError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        let env = Env::new(vars)?;
        let mut warnings = Vec::new();
        let port: u16 = env.parse_or("PORT", 8080, parse_port)?;
        let listen = env.parse_or(
            "RUNNEL_LISTEN",
            SocketAddr::from(([0, 0, 0, 0], port)),
            parse_addr,
        )?;
        let upstream = env.required("RUNNEL_UPSTREAM", parse_upstream)?;
        let server_name = match env.get("RUNNEL_SERVER_NAME")? {
            Some(s) => ServerName::try_from(s.to_owned()).map_err(|_| {
                ConfigError::new(
                    "RUNNEL_SERVER_NAME",
                    format!("{s:?} is not a valid DNS name or IP address"),
                )
            })?,
            None => default_server_name(&upstream)?,
        };
        let tls_sources = env.tls_sources()?;
        let tls = Material::load(&tls_sources, &mut warnings)?;
        let reload = env.parse_or(
            "RUNNEL_TLS_RELOAD_INTERVAL",
            Duration::from_secs(30),
            parse_duration,
        )?;
        let cert_min_validity = env.parse_or(
            "RUNNEL_CERT_MIN_VALIDITY",
            Duration::from_secs(86_400),
            parse_duration,
        )?;
        let access_log = env.parse_or("RUNNEL_ACCESS_LOG", false, |s| match s {
            "on" => Ok(true),
            "off" => Ok(false),
            _ => Err("must be on or off".into()),
        })?;
        let min_version = env.parse_or(
            "RUNNEL_TLS_MIN_VERSION",
            TlsMinVersion::Tls12,
            |s| match s {
                "1.2" => Ok(TlsMinVersion::Tls12),
                "1.3" => Ok(TlsMinVersion::Tls13),
                _ => Err("must be 1.2 or 1.3".into()),
            },
        )?;
        let alpn = env.parse_or("RUNNEL_ALPN", AlpnPolicy::Auto, parse_alpn)?;
        let connect_timeout = env.parse_or(
            "RUNNEL_CONNECT_TIMEOUT",
            Duration::from_secs(5),
            parse_positive_duration,
        )?;
        let idle = env.parse_or(
            "RUNNEL_IDLE_TIMEOUT",
            Duration::from_secs(3600),
            parse_duration,
        )?;
        let drain_timeout = env.parse_or(
            "RUNNEL_DRAIN_TIMEOUT",
            Duration::from_secs(8),
            parse_duration,
        )?;
        let max_connections = env.parse_or(
            "RUNNEL_MAX_CONNECTIONS",
            default_max_connections(memory_limit()),
            |s| parse_count(s, 1_000_000),
        )?;
        let pool = parse_pool(&env)?;
        let metrics_addr = env.parse_or(
            "RUNNEL_METRICS_ADDR",
            Some(SocketAddr::from(([0, 0, 0, 0], 9090))),
            |s| {
                if s == "off" {
                    Ok(None)
                } else {
                    parse_addr(s).map(Some)
                }
            },
        )?;
        if let Some(m) = metrics_addr {
            if m.port() != 0 && m.port() == listen.port() {
                return Err(ConfigError::new(
                    "RUNNEL_METRICS_ADDR",
                    format!(
                        "port {} is the listen port; a Prometheus scrape there would be tunnelled to the gateway",
                        m.port()
                    ),
                ));
            }
        }
        let log_filter = env.parse_or("RUNNEL_LOG", "info".to_owned(), |s| {
            parse_filter(s)
                .map(|_| s.to_owned())
                .map_err(|e| format!("invalid filter: {e}"))
        })?;
        let log_format = env.parse_or("RUNNEL_LOG_FORMAT", LogFormat::Json, |s| match s {
            "json" => Ok(LogFormat::Json),
            "text" => Ok(LogFormat::Text),
            _ => Err("must be json or text".into()),
        })?;
        let cpus = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
        let workers = env.parse_or("RUNNEL_WORKERS", cpus, |s| parse_count(s, 1024))?;
        if let Some(path) = env.get("SSLKEYLOGFILE")? {
            warnings.push(format!("SSLKEYLOGFILE: TLS secrets are written to {path}: anyone who reads it can decrypt the upstream traffic; unset it outside debugging"));
        }
        let config = Config {
            listen,
            upstream,
            server_name,
            tls,
            min_version,
            alpn,
            connect_timeout,
            idle_timeout: (!idle.is_zero()).then_some(idle),
            drain_timeout,
            max_connections,
            pool,
            metrics_addr,
            log_filter,
            log_format,
            workers,
            tls_sources,
            tls_reload_interval: (!reload.is_zero()).then_some(reload),
            cert_min_validity,
            access_log,
            key_log: env.get("SSLKEYLOGFILE")?.map(std::path::PathBuf::from),
        };
        Ok((config, warnings))
    }
}

/// Worst-case bytes one connection holds with the readers on both sides stalled and
/// both writers pushing (README, "Memory"): towards the gateway, the copy's unwritten
/// rest of one read (64 KiB) and rustls's sendable TLS (its 64 KiB limit, plus record
/// overhead); towards the downstream, the copy's unwritten rest (64 KiB), the
/// read-ahead gulp (64 KiB), rustls's record buffer (one record, ~17 KiB) and
/// decrypted plaintext (16 KiB); plus the task, the TLS state and allocator slack.
pub const CONNECTION_WORST_CASE: u64 = 300 * 1024;
/// Memory kept free of connections for the runtime, the TLS configurations, the pools,
/// the log queue and the allocator's own overhead.
pub const MEMORY_BASE: u64 = 64 * 1024 * 1024;
/// The connection limit's default where memory does not bound it.
pub const MAX_CONNECTIONS_CEILING: usize = 10_000;

/// `RUNNEL_MAX_CONNECTIONS`'s default: as many worst-case connections as fit in the
/// memory limit after `MEMORY_BASE`, at least one, at most `MAX_CONNECTIONS_CEILING`.
pub fn default_max_connections(memory_limit: Option<u64>) -> usize {
    let Some(limit) = memory_limit else {
        return MAX_CONNECTIONS_CEILING;
    };
    let fit = limit.saturating_sub(MEMORY_BASE) / CONNECTION_WORST_CASE;
    usize::try_from(fit)
        .unwrap_or(usize::MAX)
        .clamp(1, MAX_CONNECTIONS_CEILING)
}

/// The memory this process may use: the tightest of its cgroup's limits (v2, or v1)
/// and the memory the machine (or gVisor sandbox) reports; `None` if nothing says.
/// Read here, like the CPU count, because a default is derived from it.
pub fn memory_limit() -> Option<u64> {
    let read = |path: &str| std::fs::read_to_string(path).ok();
    let cgroup = read("/proc/self/cgroup").unwrap_or_default();
    let mut files = Vec::new();
    for line in cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = match (parts.next(), parts.next(), parts.next()) {
            (Some(id), Some(c), Some(p)) => (id, c, p.trim_end_matches('/')),
            _ => continue,
        };
        if controllers.is_empty() {
            // v2: a limit anywhere up the tree applies.
            let mut dir = path.to_owned();
            loop {
                files.push(format!("/sys/fs/cgroup{dir}/memory.max"));
                match dir.rfind('/') {
                    Some(i) => dir.truncate(i),
                    None => break,
                }
            }
        } else if controllers.split(',').any(|c| c == "memory") {
            files.push(format!("/sys/fs/cgroup/memory{path}/memory.limit_in_bytes"));
        }
    }
    files.push("/sys/fs/cgroup/memory.max".into());
    files.push("/sys/fs/cgroup/memory/memory.limit_in_bytes".into());
    let cgroup_limit = files
        .iter()
        .filter_map(|f| parse_memory_max(&read(f)?))
        .min();
    let total = read("/proc/meminfo").and_then(|m| parse_mem_total(&m));
    cgroup_limit.into_iter().chain(total).min()
}

/// A cgroup memory limit file: bytes, or `max` (v2) / a page-rounded 2^63 (v1) for none.
fn parse_memory_max(text: &str) -> Option<u64> {
    text.trim().parse::<u64>().ok().filter(|&n| n < 1 << 60)
}

/// `MemTotal` from `/proc/meminfo`, in bytes.
fn parse_mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Renders the variable table for `runnel --help`.
pub fn help_table() -> String {
    let width = VARS.iter().map(|v| v.name.len()).max().unwrap_or(0);
    let mut out = String::from("Environment variables:\n");
    for v in VARS {
        let default = if v.default.is_empty() {
            String::new()
        } else {
            format!(" [default: {}]", v.default)
        };
        out.push_str(&format!("  {:width$}  {}{}\n", v.name, v.help, default));
    }
    out
}

/// Parses a `RUNNEL_LOG` filter. Field values match literally, not as regular
/// expressions: a pattern like `[{a=.*a.........}]` would otherwise compile to an
/// automaton that takes seconds and gigabytes at start-up.
pub fn parse_filter(
    filter: &str,
) -> Result<tracing_subscriber::EnvFilter, tracing_subscriber::filter::ParseError> {
    tracing_subscriber::EnvFilter::builder()
        .with_regex(false)
        .parse(filter)
}

/// Parses a duration such as `250ms`, `5s`, `2m` or `1h` (`0` alone is zero).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (use 250ms, 5s, 2m, 1h)"))?;
    let millis = match unit {
        "ms" => Some(n),
        "s" => n.checked_mul(1000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        _ => return Err(format!("{s:?} is not a duration (use 250ms, 5s, 2m, 1h)")),
    };
    millis
        .filter(|&ms| ms <= 365 * 24 * 3_600_000)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("{s:?} is too long (at most a year)"))
}

fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d.is_zero() => Err("must be greater than zero".into()),
        d => Ok(d),
    }
}

fn parse_pool(env: &Env) -> Result<PoolConfig, ConfigError> {
    let count = |s: &str| {
        s.parse::<usize>()
            .ok()
            .filter(|n| *n <= 1024)
            .ok_or_else(|| format!("{s:?} is not a whole number from 0 to 1024"))
    };
    let min = env.parse_or("RUNNEL_POOL_MIN", 2, count)?;
    let max = env.parse_or("RUNNEL_POOL_MAX", 32.max(min), count)?;
    // An unset minimum follows a smaller maximum: RUNNEL_POOL_MAX=0 alone turns the
    // pool off; only a minimum the user set can conflict with the maximum.
    let min = match env.get("RUNNEL_POOL_MIN")? {
        None => min.min(max),
        Some(_) => min,
    };
    if min > max {
        return Err(ConfigError::new(
            "RUNNEL_POOL_MIN",
            format!("{min} is above RUNNEL_POOL_MAX ({max})"),
        ));
    }
    let max_idle = env.parse_or(
        "RUNNEL_POOL_MAX_IDLE",
        Duration::from_secs(120),
        parse_positive_duration,
    )?;
    Ok(PoolConfig { min, max, max_idle })
}

fn parse_port(s: &str) -> Result<u16, String> {
    s.parse::<u16>()
        .map_err(|_| format!("{s:?} is not a port number (0-65535)"))
}

fn parse_count(s: &str, max: usize) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(format!("{s:?} is not a whole number from 1 to {max}")),
    }
}

fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse()
        .map_err(|_| format!("{s:?} is not an address like 0.0.0.0:8080 or [::]:8080"))
}

fn parse_upstream(s: &str) -> Result<Upstream, String> {
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return match addr.port() {
            0 => Err("port must not be 0".into()),
            port => Ok(Upstream {
                host: UpstreamHost::Ip(addr.ip()),
                port,
            }),
        };
    }
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?} is not host:port"))?;
    let port = match host.contains(':') {
        true => return Err(format!("{s:?}: write an IPv6 upstream as [addr]:port")),
        false => port
            .parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| format!("{port:?} is not a port (1-65535)"))?,
    };
    match ServerName::try_from(host) {
        Ok(ServerName::DnsName(_)) => Ok(Upstream {
            host: UpstreamHost::Dns(host.to_ascii_lowercase()),
            port,
        }),
        Ok(ServerName::IpAddress(ip)) => Ok(Upstream {
            host: UpstreamHost::Ip(IpAddr::from(ip)),
            port,
        }),
        _ => Err(format!("{host:?} is not a valid DNS name or IP address")),
    }
}

fn parse_alpn(s: &str) -> Result<AlpnPolicy, String> {
    match s {
        "auto" => return Ok(AlpnPolicy::Auto),
        "none" => return Ok(AlpnPolicy::None),
        _ => {}
    }
    let mut list = Vec::new();
    for proto in s.split(',').map(str::trim) {
        if proto.is_empty() || proto.len() > 255 || !proto.is_ascii() {
            return Err(format!(
                "{s:?}: use auto, none, or a comma list of protocol names (1-255 ASCII bytes each)"
            ));
        }
        list.push(proto.as_bytes().to_vec());
    }
    Ok(AlpnPolicy::List(list))
}

fn default_server_name(upstream: &Upstream) -> Result<ServerName<'static>, ConfigError> {
    match &upstream.host {
        UpstreamHost::Dns(name) => ServerName::try_from(name.clone()).map_err(|_| {
            ConfigError::new(
                "RUNNEL_UPSTREAM",
                format!("{name:?} is not a valid DNS name"),
            )
        }),
        UpstreamHost::Ip(_) => Err(ConfigError::new(
            "RUNNEL_SERVER_NAME",
            "required when RUNNEL_UPSTREAM is an IP address: no SNI is sent for an IP, and an Istio Gateway \
             with specific hosts then drops the connection (filter_chain_not_found); set it to a name in the gateway certificate",
        )),
    }
}

fn is_ours(name: &str) -> bool {
    name == "PORT" || name == "SSLKEYLOGFILE" || name.starts_with("RUNNEL_")
}

fn static_name(name: &str) -> Option<&'static str> {
    VARS.iter().find(|v| v.name == name).map(|v| v.name)
}

/// The variables given to runnel, checked against `VARS`.
struct Env {
    values: BTreeMap<&'static str, String>,
}

impl Env {
    fn new<I, K, V>(vars: I) -> Result<Env, ConfigError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        let mut values = BTreeMap::new();
        for (name, value) in vars {
            let name = name.into();
            if !is_ours(&name) {
                continue;
            }
            let Some(known) = static_name(&name) else {
                return Err(unknown_variable(&name));
            };
            values.insert(known, value.into());
        }
        Ok(Env { values })
    }

    /// The value if set; an empty value is an error, not "unset".
    fn get(&self, name: &'static str) -> Result<Option<&str>, ConfigError> {
        match self.values.get(name).map(String::as_str) {
            Some("") => Err(ConfigError::new(name, "is set but empty")),
            other => Ok(other),
        }
    }

    fn parse_or<T>(
        &self,
        name: &'static str,
        default: T,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<T, ConfigError> {
        match self.get(name)? {
            Some(s) => parse(s.trim()).map_err(|reason| ConfigError::new(name, reason)),
            None => Ok(default),
        }
    }

    fn required<T>(
        &self,
        name: &'static str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<T, ConfigError> {
        let s = self
            .get(name)?
            .ok_or_else(|| ConfigError::new(name, "required, but not set"))?;
        parse(s.trim()).map_err(|reason| ConfigError::new(name, reason))
    }

    /// Exactly one of `<stem>_FILE` and `<stem>_PEM` for each of CA, certificate and key.
    fn tls_sources(&self) -> Result<Sources, ConfigError> {
        Ok(Sources {
            ca: self.one_of("RUNNEL_TLS_CA_FILE", "RUNNEL_TLS_CA_PEM")?,
            cert: self.one_of("RUNNEL_TLS_CERT_FILE", "RUNNEL_TLS_CERT_PEM")?,
            key: self.one_of("RUNNEL_TLS_KEY_FILE", "RUNNEL_TLS_KEY_PEM")?,
        })
    }

    fn one_of(&self, file: &'static str, pem: &'static str) -> Result<Source, ConfigError> {
        match (self.get(file)?, self.get(pem)?) {
            (Some(path), None) => Ok(Source::File {
                var: file,
                path: path.into(),
            }),
            (None, Some(text)) => Ok(Source::Pem {
                var: pem,
                text: text.to_owned(),
            }),
            (Some(_), Some(_)) => Err(ConfigError::new(
                file,
                format!("set only one of {file} and {pem}"),
            )),
            (None, None) => Err(ConfigError::new(
                file,
                format!("required: set {file} or {pem}"),
            )),
        }
    }
}

fn unknown_variable(name: &str) -> ConfigError {
    // Compared without the prefix, so RUNNEL_PORT points at PORT, not RUNNEL_LOG.
    let bare = |n: &'static str| n.strip_prefix("RUNNEL_").unwrap_or(n);
    let wanted = name.strip_prefix("RUNNEL_").unwrap_or(name);
    let closest = VARS
        .iter()
        .map(|v| (edit_distance(wanted, bare(v.name)), v.name))
        .min()
        .map(|(_, n)| n)
        .unwrap_or("RUNNEL_UPSTREAM");
    ConfigError::new(
        name.to_owned(),
        format!("unknown variable; did you mean {closest}?"),
    )
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_field_values_are_literal_not_regular_expressions() {
        // As a regular expression this takes minutes and gigabytes to compile.
        let bomb = format!("[{{a=.*a{}}}]", ".".repeat(24));
        assert!(parse_filter(&bomb).is_ok());
        assert!(parse_filter("runnel=debug,warn").is_ok());
        assert!(parse_filter("runnel=loud").is_err());
    }

    #[test]
    fn the_default_connection_limit_fits_the_memory_limit() {
        const MIB: u64 = 1024 * 1024;
        // Cloud Run's 512 MiB: (512 - 64) MiB / 300 KiB.
        let at_512 = default_max_connections(Some(512 * MIB));
        assert_eq!(at_512, 1529);
        assert!(at_512 as u64 * CONNECTION_WORST_CASE + MEMORY_BASE <= 512 * MIB);
        assert_eq!(default_max_connections(Some(128 * MIB)), 218);
        assert_eq!(default_max_connections(Some(32 * MIB)), 1);
        assert_eq!(default_max_connections(Some(64 * 1024 * MIB)), 10_000);
        assert_eq!(default_max_connections(None), 10_000);
    }

    #[test]
    fn memory_limit_files_parse_bytes_and_no_limit() {
        assert_eq!(parse_memory_max("536870912\n"), Some(512 << 20));
        assert_eq!(parse_memory_max("max\n"), None);
        // cgroup v1 without a limit.
        assert_eq!(parse_memory_max("9223372036854771712"), None);
        assert_eq!(
            parse_mem_total("MemTotal:        2097152 kB\nMemFree: 1 kB\n"),
            Some(2 << 30)
        );
        assert_eq!(parse_mem_total("MemFree: 1 kB\n"), None);
    }

    #[test]
    fn durations_take_the_documented_units() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        for bad in [
            "",
            "5",
            "s",
            "5 s",
            "-1s",
            "1.5s",
            "5sec",
            "99999999999999999999h",
            "100000h",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn upstream_accepts_dns_ipv4_and_bracketed_ipv6() {
        assert_eq!(
            parse_upstream("gw.internal:443").unwrap().host,
            UpstreamHost::Dns("gw.internal".into())
        );
        assert_eq!(
            parse_upstream("10.0.0.1:443").unwrap().host,
            UpstreamHost::Ip("10.0.0.1".parse().unwrap())
        );
        assert_eq!(
            parse_upstream("[::1]:443").unwrap().host,
            UpstreamHost::Ip("::1".parse().unwrap())
        );
        for bad in [
            "gw.internal",
            "gw.internal:0",
            "gw.internal:99999",
            "::1:443",
            ":443",
            "bad_name!:443",
        ] {
            assert!(parse_upstream(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn alpn_takes_auto_none_or_a_list() {
        assert_eq!(parse_alpn("auto"), Ok(AlpnPolicy::Auto));
        assert_eq!(parse_alpn("none"), Ok(AlpnPolicy::None));
        assert_eq!(
            parse_alpn("h2, http/1.1"),
            Ok(AlpnPolicy::List(vec![b"h2".to_vec(), b"http/1.1".to_vec()]))
        );
        assert!(parse_alpn("h2,,http/1.1").is_err());
    }

    #[test]
    fn unknown_variable_names_the_closest_known_one() {
        let e = Env::new([("RUNNEL_UPSTRAEM", "x")]).err().unwrap();
        assert_eq!(
            e.to_string(),
            "RUNNEL_UPSTRAEM: unknown variable; did you mean RUNNEL_UPSTREAM?"
        );
        assert_eq!(
            Env::new([("RUNNEL_PORT", "8080")])
                .err()
                .unwrap()
                .to_string(),
            "RUNNEL_PORT: unknown variable; did you mean PORT?"
        );
        assert!(
            Env::new([("HOME", "/root")]).is_ok(),
            "other variables are not ours to judge"
        );
    }

    #[test]
    fn pool_max_zero_alone_turns_the_pool_off() {
        let pool = |vars: &[(&str, &str)]| parse_pool(&Env::new(vars.iter().copied()).unwrap());
        let off = pool(&[("RUNNEL_POOL_MAX", "0")]).unwrap();
        assert_eq!((off.min, off.max), (0, 0));
        let small = pool(&[("RUNNEL_POOL_MAX", "1")]).unwrap();
        assert_eq!((small.min, small.max), (1, 1));
        let default = pool(&[]).unwrap();
        assert_eq!((default.min, default.max), (2, 32));
        assert_eq!(
            pool(&[("RUNNEL_POOL_MIN", "3"), ("RUNNEL_POOL_MAX", "1")])
                .err()
                .unwrap()
                .to_string(),
            "RUNNEL_POOL_MIN: 3 is above RUNNEL_POOL_MAX (1)"
        );
    }

    #[test]
    fn empty_value_is_an_error_not_a_default() {
        let env = Env::new([("RUNNEL_ALPN", "")]).unwrap();
        assert_eq!(
            env.get("RUNNEL_ALPN").err().unwrap().to_string(),
            "RUNNEL_ALPN: is set but empty"
        );
    }

    #[test]
    fn tls_sources_need_exactly_one_of_file_and_pem() {
        let env = Env::new([("RUNNEL_TLS_CA_FILE", "/a"), ("RUNNEL_TLS_CA_PEM", "b")]).unwrap();
        assert_eq!(
            env.tls_sources().err().unwrap().to_string(),
            "RUNNEL_TLS_CA_FILE: set only one of RUNNEL_TLS_CA_FILE and RUNNEL_TLS_CA_PEM"
        );
        let env = Env::new(Vec::<(String, String)>::new()).unwrap();
        assert_eq!(
            env.tls_sources().err().unwrap().to_string(),
            "RUNNEL_TLS_CA_FILE: required: set RUNNEL_TLS_CA_FILE or RUNNEL_TLS_CA_PEM"
        );
    }
}
