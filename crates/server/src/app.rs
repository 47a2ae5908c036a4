//! The state every request and task shares, and the start of a server process.

use crate::ServerConfig;
use crate::access::{authz, guard, secrets};
use crate::api;
use crate::fleet::hub;
use crate::net::{conn, tls};
use crate::run::{dispatch, output, retention};
use anyhow::Context;
use fleetrun_store::Store;
use object_store::ObjectStore;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// State shared by every request and task.
pub struct AppState {
    /// The database.
    pub store: Store,
    /// Output objects.
    pub objects: Arc<dyn ObjectStore>,
    /// Connected agents.
    pub hub: hub::Hub,
    /// Output actors of running invocations.
    pub outputs: output::Outputs,
    /// Dispatchers of running commands.
    pub dispatchers: dispatch::Dispatchers,
    /// Seconds between agent pings.
    pub heartbeat_secs: u64,
    /// Where data lives.
    pub data_dir: PathBuf,
    /// Retention period.
    pub retention: Duration,
    /// Grace past a command's expiry before unfinished invocations end.
    pub result_grace: Duration,
    /// The sessions running here (terminate, timeouts).
    pub sessions: crate::sessions::live::Live,
    /// The sessions SSM's StartSession issued, waiting for their client to connect.
    pub tickets: crate::sessions::tickets::Tickets,
    /// Keys of `/v1/objects` with an upload in progress.
    pub uploads: crate::objects::api::Uploads,
    /// The clients of the buckets commands write their output to (SSM's `OutputS3BucketName`).
    pub exports: crate::objects::export::Exports,
    /// Fetches saved scripts' `https://` inputs.
    pub inputs: crate::scripts::inputs::Fetcher,
    /// Largest output file a saved script run ships back.
    pub script_output_max: u64,
    /// Whether and how sessions are recorded.
    pub recording: crate::sessions::recording::Settings,
    /// Permits for agent handshakes in progress.
    pub handshakes: Arc<tokio::sync::Semaphore>,
    /// Agent handshakes in progress per source address.
    pub handshakes_by_address: conn::Counter,
    /// Most agent handshakes in progress per source address (0 = no limit).
    pub max_handshakes_per_address: usize,
    /// Time an agent has from its upgrade to a valid `Hello` or `Register`.
    pub agent_handshake_timeout: Duration,
    /// Longest time a request body may take to arrive.
    pub body_read_timeout: Duration,
    /// Seals secrets the server must read back (access keys).
    pub secret_box: secrets::SecretBox,
    /// The URL clients reach this server at.
    pub public_url: String,
    /// Failed-authentication counts per source (brute-force guard).
    pub auth_guard: guard::AuthGuard,
    /// Decides what principals may do (compiled Cedar policies).
    pub authz: authz::Authz,
    /// Requests per principal (token buckets).
    pub rate_limiter: guard::RateLimiter,
    /// Fingerprint of the server's own CA, handed out with activation codes for agents to pin.
    pub ca_fingerprint: Option<String>,
    /// Fired at shutdown, once the requests and agent channels are done: dispatchers, output actors
    /// and the retention task stop on it.
    pub shutdown: CancellationToken,
    /// The background tasks (dispatchers, output actors, retention) shutdown waits for.
    pub tasks: TaskTracker,
    /// This server as a replica: its id, its leases, its estimate of the database's clock.
    pub replica: crate::cluster::replica::Replica,
    /// The bus to the other replicas (`--nats-url`); None for a server on its own.
    pub bus: Option<Arc<crate::cluster::bus::Bus>>,
    /// Followers on other replicas of output produced here.
    pub forwarders: crate::cluster::follow::Forwarders,
}

impl AppState {
    /// The fleet changed (a node registered, left, or had its tags changed): authorization
    /// scopes cached from it are dropped here and, through the bus, on every other replica.
    pub fn fleet_changed(&self) {
        self.authz.fleet_changed();
        if let Some(bus) = &self.bus {
            bus.fleet_changed();
        }
    }

    /// Whether a node is connected now: here, or (with replicas) to another replica alive at
    /// the last heartbeat, `connected_to` being the replica its last connect recorded.
    pub fn node_online(&self, node: &fleetrun_proto::NodeId, connected_to: &str) -> bool {
        self.hub.is_online(node)
            || (self.bus.is_some()
                && !connected_to.is_empty()
                && self.replica.is_live_peer(connected_to))
    }
}

