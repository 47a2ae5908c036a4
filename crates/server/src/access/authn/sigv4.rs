//! AWS Signature Version 4 verification for the SSM-compatible API (service `ssm`, any region).
//!
//! The server rebuilds the canonical request from the headers the client says it signed, derives
//! the signing key from the access key's secret, and compares signatures in constant time. Requests
//! dated more than 15 minutes away from the server's clock are refused, as AWS does.

use crate::errors::Code;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use std::time::{Duration, SystemTime};

/// Largest clock difference accepted.
pub const MAX_SKEW: Duration = Duration::from_secs(15 * 60);

/// Why a signature was refused, with the AWS error code clients understand.
#[derive(Debug, PartialEq, Eq)]
pub struct SigError {
    /// The kind (`MissingAuthenticationToken`, `IncompleteSignature`, `InvalidSignature`).
    pub code: Code,
    /// What is wrong.
    pub message: String,
}

fn err(code: Code, message: impl Into<String>) -> SigError {
    SigError {
        code,
        message: message.into(),
    }
}

/// The parts of a request that are signed.
pub struct Request<'a> {
    /// HTTP method.
    pub method: &'a str,
    /// Path, e.g. `/`.
    pub path: &'a str,
    /// Raw query string (without `?`).
    pub query: &'a str,
    /// Headers as (lowercase name, value) pairs; repeated names appear more than once.
    pub headers: &'a [(String, String)],
    /// The body.
    pub body: &'a [u8],
}

/// A parsed `Authorization` header.
#[derive(Debug)]
pub struct Authorization {
    /// The access key id.
    pub access_key_id: String,
    date: String,
    region: String,
    service: String,
    signed_headers: Vec<String>,
    signature: String,
}

/// Parses `AWS4-HMAC-SHA256 Credential=AKID/DATE/REGION/SERVICE/aws4_request, SignedHeaders=a;b, Signature=hex`.
pub fn parse_authorization(value: Option<&str>) -> Result<Authorization, SigError> {
    let value = value.ok_or_else(|| {
        err(
            Code::MissingAuthenticationToken,
            "Missing Authentication Token",
        )
    })?;
    let rest = value.strip_prefix("AWS4-HMAC-SHA256 ").ok_or_else(|| {
        err(
            Code::IncompleteSignature,
            "Authorization header must use the AWS4-HMAC-SHA256 algorithm",
        )
    })?;
    let (mut credential, mut signed, mut signature) = (None, None, None);
    for part in rest.split(',') {
        let part = part.trim();
        if let Some(v) = part.strip_prefix("Credential=") {
            credential = Some(v);
        } else if let Some(v) = part.strip_prefix("SignedHeaders=") {
            signed = Some(v);
        } else if let Some(v) = part.strip_prefix("Signature=") {
            signature = Some(v);
        }
    }
    let incomplete = |what: &str| {
        err(
            Code::IncompleteSignature,
            format!("Authorization header requires '{what}' parameter"),
        )
    };
    let credential = credential.ok_or_else(|| incomplete("Credential"))?;
    let signed = signed.ok_or_else(|| incomplete("SignedHeaders"))?;
    let signature = signature.ok_or_else(|| incomplete("Signature"))?;
    let parts: Vec<&str> = credential.split('/').collect();
    let [akid, date, region, service, terminator] = parts[..] else {
        return Err(err(
            Code::IncompleteSignature,
            format!("Credential should be scoped to a valid region, not {credential:?}"),
        ));
    };
    if terminator != "aws4_request" || akid.is_empty() || date.len() != 8 {
        return Err(err(
            Code::IncompleteSignature,
            format!("Credential {credential:?} is malformed"),
        ));
    }
    Ok(Authorization {
        access_key_id: akid.to_owned(),
        date: date.to_owned(),
        region: region.to_owned(),
        service: service.to_owned(),
        signed_headers: signed.split(';').map(str::to_owned).collect(),
        signature: signature.to_owned(),
    })
}

