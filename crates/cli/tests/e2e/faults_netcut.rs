//! Issue "Nothing lost", network: the agent's link goes down mid-command for longer than three
//! heartbeats. With root and `ip netns`, the agent runs in its own network namespace joined to the host
//! by a veth pair, and the host end is taken down; otherwise the agent is frozen with SIGSTOP instead.

use crate::support::{Agent, AgentOpts, Server, invocations, wait_until};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// A network namespace and the veth pair into it: host end `10.77.N.1`, namespace end `10.77.N.2`.
/// Removed on drop (deleting the namespace deletes both veth ends).
pub(crate) struct NetNs {
    pub(crate) name: String,
    pub(crate) host_if: String,
    pub(crate) host_ip: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl NetNs {
    /// Creates the namespace and link, or says why it cannot.
    pub(crate) fn create() -> Result<NetNs, String> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        // A subnet no other run on this machine uses: pick from the pid, skip ones in use.
        let used = Command::new("ip")
            .args(["-o", "-4", "addr"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .map_err(|e| format!("ip addr: {e}"))?;
        let pid = std::process::id();
        let mut n = (pid + NEXT.fetch_add(7, Ordering::Relaxed)) % 250 + 1;
        for _ in 0..250 {
            if !used.contains(&format!("10.77.{n}.")) {
                break;
            }
            n = n % 250 + 1;
        }
        let tag = format!("{:x}{n}", pid % 0xfff);
        let ns = NetNs {
            name: format!("frt{tag}"),
            host_if: format!("frh{tag}"),
            host_ip: format!("10.77.{n}.1"),
        };
        let agent_if = format!("fra{tag}");
        ip(&["netns", "add", &ns.name])?;
        // From here on, drop cleans up whatever was made.
        ip(&[
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &agent_if,
        ])?;
        ip(&["link", "set", &agent_if, "netns", &ns.name])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/24", ns.host_ip),
            "dev",
            &ns.host_if,
        ])?;
        ip(&["link", "set", &ns.host_if, "up"])?;
        let inside = |args: &[&str]| {
            let mut a = vec!["netns", "exec", &ns.name, "ip"];
            a.extend_from_slice(args);
            ip(&a)
        };
        inside(&["addr", "add", &format!("10.77.{n}.2/24"), "dev", &agent_if])?;
        inside(&["link", "set", &agent_if, "up"])?;
        inside(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub(crate) fn link(&self, up: bool) {
        ip(&["link", "set", &self.host_if, if up { "up" } else { "down" }]).expect("set link");
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.host_if]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// Bytes of `line 0\n` up to `line {n-1}\n`.
fn bytes_of_lines(n: u64) -> u64 {
    (0..n).map(|i| format!("line {i}\n").len() as u64).sum()
}

#[test]
fn output_survives_a_network_cut_in_order_without_gaps_or_duplicates() {
    let netns = match NetNs::create() {
        Ok(ns) => Some(ns),
        Err(e) => {
            eprintln!("network namespaces unavailable ({e}); cutting with SIGSTOP/SIGCONT instead");
            None
        }
    };
    let (server, opts) = match &netns {
        Some(ns) => {
            eprintln!(
                "cutting the network: veth {} in namespace {}",
                ns.host_if, ns.name
            );
            (
                Server::start_on(&ns.host_ip, &[]),
                AgentOpts {
                    netns: Some(ns.name.clone()),
                    ..AgentOpts::default()
                },
            )
        }
        None => (Server::start(), AgentOpts::default()),
    };
    let agent = Agent::start_opts(&server, "cut", opts);
    let node = server.node_id("cut");
    let dir = server.scratch("netcut");
    let (progress, stop) = (dir.join("progress"), dir.join("stop"));
    // Numbered lines every 50 ms until told to stop (at most 2,000); the count is also kept in a file,
    // so the test knows lines were written during the cut.
    let script = format!(
        "i=0; while [ ! -e '{s}' ] && [ $i -lt 2000 ]; do echo \"line $i\"; i=$((i+1)); \
         echo $i > '{p}'; sleep 0.05; done",
        s = stop.display(),
        p = progress.display()
    );
    let id = server.send(&["--node", &node], &script);
    let lines_written = || {
        std::fs::read_to_string(&progress)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let stored = || {
        invocations(&server.command(&id))[0]["stdout_bytes"]
            .as_u64()
            .unwrap_or(0)
    };
    wait_until("some output to be stored", Duration::from_secs(20), || {
        (stored() > 0).then_some(())
    });

    let cut = |down: bool| match (&netns, down) {
        (Some(ns), down) => ns.link(!down),
        (None, true) => agent.stop(),
        (None, false) => agent.cont(),
    };
    cut(true);
    let at_cut = lines_written();
    server.wait_ping("cut", "ConnectionLost", Duration::from_secs(15));
    // Still cut: the command keeps writing while nothing reaches the server.
    wait_until(
        "the command to write during the cut",
        Duration::from_secs(10),
        || (lines_written() >= at_cut + 10).then_some(()),
    );
    let during = lines_written();
    cut(false);
    server.wait_online("cut");
    wait_until(
        "the lines written during the cut to be stored",
        Duration::from_secs(20),
        || (stored() >= bytes_of_lines(during)).then_some(()),
    );
    std::fs::write(&stop, b"").expect("create stop");

    let c = server.wait_terminal(&id, Duration::from_secs(30));
    assert_eq!(invocations(&c)[0]["status"], "Success", "{c}");
    let out = String::from_utf8(server.output(&id, &node)).expect("UTF-8 output");
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines.len() as u64 >= during,
        "{} lines < {during}",
        lines.len()
    );
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(
            *line,
            format!("line {i}"),
            "line {i} is wrong: gap, duplicate or reorder"
        );
    }
    assert!(out.ends_with('\n'));
    drop(agent);
    drop(server);
    drop(netns);
}
