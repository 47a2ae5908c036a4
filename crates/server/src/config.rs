//! Settings of one server process, with their defaults.

use crate::access::guard;
use crate::net::tls;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Settings of one server process.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Where the SQLite database (unless `database` names another), output objects and the
    /// admin token live.
    pub data_dir: PathBuf,
    /// The database, when not SQLite in `data_dir`: PostgreSQL, which several replicas share.
    pub database: Option<fleetrun_store::Database>,
    /// Address to listen on; port 0 picks a free one.
    pub listen: SocketAddr,
    /// Seconds between agent pings.
    pub heartbeat_secs: u64,
    /// Commands older than this are purged with their output.
    pub retention: Duration,
    /// How often the retention purge runs.
    pub purge_interval: Duration,
    /// Most agent handshakes in progress at once; more get 503 with Retry-After (reconnect storms).
    pub max_handshakes: usize,
    /// The URL clients reach this server at (for output URLs); default `https://` (`http://`
    /// with [`tls::TlsMode::Insecure`]) + the listen address.
    pub public_url: Option<String>,
    /// API requests per second per principal (bursts of 4x); 0 = no limit.
    pub rate_limit: u32,
    /// The key sealing secrets; None for `DATA_DIR/secrets.key` (created on first start).
    pub secrets_key_file: Option<PathBuf>,
    /// How the listener is secured: the server's own CA by default.
    pub tls: tls::TlsMode,
    /// Longest wait for a request head (the first one from the accept on, TLS handshake included;
    /// later ones from the previous answer, so also the idle keep-alive timeout); then the
    /// connection is closed.
    pub header_read_timeout: Duration,
    /// Longest time a request's body may take to arrive after its head; then 408.
    pub body_read_timeout: Duration,
    /// Time an agent has, from the WebSocket upgrade, to send a valid `Hello` or `Register`.
    pub agent_handshake_timeout: Duration,
    /// Most connections open at once, upgraded agent channels included; 0 = the process's
    /// open-file limit less [`crate::net::conn::FD_RESERVE`].
    pub max_connections: usize,
    /// Most HTTP connections one source address may hold open (agent channels leave the count once
    /// upgraded); never more than half of `max_connections` (0 = that half).
    pub max_connections_per_address: usize,
    /// Most agent handshakes in progress from one source address; 0 = no limit.
    pub max_handshakes_per_address: usize,
    /// Longest a shutdown waits for requests, agent channels and background tasks to finish.
    pub shutdown_grace: Duration,
    /// Time past a command's expiry (delivery + execution timeout) a result in flight still has
    /// before unfinished invocations end TimedOut.
    pub result_grace: Duration,
    /// How long a command stays this server's to dispatch without a heartbeat renewing it
    /// (every third of it): a peer on the same database takes over the commands of a server
    /// silent for this long.
    pub replica_lease: Duration,
    /// The NATS server the replicas on one PostgreSQL database share (`nats://host:4222`); None
    /// for a server on its own.
    pub nats_url: Option<String>,
    /// A session with no bytes either way for this long is ended ("idle timeout").
    pub session_idle_timeout: Duration,
    /// A session running this long is ended ("max duration"); None (the default): no limit.
    pub session_max_duration: Option<Duration>,
    /// Where objects (output, recordings, files) are kept: `DATA_DIR/objects` by default.
    pub object_store: crate::objects::ObjectStoreConfig,
    /// Session recordings: on, input off, fail closed by default.
    pub recording: crate::sessions::recording::Settings,
    /// CA certificates (PEM) trusted for `https://` script inputs besides the system's roots.
    pub script_input_ca: Option<PathBuf>,
    /// Largest output file a saved script run ships back (5 GiB by default).
    pub script_output_max: u64,
    /// Buckets besides the own store's that output to S3 may go to and `s3://` script inputs
    /// may come from: names or `*` globs; `None`: only the own store's bucket.
    pub allowed_buckets: Option<Vec<String>>,
}

impl ServerConfig {
    /// Default retention (30 days, as SSM keeps history).
    pub const DEFAULT_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);
    /// Default purge interval.
    pub const DEFAULT_PURGE_INTERVAL: Duration = Duration::from_secs(3600);
    /// Default handshake limit.
    pub const DEFAULT_MAX_HANDSHAKES: usize = 128;
    /// Default per-principal request rate.
    pub const DEFAULT_RATE_LIMIT: u32 = guard::RateLimiter::DEFAULT_RATE;
    /// Default header read (and idle keep-alive) timeout.
    pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
    /// Default body read timeout.
    pub const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(60);
    /// Default time from an agent's upgrade to its `Hello` or `Register`.
    pub const DEFAULT_AGENT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
    /// Default cap of HTTP connections per source address.
    pub const DEFAULT_MAX_CONNECTIONS_PER_ADDRESS: usize = 256;
    /// Default cap of agent handshakes in progress per source address.
    pub const DEFAULT_MAX_HANDSHAKES_PER_ADDRESS: usize = 32;
    /// Default shutdown grace period.
    pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

    /// Default grace for a result in flight past a command's expiry.
    pub const DEFAULT_RESULT_GRACE: Duration = Duration::from_secs(30);

    /// Default session idle timeout (20 minutes, as SSM's).
    pub const DEFAULT_SESSION_IDLE_TIMEOUT: Duration = Duration::from_secs(20 * 60);
    /// A dead replica's commands are taken over within this (plus one heartbeat).
    pub const DEFAULT_REPLICA_LEASE: Duration = Duration::from_secs(6);

    /// Settings with defaults for everything but where to keep data and where to listen.
    pub fn new(data_dir: PathBuf, listen: SocketAddr) -> Self {
        ServerConfig {
            data_dir,
            database: None,
            listen,
            heartbeat_secs: 15,
            retention: Self::DEFAULT_RETENTION,
            purge_interval: Self::DEFAULT_PURGE_INTERVAL,
            max_handshakes: Self::DEFAULT_MAX_HANDSHAKES,
            public_url: None,
            rate_limit: Self::DEFAULT_RATE_LIMIT,
            secrets_key_file: None,
            tls: tls::TlsMode::default(),
            header_read_timeout: Self::DEFAULT_HEADER_READ_TIMEOUT,
            body_read_timeout: Self::DEFAULT_BODY_READ_TIMEOUT,
            agent_handshake_timeout: Self::DEFAULT_AGENT_HANDSHAKE_TIMEOUT,
            max_connections: 0,
            max_connections_per_address: Self::DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
            max_handshakes_per_address: Self::DEFAULT_MAX_HANDSHAKES_PER_ADDRESS,
            shutdown_grace: Self::DEFAULT_SHUTDOWN_GRACE,
            result_grace: Self::DEFAULT_RESULT_GRACE,
            replica_lease: Self::DEFAULT_REPLICA_LEASE,
            nats_url: None,
            session_idle_timeout: Self::DEFAULT_SESSION_IDLE_TIMEOUT,
            session_max_duration: None,
            object_store: Default::default(),
            script_input_ca: None,
            script_output_max: crate::scripts::runner::OUTPUT_MAX_DEFAULT,
            allowed_buckets: None,
            recording: Default::default(),
        }
    }
}