/// Refuses a credential scoped to another service than the one the request is for (`ssm`, `ec2`
/// or `sts`: each door names its own).
pub fn check_service(auth: &Authorization, expected: &str) -> Result<(), SigError> {
    if auth.service != expected {
        return Err(err(
            Code::InvalidSignature,
            format!(
                "Credential should be scoped to correct service: '{expected}', not {:?}",
                auth.service
            ),
        ));
    }
    Ok(())
}

/// The service a credential is scoped to.
pub fn scoped_service(auth: &Authorization) -> &str {
    &auth.service
}

/// Verifies a request's signature with the access key's secret, at time `now`.
pub fn verify(
    auth: &Authorization,
    req: &Request<'_>,
    secret: &str,
    now: SystemTime,
) -> Result<(), SigError> {
    let amz_date = header(req, "x-amz-date").ok_or_else(|| {
        err(
            Code::IncompleteSignature,
            "Authorization header requires existence of either a 'X-Amz-Date' or a 'Date' header",
        )
    })?;
    let when = parse_amz_date(amz_date).ok_or_else(|| {
        err(
            Code::IncompleteSignature,
            format!("X-Amz-Date {amz_date:?} is not of the form YYYYMMDDTHHMMSSZ"),
        )
    })?;
    let skew = now
        .duration_since(when)
        .or_else(|_| when.duration_since(now))
        .unwrap_or_default();
    if skew > MAX_SKEW {
        let now_s = humantime::format_rfc3339_seconds(now);
        return Err(err(
            Code::InvalidSignature,
            format!(
                "Signature expired: {amz_date} is now earlier than {now_s} minus 15 min, or later than it plus 15 min"
            ),
        ));
    }
    if !amz_date.starts_with(&auth.date) {
        return Err(err(
            Code::InvalidSignature,
            "Date in Credential scope does not match YYYYMMDD from X-Amz-Date",
        ));
    }
    if !auth.signed_headers.iter().any(|h| h == "host") {
        return Err(err(
            Code::InvalidSignature,
            "'Host' must be a signed header",
        ));
    }
    let expected = signature(auth, amz_date, req, secret)?;
    if crate::access::secrets::hashes_equal(&expected, &auth.signature.to_ascii_lowercase()) {
        Ok(())
    } else {
        Err(err(
            Code::InvalidSignature,
            "The request signature we calculated does not match the signature you provided. Check your AWS Secret Access Key and signing method.",
        ))
    }
}

/// The hex signature of `req` under `auth`'s scope and signed headers.
fn signature(
    auth: &Authorization,
    amz_date: &str,
    req: &Request<'_>,
    secret: &str,
) -> Result<String, SigError> {
    let canonical = canonical_request(req, &auth.signed_headers)?;
    let scope = format!(
        "{}/{}/{}/aws4_request",
        auth.date, auth.region, auth.service
    );
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
        hex::encode(Sha256::digest(canonical.as_bytes()))
    );
    let mut key = hmac(format!("AWS4{secret}").as_bytes(), auth.date.as_bytes());
    for part in [auth.region.as_str(), auth.service.as_str(), "aws4_request"] {
        key = hmac(&key, part.as_bytes());
    }
    Ok(hex::encode(hmac(&key, string_to_sign.as_bytes())))
}

