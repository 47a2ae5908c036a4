//! `fleetrun dev`: a server and an agent in one process, with the CLI pointed at them. The quickest way
//! to try fleetrun on one machine.

use super::server::{
    HEARTBEAT_SECS_DEFAULT, LISTEN_DEFAULT, default_data_dir, exit_code, init_logging, stop_signal,
};
use crate::client::Client;
use crate::config::{self, CliConfigFile, Connection};
use anyhow::{Context, bail};
use fleetrun_proto::api::CreateActivation;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// How long to wait for the local agent to come online before saying so and carrying on.
const ONLINE_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where the dev server and agent keep their state [default: ~/.local/share/fleetrun/dev]
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Address to listen on
    #[arg(long, value_name = "ADDR", default_value = LISTEN_DEFAULT)]
    listen: SocketAddr,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    init_logging("warn");
    let data_dir = match args.data_dir {
        Some(d) => d,
        None => default_data_dir()?.join("dev"),
    };
    let mut server = fleetrun_server::start(fleetrun_server::ServerConfig {
        heartbeat_secs: HEARTBEAT_SECS_DEFAULT,
        ..fleetrun_server::ServerConfig::new(data_dir.clone(), args.listen)
    })
    .await
    .with_context(|| format!("cannot start the server (data dir {})", data_dir.display()))?;
    let token = match &server.admin_token {
        Some(t) => t.clone(),
        None => read_token(&server.admin_token_path)?,
    };
    let url = format!("https://{}", reachable(server.local_addr));
    // The dev server is its own CA; the CLI and the local agent trust it by its certificate.
    let ca_cert = server.ca_path.clone();
    let conn = Connection {
        server: url.clone(),
        token,
        ca_cert: ca_cert.clone(),
    };
    let client = Client::new(&conn)?;
    let name = format!("dev-{}", hostname().unwrap_or_else(|| "local".into()));
    let state_dir = data_dir.join("agent");

    // The server may serve only while `wait` is polled, so every step below runs beside it.
    let mut serve = Box::pin(server.wait());

    let activation_code = tokio::select! {
        r = &mut serve => return server_ended(r),
        code = activation_code(&client, &state_dir) => code?,
    };
    // The in-process agent: defaults for everything but where it reports, what it is called and its
    // tags; an identity in `state_dir` from an earlier run makes the activation code unnecessary.
    let mut agent_config = fleetrun_agent::AgentConfig::new(url.clone(), state_dir.clone());
    agent_config.activation_code = activation_code;
    agent_config.name = Some(name.clone());
    agent_config.tags = BTreeMap::from([("env".to_owned(), "dev".to_owned())]);
    agent_config.heartbeat_secs = HEARTBEAT_SECS_DEFAULT;
    agent_config.ca_cert = ca_cert.clone();
    let agent = fleetrun_agent::run(agent_config);
    tokio::pin!(agent);

    let config_path = config::config_path()?;
    config::save(
        &config_path,
        &CliConfigFile {
            server: Some(conn.server.clone()),
            token: Some(conn.token.clone()),
            ca_cert: ca_cert.clone(),
        },
    )?;

    let node = tokio::select! {
        r = &mut serve => return server_ended(r),
        r = &mut agent => return agent_ended(r),
        node = wait_online(&client, &name) => node,
    };

    println!("fleetrun dev is running (Ctrl-C to stop)");
    println!("  server: {url}");
    println!("  data:   {}", data_dir.display());
    if let Some(ca) = &ca_cert {
        println!("  CA:     {}", ca.display());
    }
    println!(
        "  config: {} (server, token and CA certificate for the CLI)",
        config_path.display()
    );
    match node {
        Some(id) => println!("  node:   {id} ({name}) is Online"),
        None => println!(
            "  node:   {name} is not online after {}s; see the log above",
            ONLINE_WAIT.as_secs()
        ),
    }
    println!();
    println!("try, in another terminal:");
    println!("  fleetrun nodes");
    println!("  fleetrun send --targets all --wait -- uname -a");
    println!("  fleetrun commands");

    // Installed only now: until here Ctrl-C ends the process at once, as a start cut short should.
    let stop = stop_signal()?;
    tokio::select! {
        r = &mut serve => return server_ended(r),
        r = &mut agent => return agent_ended(r),
        () = stop => {}
    }
    eprintln!("stopping");
    // The agent is no longer polled; the server closes its channel as it shuts down.
    drop(serve);
    Ok(exit_code(server.shutdown().await?))
}

/// A fresh activation code, unless the agent already has an identity and needs none.
async fn activation_code(client: &Client, state_dir: &Path) -> anyhow::Result<Option<String>> {
    if state_dir.join("identity.json").exists() {
        return Ok(None);
    }
    let a = client
        .create_activation(&CreateActivation {
            tags: BTreeMap::from([("env".to_owned(), "dev".to_owned())]),
            limit: Some(1),
            expires_in_secs: None,
            description: "fleetrun dev".into(),
            default_instance_name: String::new(),
        })
        .await
        .context("cannot create an activation for the dev agent")?;
    Ok(Some(a.code))
}

/// Polls the node list until the named node is online; its id, or None after [`ONLINE_WAIT`].
async fn wait_online(client: &Client, name: &str) -> Option<String> {
    let deadline = Instant::now() + ONLINE_WAIT;
    let mut delay = Duration::from_millis(50);
    loop {
        if let Ok(nodes) = client.nodes().await
            && let Some(n) = nodes
                .iter()
                .find(|n| n.name == name && n.ping_status == fleetrun_proto::api::PING_ONLINE)
        {
            return Some(n.node_id.to_string());
        }
        if Instant::now() + delay > deadline {
            return None;
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(500));
    }
}

fn read_token(path: &Path) -> anyhow::Result<String> {
    let t = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the admin token {}", path.display()))?;
    let t = t.trim();
    if t.is_empty() {
        bail!("the admin token file {} is empty", path.display());
    }
    Ok(t.to_owned())
}

/// The address clients should use: a wildcard listen address is reached over loopback.
fn reachable(addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port())
    } else {
        addr
    }
}

fn hostname() -> Option<String> {
    let h = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .ok()?;
    let h = h.trim();
    (!h.is_empty()).then(|| h.to_owned())
}

fn server_ended(r: anyhow::Result<()>) -> anyhow::Result<ExitCode> {
    r.context("the server stopped")?;
    bail!("the server stopped")
}

fn agent_ended<E>(r: Result<(), E>) -> anyhow::Result<ExitCode>
where
    anyhow::Error: From<E>,
{
    r.map_err(anyhow::Error::from)
        .context("the agent stopped")?;
    bail!("the agent stopped")
}
