//! Facts about this machine that the agent reports on every connect ([`NodeInfo`]).

use fleetrun_proto::channel::NodeInfo;
use fleetrun_proto::version::FLEETRUN_VERSION;
use std::net::IpAddr;

/// Gathers the node's facts; `name` overrides the display name (default: the hostname).
pub fn node_info(name: Option<&str>) -> NodeInfo {
    let hostname = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".to_owned());
    NodeInfo {
        name: name.map(str::to_owned).unwrap_or_else(|| hostname.clone()),
        hostname,
        os: os_name(),
        arch: std::env::consts::ARCH.to_owned(),
        ips: ip_addresses(),
        agent_version: FLEETRUN_VERSION.to_owned(),
    }
}

/// `PRETTY_NAME` from /etc/os-release, else "Linux".
fn os_name() -> String {
    std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|text| pretty_name(&text))
        .unwrap_or_else(|| "Linux".to_owned())
}

fn pretty_name(os_release: &str) -> Option<String> {
    os_release.lines().find_map(|line| {
        let value = line.trim().strip_prefix("PRETTY_NAME=")?;
        let value = value.trim().trim_matches(|c| c == '"' || c == '\'');
        (!value.is_empty()).then(|| value.to_owned())
    })
}

/// Non-loopback, non-link-local addresses of the machine's interfaces, without duplicates.
fn ip_addresses() -> Vec<String> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    let mut ips: Vec<IpAddr> = Vec::new();
    for ifa in addrs {
        let Some(addr) = ifa.address else { continue };
        let ip = if let Some(v4) = addr.as_sockaddr_in() {
            IpAddr::V4(v4.ip())
        } else if let Some(v6) = addr.as_sockaddr_in6() {
            IpAddr::V6(v6.ip())
        } else {
            continue;
        };
        let link_local = match ip {
            IpAddr::V4(v4) => v4.is_link_local(),
            IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
        };
        if !ip.is_loopback() && !ip.is_unspecified() && !link_local && !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    ips.iter().map(IpAddr::to_string).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pretty_name_is_unquoted() {
        let text = "NAME=\"Debian GNU/Linux\"\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\n";
        assert_eq!(
            pretty_name(text).as_deref(),
            Some("Debian GNU/Linux 12 (bookworm)")
        );
        assert_eq!(pretty_name("ID=x\n"), None);
    }

    #[test]
    fn node_info_is_filled_in() {
        let info = node_info(Some("web-1"));
        assert_eq!(info.name, "web-1");
        assert!(!info.hostname.is_empty());
        assert!(!info.os.is_empty());
        assert_eq!(info.agent_version, FLEETRUN_VERSION);
        assert!(info.ips.iter().all(|ip| ip != "127.0.0.1" && ip != "::1"));
    }
}
