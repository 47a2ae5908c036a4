//! The object-store settings of `fleetrun server`: where output, recordings and files go. Flags and
//! env first, then the config file's `[object_store]` table; the default is `DATA_DIR/objects`.

use anyhow::bail;
use fleetrun_server::objects::{ObjectStoreConfig, S3Config};
use serde::Deserialize;

/// Flags (and env) of the object store.
#[derive(Debug, Default, clap::Args)]
pub struct ObjectStoreArgs {
    /// Keep objects (output, recordings, files) in an S3-compatible bucket: s3://BUCKET[/PREFIX]
    /// [default: DATA_DIR/objects]
    #[arg(
        long = "object-store",
        env = "FLEETRUN_OBJECT_STORE",
        value_name = "URL"
    )]
    url: Option<String>,
    /// The S3-compatible store's URL, for stores other than AWS (else AWS_ENDPOINT_URL, else AWS)
    #[arg(long, env = "FLEETRUN_S3_ENDPOINT", value_name = "URL")]
    s3_endpoint: Option<String>,
    /// The bucket's region (else AWS_REGION, else us-east-1)
    #[arg(long, env = "FLEETRUN_S3_REGION", value_name = "REGION")]
    s3_region: Option<String>,
    /// Path-style requests (ENDPOINT/BUCKET/KEY), as most self-hosted stores need
    #[arg(long)]
    s3_path_style: bool,
    /// Allow a plain http:// endpoint (a store on loopback or a trusted network)
    #[arg(long)]
    s3_allow_http: bool,
}

/// The config file's `[object_store]` table. Credentials may be here (the file should then be
/// readable by the server's user only) or in the usual AWS variables.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectStoreFile {
    url: Option<String>,
    endpoint: Option<String>,
    region: Option<String>,
    path_style: Option<bool>,
    allow_http: Option<bool>,
    access_key_id: Option<String>,
    secret_access_key: Option<String>,
}

/// Flags > env > file > default.
pub fn resolve(
    args: ObjectStoreArgs,
    file: Option<ObjectStoreFile>,
) -> anyhow::Result<ObjectStoreConfig> {
    let file = file.unwrap_or_default();
    let Some(url) = args.url.or(file.url) else {
        let s3_only = args.s3_endpoint.is_some()
            || args.s3_region.is_some()
            || args.s3_path_style
            || args.s3_allow_http;
        if s3_only {
            bail!("the --s3-* settings need --object-store s3://BUCKET[/PREFIX]");
        }
        return Ok(ObjectStoreConfig::Local);
    };
    if url == "local" {
        return Ok(ObjectStoreConfig::Local);
    }
    let mut s3 = S3Config::from_url(url.trim()).map_err(|e| {
        anyhow::anyhow!("bad object store: {e} (give s3://BUCKET[/PREFIX], or local)")
    })?;
    s3.endpoint = args.s3_endpoint.or(file.endpoint);
    s3.region = args.s3_region.or(file.region);
    s3.path_style = args.s3_path_style || file.path_style.unwrap_or(false);
    s3.allow_http = args.s3_allow_http || file.allow_http.unwrap_or(false);
    s3.access_key_id = file.access_key_id;
    s3.secret_access_key = file.secret_access_key;
    if let Some(e) = &s3.endpoint {
        let plain = e.starts_with("http://");
        if !plain && !e.starts_with("https://") {
            bail!("bad S3 endpoint {e:?}: give an http:// or https:// URL");
        }
        if plain && !s3.allow_http {
            bail!("the S3 endpoint {e} is plain http: add --s3-allow-http if that is meant");
        }
    }
    if s3.access_key_id.is_some() != s3.secret_access_key.is_some() {
        bail!("[object_store] needs both access_key_id and secret_access_key, or neither");
    }
    Ok(ObjectStoreConfig::S3(s3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_then_file_then_local() {
        assert_eq!(
            resolve(ObjectStoreArgs::default(), None).unwrap(),
            ObjectStoreConfig::Local
        );
        let file: ObjectStoreFile = toml::from_str(
            "url = \"s3://out/fleet\"\nendpoint = \"http://127.0.0.1:9000\"\nallow_http = true\npath_style = true\naccess_key_id = \"k\"\nsecret_access_key = \"s\"\n",
        )
        .unwrap();
        let ObjectStoreConfig::S3(s3) = resolve(ObjectStoreArgs::default(), Some(file)).unwrap()
        else {
            panic!("s3 expected");
        };
        assert_eq!((s3.bucket.as_str(), s3.prefix.as_str()), ("out", "fleet"));
        assert!(s3.path_style && s3.allow_http);
        assert_eq!(s3.endpoint.as_deref(), Some("http://127.0.0.1:9000"));

        let flags = ObjectStoreArgs {
            url: Some("s3://other".into()),
            s3_endpoint: Some("http://127.0.0.1:1".into()),
            ..ObjectStoreArgs::default()
        };
        let e = resolve(flags, None).unwrap_err().to_string();
        assert!(e.contains("--s3-allow-http"), "{e}");
        let e = resolve(
            ObjectStoreArgs {
                s3_path_style: true,
                ..ObjectStoreArgs::default()
            },
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("need --object-store"), "{e}");
        let e = resolve(
            ObjectStoreArgs {
                url: Some("s3://NO".into()),
                ..ObjectStoreArgs::default()
            },
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("bad object store"), "{e}");
        assert!(toml::from_str::<ObjectStoreFile>("bucket = \"x\"").is_err());
    }
}