/// A server that is listening.
pub struct RunningServer {
    /// The address it listens on.
    pub local_addr: SocketAddr,
    /// The admin token, when it was created by this start (print it once); None when it existed.
    pub admin_token: Option<String>,
    /// Where the admin token is kept.
    pub admin_token_path: PathBuf,
    /// The URL clients reach this server at (`https://` unless serving plain HTTP).
    pub public_url: String,
    /// The CA certificate clients should trust, when the server is its own CA (`DATA_DIR/ca.pem`).
    pub ca_path: Option<PathBuf>,
    /// That CA's fingerprint (SHA-256 of its DER, lowercase hex), for `--ca-fingerprint`.
    pub ca_fingerprint: Option<String>,
    /// The accept loop; None once it has ended.
    serve: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    /// Stops the accept loop.
    stop_accepting: CancellationToken,
    /// Every open socket, upgraded agent channels included.
    sockets: conn::Counter,
    state: Arc<AppState>,
    shutdown_grace: Duration,
    /// Held while the server runs: no second server on the same data dir (and replica id).
    _data_dir_lock: crate::cluster::replica::DataDirLock,
}

/// How a server's shutdown ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum Ended {
    /// Everything finished within the grace period and the store was flushed and closed.
    Clean,
    /// The grace period ran out first: requests, agent channels or background tasks still running
    /// were dropped (the store was still flushed and closed).
    GraceExpired,
}

