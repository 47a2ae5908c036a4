//! The fleetrun agent: one outbound WebSocket to the server, commands run as local process
//! groups, their output spooled to disk and streamed back with flow control, resent after
//! reconnects and agent restarts; every invocation runs at most once.
//!
//! Embeddable: [`run`] takes an [`AgentConfig`] and runs until a fatal error (the CLI's
//! `fleetrun dev` runs an agent in-process; dropping the future kills the commands it runs).
//! [`exec::execute`] runs one command without any server, which is how the executor is tested.
//!
//! Modules:
//! - [`config`]: settings and their validation;
//! - [`identity`]: the node id and its Ed25519 keys kept in the state directory, and their rotation;
//! - [`sysinfo`]: the facts reported about the machine;
//! - [`imds`]: the EC2 instance id from the instance metadata service, at registration;
//! - [`connection`]: the connection state machine, its reader and writer;
//! - [`tls`]: whom the agent trusts on `wss://` (CA file, pinned CA fingerprint, system roots);
//! - [`outbox`]: invocations held and the frames due for the server;
//! - [`stream`]: one output stream spooled to disk, and the pump that fills it;
//! - [`streams`]: session streams (protocol versions 3 and 4): `Exec` processes on pipes and
//!   `Shell`s on a PTY, whose bytes move within each stream's credit window, hung up on close or
//!   a lost connection;
//! - [`shell`]: starting a `Shell` stream's login shell on a new PTY;
//! - [`files`]: file transfers on streams (`FilePut`, `FileGet`);
//! - [`listing`]: a directory's tree on a stream (`FileList`, for `cp -r` down);
//! - [`journal`]: the durable record of invocations (request, start marker, result, completed);
//! - [`scheduler`]: exactly-once acceptance, queueing, concurrency, recovery after a restart;
//! - [`exec`]: spawning, waiting for and killing one command;
//! - [`limits`]: memory and CPU limits (cgroup v2, cgroup v1, rlimit);
//! - [`user`]: running as another user.

pub mod config;
pub mod connection;
pub mod error;
pub mod exec;
pub mod files;
pub mod identity;
pub mod imds;
pub mod journal;
pub mod limits;
pub mod listing;
pub mod outbox;
pub mod scheduler;
pub mod shell;
pub mod stream;
pub mod streams;
pub mod sysinfo;
pub mod tls;
pub mod user;

pub use config::AgentConfig;
pub use error::AgentError;

use std::future::Future;
use std::sync::Arc;

/// Runs the agent: registers if needed, then keeps a connection to the server and runs what it
/// sends. Returns only for a fatal error (bad settings, registration refused, identity rejected).
pub async fn run(config: AgentConfig) -> anyhow::Result<()> {
    run_until(config, std::future::pending()).await
}

/// Like [`run`], but also returns `Ok(())` when `shutdown` resolves, after killing the commands
/// still running.
pub async fn run_until(
    config: AgentConfig,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let mut config = config;
    if let Some(f) = &config.ca_fingerprint {
        config.ca_fingerprint =
            Some(fleetrun_proto::tls::parse_fingerprint(f).map_err(AgentError::Config)?);
    }
    config.validate()?;
    let urls = config.connect_urls()?;
    let url = urls[0].clone();
    if url.starts_with("ws://") {
        tracing::warn!(
            url = %url,
            "TLS is OFF (--insecure-http): the node's secret, commands and output cross the network in clear text"
        );
    }
    identity::ensure_state_dir(&config.state_dir)?;
    let identity = identity::load(&config.state_dir)?;
    if identity.is_none() && config.activation_code.is_none() {
        return Err(AgentError::NoIdentity(config.state_dir.clone()).into());
    }
    let instance_id = instance_id(&config, identity.as_ref()).await;
    let info = sysinfo::node_info(config.name.as_deref());
    tracing::info!(
        state_dir = %config.state_dir.display(),
        node_id = identity.as_ref().map(|i| i.node_id.as_str()).unwrap_or("(unregistered)"),
        name = %info.name,
        "agent starting"
    );
    let outbox = Arc::new(outbox::Outbox::new(stream::Spool::new(
        config.spool_max_bytes,
    )));
    let _stop = StopOnDrop(Arc::clone(&outbox));
    // Takes over `runs/` of an earlier agent process (see `scheduler::Scheduler::recover`).
    let tls = tls::Tls::new(&config, &url)?;
    let mut channel = connection::Channel::new(&config, urls, tls, info, outbox, identity)?;
    channel.register_as(instance_id);
    tokio::select! {
        r = channel.run() => Err(r.err().map_or_else(|| anyhow::anyhow!("agent stopped"), Into::into)),
        () = shutdown => {
            tracing::info!("agent stopping");
            Ok(())
        }
    }
}

/// The EC2 instance id to register under: `--instance-id`, else IMDS's answer (unless
/// `--no-imds`), else none (a server-made `mi-` id). Only a node that registers asks.
async fn instance_id(
    config: &AgentConfig,
    identity: Option<&identity::Identity>,
) -> Option<fleetrun_proto::NodeId> {
    if let Some(identity) = identity {
        if let Some(id) = &config.instance_id
            && id != identity.node_id.as_str()
        {
            tracing::warn!(
                node_id = %identity.node_id,
                instance_id = %id,
                "--instance-id is used at registration only: this node is registered already"
            );
        }
        return None;
    }
    if let Some(id) = &config.instance_id {
        // Checked by `validate`.
        return fleetrun_proto::NodeId::ec2(id).ok();
    }
    let endpoint = config.imds_endpoint.as_deref()?;
    match imds::instance_id(endpoint, imds::IMDS_BUDGET).await {
        Ok(id) => {
            tracing::info!(instance_id = %id, "on EC2: registering under the instance id");
            Some(id)
        }
        Err(why) => {
            tracing::info!(%why, "no EC2 instance id from IMDS: registering as a managed node");
            None
        }
    }
}

/// Kills the running commands when the agent stops for any reason, so none is orphaned.
struct StopOnDrop(Arc<outbox::Outbox>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.shutdown();
    }
}
