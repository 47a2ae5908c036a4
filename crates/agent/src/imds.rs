//! Is this node an EC2 instance? Asks the instance metadata service (IMDSv2: a session token from
//! `PUT /latest/api/token`, then `GET /latest/meta-data/instance-id` with it) for the instance id an
//! EC2 node registers under, as SSM's agent does.
//!
//! The whole exchange has one short budget ([`IMDS_BUDGET`]), so a machine that is not on EC2
//! (nothing answers, or something answers slowly or wrongly) registers with a server-made `mi-` id
//! at once. It runs only when the agent registers, never once it has an identity.
//!
//! IMDS is plain HTTP on a link-local address, two requests per registration: a minimal HTTP/1.1
//! client over a `TcpStream` (`Connection: close`, `Content-Length` or read to the end, a size
//! limit) does it without an HTTP client crate in the agent.

use fleetrun_proto::NodeId;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Where IMDS answers on EC2.
pub const IMDS_ENDPOINT_DEFAULT: &str = "http://169.254.169.254";
/// The time the whole lookup may take (both requests).
pub const IMDS_BUDGET: Duration = Duration::from_secs(1);
/// The session token's lifetime asked for: it is used at once, once.
const TOKEN_TTL_SECS: &str = "60";
/// Longest answer read (headers and body): an instance id or a token is far shorter.
const ANSWER_MAX: u64 = 8 * 1024;
/// Longest session token accepted (AWS's are 56 characters).
const TOKEN_MAX: usize = 512;

/// The `HOST[:PORT]` of an `http://HOST[:PORT][/]` endpoint, the only form IMDS has.
pub fn authority(endpoint: &str) -> Result<String, String> {
    let rest = endpoint
        .trim()
        .strip_prefix("http://")
        .ok_or_else(|| format!("IMDS endpoint {endpoint:?} must start with http://"))?;
    let host = rest.strip_suffix('/').unwrap_or(rest);
    let ok = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b));
    if !ok {
        return Err(format!(
            "IMDS endpoint {endpoint:?} must be http://HOST[:PORT] (e.g. {IMDS_ENDPOINT_DEFAULT})"
        ));
    }
    Ok(if host.ends_with(']') || !host.contains(':') {
        format!("{host}:80")
    } else {
        host.to_owned()
    })
}

/// The instance id IMDS at `endpoint` gives, within `budget`; an error says why there is none.
pub async fn instance_id(endpoint: &str, budget: Duration) -> Result<NodeId, String> {
    let authority = authority(endpoint)?;
    let lookup = async {
        let ttl = [("X-aws-ec2-metadata-token-ttl-seconds", TOKEN_TTL_SECS)];
        let token = request(&authority, "PUT", "/latest/api/token", &ttl).await?;
        let token = token.trim();
        let printable = token.bytes().all(|b| b.is_ascii_graphic());
        if token.is_empty() || token.len() > TOKEN_MAX || !printable {
            return Err("the session token is empty, too long or not printable".to_owned());
        }
        let auth = [("X-aws-ec2-metadata-token", token)];
        let id = request(&authority, "GET", "/latest/meta-data/instance-id", &auth).await?;
        NodeId::ec2(id.trim()).map_err(|e| e.to_string())
    };
    match tokio::time::timeout(budget, lookup).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "no answer within {}",
            humantime::format_duration(budget)
        )),
    }
}

/// One request; the body of a 200 answer.
async fn request(
    authority: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<String, String> {
    let mut conn = TcpStream::connect(authority)
        .await
        .map_err(|e| format!("connect to {authority}: {e}"))?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {authority}\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("Content-Length: 0\r\nConnection: close\r\n\r\n");
    conn.write_all(head.as_bytes())
        .await
        .map_err(|e| format!("{method} {path}: {e}"))?;
    let mut answer = Vec::new();
    conn.take(ANSWER_MAX)
        .read_to_end(&mut answer)
        .await
        .map_err(|e| format!("{method} {path}: {e}"))?;
    parse_answer(&answer).map_err(|e| format!("{method} {path}: {e}"))
}

/// The body of a complete `200` HTTP/1.1 answer (by `Content-Length`, else to the end).
fn parse_answer(answer: &[u8]) -> Result<String, String> {
    let text = std::str::from_utf8(answer).map_err(|_| "the answer is not UTF-8".to_owned())?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| "the answer has no complete head".to_owned())?;
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or_default();
    let code = status.split(' ').nth(1).unwrap_or_default();
    if !status.starts_with("HTTP/1.") || code != "200" {
        let shown: String = status.chars().take(80).collect();
        return Err(format!("answered {shown:?}"));
    }
    let mut length = None;
    for line in lines {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        if k.eq_ignore_ascii_case("transfer-encoding") {
            return Err("a chunked answer (IMDS sends a length)".to_owned());
        }
        if k.eq_ignore_ascii_case("content-length") {
            length = Some(
                v.trim()
                    .parse::<usize>()
                    .map_err(|_| "a bad Content-Length".to_owned())?,
            );
        }
    }
    match length {
        Some(n) if n <= body.len() => Ok(body[..n].to_owned()),
        Some(_) => Err("the answer ends before its Content-Length".to_owned()),
        None => Ok(body.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_plain_http_authorities() {
        assert_eq!(
            authority(IMDS_ENDPOINT_DEFAULT).unwrap(),
            "169.254.169.254:80"
        );
        assert_eq!(authority("http://127.0.0.1:9/").unwrap(), "127.0.0.1:9");
        assert_eq!(
            authority("http://[fd00:ec2::254]").unwrap(),
            "[fd00:ec2::254]:80"
        );
        for bad in [
            "https://169.254.169.254",
            "169.254.169.254",
            "http://",
            "http://h/x",
        ] {
            assert!(authority(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn answers_are_read_by_status_and_length() {
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 19\r\n\r\ni-0123456789abcdef0";
        assert_eq!(parse_answer(ok).unwrap(), "i-0123456789abcdef0");
        let no_length = b"HTTP/1.0 200 OK\r\n\r\ntoken";
        assert_eq!(parse_answer(no_length).unwrap(), "token");
        for bad in [
            &b"HTTP/1.1 401 Unauthorized\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\nshort",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello",
            b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            b"garbage",
            b"\xff\xfe",
        ] {
            assert!(parse_answer(bad).is_err(), "{bad:?}");
        }
    }
}