/// Opens the storage, creates the admin token on first start, resumes unfinished commands and starts
/// listening.
pub async fn start(config: ServerConfig) -> anyhow::Result<RunningServer> {
    if config.heartbeat_secs == 0 {
        anyhow::bail!("heartbeat must be at least 1 second");
    }
    if config.purge_interval.is_zero() {
        anyhow::bail!("purge interval must be more than 0");
    }
    for (what, d) in [
        ("header read timeout", config.header_read_timeout),
        ("body read timeout", config.body_read_timeout),
        ("agent handshake timeout", config.agent_handshake_timeout),
        ("session idle timeout", config.session_idle_timeout),
        ("replica lease", config.replica_lease),
    ] {
        if d.is_zero() {
            anyhow::bail!("{what} must be more than 0");
        }
    }
    let nofile = conn::raise_nofile_limit();
    let max_connections = match config.max_connections {
        0 => conn::default_max_connections(nofile),
        n => n,
    };
    let max_connections_per_address =
        conn::effective_per_address(config.max_connections_per_address, max_connections);
    tracing::info!(
        open_files = nofile,
        max_connections,
        max_connections_per_address,
        "connection limits"
    );
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data dir {}", config.data_dir.display()))?;
    let (replica_id, data_dir_lock) = crate::cluster::replica::identify(&config.data_dir)?;
    let database = config
        .database
        .clone()
        .unwrap_or_else(|| fleetrun_store::Database::in_data_dir(&config.data_dir));
    let store = Store::open(&database)
        .await
        .with_context(|| format!("cannot open database {database}"))?;
    // Replicas reach each other's agents through the bus; without one, a second server on the
    // database would dispatch commands to agents it cannot reach.
    let bus = match &config.nats_url {
        None => {
            if !store.claim_database().await? {
                anyhow::bail!(
                    "another fleetrun server uses database {database}: several servers on one \
                     database (replicas) each need --nats-url, the NATS server they share; or \
                     stop the other one, or give this one a database of its own"
                );
            }
            None
        }
        Some(_) if !database.is_shared() => anyhow::bail!(
            "--nats-url is for several replicas, which share a PostgreSQL database: give \
             --database postgres://...; SQLite serves one server on its own"
        ),
        Some(url) => {
            if matches!(
                config.object_store,
                crate::objects::ObjectStoreConfig::Local
            ) {
                tracing::warn!(
                    "replicas with objects in each one's data dir: output past its inline copy, \
                     recordings and files are readable only on the replica that wrote them; \
                     give every replica the same --object-store s3://..."
                );
            }
            Some(crate::cluster::bus::Bus::connect(url, &replica_id).await?)
        }
    };
    tracing::info!(%database, "database open");
    // A session still Active belonged to a server that stopped: its relay is gone with it.
    let orphans = store
        .end_active_sessions(fleetrun_proto::time::now_ms(), "server restarted")
        .await?;
    if orphans > 0 {
        tracing::info!(
            sessions = orphans,
            "sessions of the previous run marked ended"
        );
    }
    let (objects, objects_place) =
        crate::objects::open(&config.object_store, &config.data_dir).await?;
    tracing::info!(place = %objects_place, "object store open");

    let admin_token_path = config.data_dir.join("admin.token");
    let admin_token = if store.has_api_tokens().await? {
        None
    } else {
        let token = format!("frt_{}", secrets::random_token(40));
        write_secret_file(&admin_token_path, &token)?;
        store
            .insert_token(&secrets::hash(&token), "admin", "admin", None)
            .await?;
        tracing::info!(path = %admin_token_path.display(), "admin token created");
        Some(token)
    };

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let local_addr = listener.local_addr()?;
    let tls = tls::setup(
        &config.tls,
        &config.data_dir,
        local_addr,
        config.public_url.as_deref(),
    )?;
    let scheme = if tls.acceptor.is_some() {
        "https"
    } else {
        tracing::warn!(
            "TLS is OFF (--insecure-http): tokens, scripts and output cross the network in clear text"
        );
        "http"
    };
    let secret_box = match &config.secrets_key_file {
        // A configured key must exist: creating a fresh one would orphan everything sealed before.
        Some(path) => secrets::SecretBox::open_existing(path)?,
        None => secrets::SecretBox::open(&config.data_dir.join("secrets.key"))?,
    };
    if let Some(patterns) = &config.allowed_buckets {
        crate::objects::buckets::check_allowed_patterns(patterns).map_err(anyhow::Error::msg)?;
    }
    // One set of bucket clients for output to S3 and s3:// script inputs.
    let buckets = Arc::new(crate::objects::buckets::Buckets::new(
        &config.object_store,
        config.allowed_buckets.clone(),
    ));
    let state = Arc::new(AppState {
        store,
        objects,
        hub: hub::Hub::default(),
        outputs: output::Outputs::default(),
        dispatchers: dispatch::Dispatchers::new(bus.clone()),
        heartbeat_secs: config.heartbeat_secs,
        data_dir: config.data_dir.clone(),
        retention: config.retention,
        result_grace: config.result_grace,
        uploads: Default::default(),
        exports: crate::objects::export::Exports::new(buckets.clone()),
        inputs: crate::scripts::inputs::Fetcher::new(
            config.script_input_ca.as_deref(),
            Default::default(),
            buckets,
        )?,
        script_output_max: config.script_output_max,
        sessions: crate::sessions::live::Live::new(
            config.session_idle_timeout,
            config.session_max_duration,
        ),
        tickets: Default::default(),
        recording: config.recording,
        handshakes: Arc::new(tokio::sync::Semaphore::new(config.max_handshakes.max(1))),
        handshakes_by_address: conn::Counter::default(),
        max_handshakes_per_address: config.max_handshakes_per_address,
        agent_handshake_timeout: config.agent_handshake_timeout,
        body_read_timeout: config.body_read_timeout,
        secret_box,
        auth_guard: guard::AuthGuard::default(),
        authz: authz::Authz::default(),
        rate_limiter: guard::RateLimiter::new(
            config.rate_limit,
            config.rate_limit.saturating_mul(4),
        ),
        public_url: config
            .public_url
            .clone()
            .unwrap_or_else(|| format!("{scheme}://{local_addr}"))
            .trim_end_matches('/')
            .to_owned(),
        ca_fingerprint: tls.ca_fingerprint.clone(),
        shutdown: CancellationToken::new(),
        tasks: TaskTracker::new(),
        replica: crate::cluster::replica::Replica::new(replica_id, config.replica_lease),
        bus,
        forwarders: Default::default(),
    });
    let public_url = state.public_url.clone();
    tracing::info!(replica = state.replica.id(), "joining the replicas");
    crate::cluster::replica::join(&state).await?;
    state
        .tasks
        .spawn(crate::cluster::replica::run(state.clone()));
    if let Some(bus) = &state.bus {
        tracing::info!("on the bus to the other replicas");
        state
            .tasks
            .spawn(crate::cluster::bus::run(state.clone(), bus.clone()));
    }

    state
        .tasks
        .spawn(crate::objects::export::run(state.clone()));
    state
        .tasks
        .spawn(crate::scripts::runner::janitor(state.clone()));
    state.tasks.spawn(retention::run(
        state.clone(),
        config.retention,
        config.purge_interval,
    ));

    tracing::info!(%local_addr, %scheme, "listening");
    let app = api::router(state.clone());
    let settings = tls::ConnSettings {
        header_read_timeout: config.header_read_timeout,
        max_connections,
        max_connections_per_address,
    };
    let stop_accepting = CancellationToken::new();
    let sockets = conn::Counter::default();
    let serve = tokio::spawn(tls::serve(
        listener,
        tls.acceptor,
        app,
        settings,
        stop_accepting.clone(),
        sockets.clone(),
    ));
    Ok(RunningServer {
        local_addr,
        admin_token,
        admin_token_path,
        public_url,
        ca_path: tls.ca_path,
        ca_fingerprint: tls.ca_fingerprint,
        serve: Some(serve),
        stop_accepting,
        sockets,
        state,
        shutdown_grace: config.shutdown_grace,
        _data_dir_lock: data_dir_lock,
    })
}