/// Signs `req` as an SSM client does: the `Authorization` header value for access key
/// `access_key_id` with `secret`, in `region`, over the headers named in `signed_headers` (which
/// must include `host`; `req` must carry `x-amz-date`). For tests and tools that talk to the SSM API
/// without an AWS SDK.
pub fn sign(
    access_key_id: &str,
    secret: &str,
    region: &str,
    req: &Request<'_>,
    signed_headers: &[&str],
) -> Result<String, SigError> {
    let amz_date = header(req, "x-amz-date")
        .ok_or_else(|| err(Code::IncompleteSignature, "no x-amz-date header"))?;
    let auth = Authorization {
        access_key_id: access_key_id.to_owned(),
        date: amz_date.get(..8).unwrap_or_default().to_owned(),
        region: region.to_owned(),
        service: "ssm".to_owned(),
        signed_headers: signed_headers.iter().map(|h| (*h).to_owned()).collect(),
        signature: String::new(),
    };
    let sig = signature(&auth, amz_date, req, secret)?;
    Ok(format!(
        "AWS4-HMAC-SHA256 Credential={access_key_id}/{}/{region}/ssm/aws4_request, SignedHeaders={}, Signature={sig}",
        auth.date,
        signed_headers.join(";"),
    ))
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    // HMAC accepts keys of any length, so construction cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

fn header<'a>(req: &'a Request<'_>, name: &str) -> Option<&'a str> {
    req.headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

fn canonical_request(req: &Request<'_>, signed: &[String]) -> Result<String, SigError> {
    let mut out = String::with_capacity(256);
    out.push_str(req.method);
    out.push('\n');
    out.push_str(if req.path.is_empty() { "/" } else { req.path });
    out.push('\n');
    out.push_str(&canonical_query(req.query));
    out.push('\n');
    for name in signed {
        let values: Vec<String> = req
            .headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect();
        if values.is_empty() {
            return Err(err(
                Code::InvalidSignature,
                format!("signed header {name:?} is missing from the request"),
            ));
        }
        out.push_str(name);
        out.push(':');
        out.push_str(&values.join(","));
        out.push('\n');
    }
    out.push('\n');
    out.push_str(&signed.join(";"));
    out.push('\n');
    out.push_str(&payload_hash(req)?);
    Ok(out)
}

/// The payload hash of the canonical request: always the SHA-256 of the body actually received,
/// so a signature covers the body. A client's `x-amz-content-sha256` header, when present, must
/// say the same; `UNSIGNED-PAYLOAD` (and the streaming forms) are refused: the SSM API never
/// needs them, and they would let a signed request carry any body.
fn payload_hash(req: &Request<'_>) -> Result<String, SigError> {
    let computed = hex::encode(Sha256::digest(req.body));
    let claimed: Vec<&str> = req
        .headers
        .iter()
        .filter(|(n, _)| n == "x-amz-content-sha256")
        .map(|(_, v)| v.trim())
        .collect();
    for claimed in claimed {
        if claimed == UNSIGNED_PAYLOAD || claimed.starts_with("STREAMING-") {
            return Err(err(
                Code::InvalidSignature,
                format!(
                    "x-amz-content-sha256 {claimed:?} is not accepted: the SSM API signs the payload; send the hex SHA-256 of the body, or no such header"
                ),
            ));
        }
        if !claimed.eq_ignore_ascii_case(&computed) {
            return Err(err(
                Code::InvalidSignature,
                "The provided 'x-amz-content-sha256' header does not match what was computed: it must be the hex SHA-256 of the request body.",
            ));
        }
    }
    Ok(computed)
}

/// The `x-amz-content-sha256` value of a request whose body is not signed (refused).
pub const UNSIGNED_PAYLOAD: &str = "UNSIGNED-PAYLOAD";

fn canonical_query(query: &str) -> String {
    let mut pairs: Vec<(&str, &str)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
        .collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// Parses `YYYYMMDDTHHMMSSZ`.
fn parse_amz_date(s: &str) -> Option<SystemTime> {
    // ASCII only: the slices below must fall on character boundaries.
    if s.len() != 16 || !s.is_ascii() || s.as_bytes()[8] != b'T' || !s.ends_with('Z') {
        return None;
    }
    let rfc = format!(
        "{}-{}-{}T{}:{}:{}Z",
        &s[0..4],
        &s[4..6],
        &s[6..8],
        &s[9..11],
        &s[11..13],
        &s[13..15]
    );
    humantime::parse_rfc3339(&rfc).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    // The example of AWS's SigV4 test suite ("get-vanilla"), with its published signature.
    #[test]
    fn verifies_the_aws_test_suite_example() {
        let headers = vec![
            ("host".to_owned(), "example.amazonaws.com".to_owned()),
            ("x-amz-date".to_owned(), "20150830T123600Z".to_owned()),
        ];
        let req = Request {
            method: "GET",
            path: "/",
            query: "",
            headers: &headers,
            body: b"",
        };
        let auth = parse_authorization(Some(
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, SignedHeaders=host;x-amz-date, Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
        ))
        .unwrap();
        // The suite signs for service "service"; each door accepts its own service only.
        assert_eq!(
            check_service(&auth, "ssm").unwrap_err().code,
            Code::InvalidSignature
        );
        assert_eq!(check_service(&auth, "service"), Ok(()));
        let mut auth = parse_authorization(Some(
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/ssm/aws4_request, SignedHeaders=host;x-amz-date, Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
        ))
        .unwrap();
        auth.service = "service".into();
        let at = parse_amz_date("20150830T123600Z").unwrap();
        let secret = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
        assert_eq!(verify(&auth, &req, secret, at), Ok(()));
        assert_eq!(
            verify(&auth, &req, "wrong", at).unwrap_err().code,
            Code::InvalidSignature
        );
        let late = at + Duration::from_secs(16 * 60);
        assert!(
            verify(&auth, &req, secret, late)
                .unwrap_err()
                .message
                .starts_with("Signature expired")
        );
    }

    #[test]
    fn malformed_headers_are_named() {
        assert_eq!(
            parse_authorization(None).unwrap_err().code,
            Code::MissingAuthenticationToken
        );
        assert_eq!(
            parse_authorization(Some("Bearer x")).unwrap_err().code,
            Code::IncompleteSignature
        );
        let e = parse_authorization(Some("AWS4-HMAC-SHA256 Credential=a/b/c/ssm/aws4_request"))
            .unwrap_err();
        assert_eq!(e.code, Code::IncompleteSignature);
    }

    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
    const AT: &str = "20260101T120000Z";

    fn headers(body_hash: Option<&str>) -> Vec<(String, String)> {
        let mut h = vec![
            ("host".to_owned(), "fleetrun.example:8443".to_owned()),
            ("x-amz-date".to_owned(), AT.to_owned()),
            (
                "x-amz-target".to_owned(),
                "AmazonSSM.SendCommand".to_owned(),
            ),
        ];
        if let Some(hash) = body_hash {
            h.push(("x-amz-content-sha256".to_owned(), hash.to_owned()));
        }
        h
    }

    fn request<'a>(headers: &'a [(String, String)], body: &'a [u8]) -> Request<'a> {
        Request {
            method: "POST",
            path: "/",
            query: "",
            headers,
            body,
        }
    }

    const SIGNED: &[&str] = &["host", "x-amz-date", "x-amz-target"];

    /// Signs `body` (with or without an x-amz-content-sha256 header) and verifies `sent` under it.
    fn check(body: &[u8], sent: &[u8], with_header: bool) -> Result<(), SigError> {
        let hash = hex::encode(Sha256::digest(body));
        let signed_headers = headers(with_header.then_some(hash.as_str()));
        let mut names = SIGNED.to_vec();
        if with_header {
            names.push("x-amz-content-sha256");
        }
        let value = sign(
            "AKIDTEST",
            SECRET,
            "eu-west-1",
            &request(&signed_headers, body),
            &names,
        )?;
        let auth = parse_authorization(Some(&value))?;
        let at = parse_amz_date(AT).unwrap();
        verify(&auth, &request(&signed_headers, sent), SECRET, at)
    }

    // Fails before the fix: the payload hash came from the client's header, so a request signed over
    // body A verified with body B as long as the header still said hash(A).
    #[test]
    fn a_signature_covers_the_body_received() {
        let a = br#"{"DocumentName":"AWS-RunShellScript","Parameters":{"commands":["uptime"]}}"#;
        let b = br#"{"DocumentName":"AWS-RunShellScript","Parameters":{"commands":["rm -rf /"]}}"#;
        assert_eq!(check(a, a, true), Ok(()));
        assert_eq!(check(a, a, false), Ok(()));
        let swapped = check(a, b, true).unwrap_err();
        assert_eq!(swapped.code, Code::InvalidSignature);
        assert!(
            swapped.message.contains("x-amz-content-sha256"),
            "{}",
            swapped.message
        );
        let swapped = check(a, b, false).unwrap_err();
        assert_eq!(swapped.code, Code::InvalidSignature);
        assert!(swapped.message.contains("signature"), "{}", swapped.message);
    }

    #[test]
    fn unsigned_payload_is_refused() {
        let body = b"{}";
        for claimed in [UNSIGNED_PAYLOAD, "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"] {
            let h = headers(Some(claimed));
            let names = [SIGNED, &["x-amz-content-sha256"]].concat();
            let value = sign("AKIDTEST", SECRET, "eu-west-1", &request(&h, body), &names);
            // Even signing refuses to build the canonical request.
            let e = value.unwrap_err();
            assert_eq!(e.code, Code::InvalidSignature);
            assert!(e.message.contains(claimed), "{}", e.message);
        }
    }

    #[test]
    fn a_non_ascii_date_is_refused_not_a_panic() {
        assert_eq!(parse_amz_date("2026é101T120000Z"), None);
        assert_eq!(parse_amz_date("20260101T12000éZ"), None);
        assert!(parse_amz_date(AT).is_some());
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        fn header_pairs() -> impl Strategy<Value = Vec<(String, String)>> {
            let name = prop_oneof![
                Just("host".to_owned()),
                Just("x-amz-date".to_owned()),
                Just("x-amz-content-sha256".to_owned()),
                Just("authorization".to_owned()),
                "[a-z-]{1,12}",
            ];
            proptest::collection::vec((name, any::<String>()), 0..8)
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

            // Arbitrary Authorization values, headers and bodies are refused or verified, never a panic.
            #[test]
            fn arbitrary_requests_never_panic(
                value in prop_oneof![
                    any::<String>(),
                    "AWS4-HMAC-SHA256 .{0,200}",
                    "AWS4-HMAC-SHA256 Credential=[A-Z0-9]{0,20}/[0-9]{0,9}/[a-z0-9-]{0,12}/(ssm|s3)/aws4_request, SignedHeaders=[a-z;-]{0,40}, Signature=[0-9a-f]{0,64}",
                ],
                headers in header_pairs(),
                body in proptest::collection::vec(any::<u8>(), 0..256),
                secs in 0u64..4_000_000_000,
            ) {
                let now = SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
                if let Ok(auth) = parse_authorization(Some(&value)) {
                    let _ = verify(&auth, &request(&headers, &body), SECRET, now);
                }
            }

            // A valid signature over a body verifies that body and no other.
            #[test]
            fn a_valid_signature_over_a_mutated_body_never_verifies(
                body in proptest::collection::vec(any::<u8>(), 0..512),
                flip in any::<proptest::sample::Index>(),
                bit in 0u8..8,
                extra in proptest::collection::vec(any::<u8>(), 0..4),
                with_header in any::<bool>(),
            ) {
                prop_assert_eq!(check(&body, &body, with_header), Ok(()));
                let mut mutated = body.clone();
                if mutated.is_empty() || !extra.is_empty() {
                    mutated.extend_from_slice(if extra.is_empty() { b"x" } else { &extra });
                } else {
                    let i = flip.index(mutated.len());
                    mutated[i] ^= 1 << bit;
                }
                let refused = check(&body, &mutated, with_header).unwrap_err();
                prop_assert_eq!(refused.code, Code::InvalidSignature);
            }
        }
    }
}
