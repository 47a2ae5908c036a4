//! STS: GetCallerIdentity, naming the fleetrun user the access key belongs to.

use super::xml::{DECLARATION, el};
use super::{Params, QueryResult};
use crate::AppState;
use crate::access::authz::Principal;
use crate::errors::{Code, Error};
use std::sync::Arc;

/// STS's XML namespace.
pub const XMLNS: &str = "https://sts.amazonaws.com/doc/2011-06-15/";

pub async fn dispatch(
    state: &Arc<AppState>,
    p: &Principal,
    action: &str,
    _params: &Params,
) -> QueryResult {
    match action {
        "GetCallerIdentity" => {
            // About the caller only: allowed for every authenticated principal.
            state.authz.self_service(p);
            let request_id = uuid::Uuid::new_v4();
            Ok(format!(
                "{DECLARATION}<GetCallerIdentityResponse xmlns=\"{XMLNS}\"><GetCallerIdentityResult>{}{}{}</GetCallerIdentityResult><ResponseMetadata>{}</ResponseMetadata></GetCallerIdentityResponse>",
                el("Arn", &crate::ssm::owner_arn(p.name())),
                el("UserId", p.name()),
                el("Account", crate::run::document::OWNER_SELF),
                el("RequestId", &request_id.to_string()),
            ))
        }
        "" => Err(Error::new(
            Code::InvalidRequest,
            "the request names no Action",
        )),
        other => Err(Error::new(
            Code::UnknownOperation,
            format!("STS action {other:.64} is not supported by fleetrun (only GetCallerIdentity)"),
        )),
    }
}