/// Longest wait for the store's last writes and its pools to close once the grace period is over.
const STORE_CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

impl RunningServer {
    /// Serves until a fatal error happens (the accept loop ends only through [`Self::shutdown`]).
    pub async fn wait(&mut self) -> anyhow::Result<()> {
        let Some(serve) = self.serve.as_mut() else {
            anyhow::bail!("server stopped");
        };
        let r = serve.await;
        self.serve = None;
        r.context("server task failed")?.context("server stopped")?;
        anyhow::bail!("server stopped")
    }

    /// Serves until `signal` completes, then shuts down ([`Self::shutdown`]). A failure of the
    /// server while serving is an error (the store is still flushed and closed).
    pub async fn serve_until(
        mut self,
        signal: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<Ended> {
        let failed = tokio::select! {
            r = self.wait() => r.err(),
            () = signal => None,
        };
        let ended = self.shutdown().await;
        match failed {
            Some(e) => Err(e),
            None => ended,
        }
    }

    /// Shuts down in a fixed order, all of it within the configured grace period
    /// (`ServerConfig::shutdown_grace`) except the last step:
    /// 1. stop accepting connections;
    /// 2. let the requests in progress finish (HTTP/1 connections close after their answer,
    ///    HTTP/2 ones get a GOAWAY);
    /// 3. close the agent channels (agents reconnect, to this server once it is back);
    /// 4. stop the background tasks: dispatchers (resumed from the database at the next start),
    ///    output actors (which store what they buffer first) and the retention purge;
    /// 5. leave the replicas (its commands' leases end now, for a peer to take over), then flush
    ///    the store's group-commit writer and close its pools.
    ///
    /// Returns [`Ended::GraceExpired`] when steps 2 to 4 did not finish in time (what was left
    /// is dropped, as a crash would, which every step is built to survive), and an error when the
    /// accept loop had failed or the store could not be flushed.
    pub async fn shutdown(mut self) -> anyhow::Result<Ended> {
        let deadline = tokio::time::Instant::now() + self.shutdown_grace;
        let mut ended = Ended::Clean;
        tracing::info!(grace = ?self.shutdown_grace, "shutting down");
        self.stop_accepting.cancel();
        let mut failed = None;
        if let Some(serve) = self.serve.take() {
            let abort = serve.abort_handle();
            match tokio::time::timeout_at(deadline, serve).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => failed = Some(anyhow::Error::from(e).context("server stopped")),
                Ok(Err(e)) => failed = Some(anyhow::Error::from(e).context("server task failed")),
                Err(_) => {
                    tracing::warn!("requests still in progress at the end of the grace period");
                    abort.abort();
                    ended = Ended::GraceExpired;
                }
            }
        }
        self.state.hub.close_all();
        if tokio::time::timeout_at(deadline, self.sockets.wait_empty())
            .await
            .is_err()
        {
            tracing::warn!(
                sockets = self.sockets.total(),
                "connections still open at the end of the grace period"
            );
            ended = Ended::GraceExpired;
        }
        self.state.shutdown.cancel();
        self.state.tasks.close();
        if tokio::time::timeout_at(deadline, self.state.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                tasks = self.state.tasks.len(),
                "background tasks still running at the end of the grace period"
            );
            ended = Ended::GraceExpired;
        }
        // Its dispatchers stopped: peers may take its commands now rather than at lease expiry.
        crate::cluster::replica::leave(&self.state).await;
        match tokio::time::timeout(STORE_CLOSE_TIMEOUT, self.state.store.close()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                failed.get_or_insert(anyhow::Error::from(e).context("cannot flush the database"));
            }
            Err(_) => {
                failed.get_or_insert(anyhow::anyhow!("the database did not close in time"));
            }
        }
        if let Some(e) = failed {
            return Err(e);
        }
        tracing::info!(?ended, "shut down");
        Ok(ended)
    }
}

/// Writes a secret readable by its owner only.
fn write_secret_file(path: &std::path::Path, secret: &str) -> anyhow::Result<()> {
    write_private_file(path, format!("{secret}\n").as_bytes())
}

/// Writes a file readable by its owner only (created with mode 0600, never world-readable).
pub(crate) fn write_private_file(path: &std::path::Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}
