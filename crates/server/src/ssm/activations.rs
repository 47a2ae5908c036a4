//! CreateActivation, DescribeActivations, DeleteActivation, DeregisterManagedInstance: hybrid
//! activations and node lifecycle, over the native activations and deregistration
//! (`crate::api::activations`, `crate::api::nodes`). An activation's id and code are what
//! `fleetrun-agent --activation-id ID --activation-code CODE` registers with.

use super::shapes::*;
use super::{SsmError, SsmResult, check_max_results, epoch, next_token, parse_token};
use crate::AppState;
use crate::access::authz::{Action, Principal, Resource};
use crate::api::{activations, nodes};
use crate::errors::Code;
use fleetrun_proto::NodeId;
use fleetrun_proto::api::{Activation, CreateActivation};
use fleetrun_proto::time::{now_ms, parse_rfc3339_ms};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;

fn shape(a: &Activation) -> Value {
    let mut v = json!({
        "ActivationId": a.activation_id,
        "Description": a.description,
        "RegistrationLimit": a.limit,
        "RegistrationsCount": a.registrations,
        "ExpirationDate": epoch(parse_rfc3339_ms(&a.expires_at)),
        "Expired": a.expired,
        "CreatedDate": epoch(parse_rfc3339_ms(&a.created_at)),
        "Tags": a.tags.iter().map(|(k, v)| json!({"Key": k, "Value": v})).collect::<Vec<_>>(),
    });
    if !a.default_instance_name.is_empty() {
        v["DefaultInstanceName"] = json!(a.default_instance_name);
    }
    if !a.iam_role.is_empty() {
        v["IamRole"] = json!(a.iam_role);
    }
    v
}

pub async fn create_activation(
    state: &Arc<AppState>,
    p: &Principal,
    req: CreateActivationRequest,
) -> SsmResult {
    let iam_role = req.iam_role.ok_or_else(|| {
        SsmError::validation(
            "1 validation error detected: Value null at 'iamRole' failed to satisfy constraint: Member must not be null",
        )
    })?;
    if req.registration_metadata.is_some() {
        return Err(SsmError::new(
            Code::InvalidParameters,
            "RegistrationMetadata is not supported by fleetrun.",
        ));
    }
    let limit = match req.registration_limit {
        None => None,
        Some(n @ 1..=1000) => Some(n as u64),
        Some(n) => {
            return Err(SsmError::validation(format!(
                "1 validation error detected: Value '{n}' at 'registrationLimit' failed to satisfy constraint: Member must have value between 1 and 1000"
            )));
        }
    };
    let expires_in_secs = match req.expiration_date {
        None => None,
        Some(at) => {
            let secs = (at - now_ms() as f64 / 1000.0).ceil();
            if !secs.is_finite() || secs < 1.0 {
                return Err(SsmError::new(
                    Code::InvalidParameters,
                    "ExpirationDate must be in the future.",
                ));
            }
            Some(secs as u64)
        }
    };
    let mut tags = BTreeMap::new();
    for t in req.tags.unwrap_or_default() {
        let key = t.key.unwrap_or_default();
        tags.insert(key, t.value.unwrap_or_default());
    }
    let a = activations::create_activation(
        state,
        p,
        CreateActivation {
            tags,
            limit,
            expires_in_secs,
            description: req.description.unwrap_or_default(),
            default_instance_name: req.default_instance_name.unwrap_or_default(),
        },
        &iam_role,
    )
    .await
    .map_err(|e| {
        // SSM's CreateActivation answers every bad member as InvalidParameters.
        if matches!(e.code(), Code::InvalidTag) {
            SsmError::new(Code::InvalidParameters, e.error.message)
        } else {
            e
        }
    })?;
    Ok(json!({ "ActivationId": a.activation_id, "ActivationCode": a.code }))
}

pub async fn describe_activations(
    state: &Arc<AppState>,
    p: &Principal,
    req: DescribeActivationsRequest,
) -> SsmResult {
    state
        .authz
        .require(p, Action::ManageActivations, Resource::Fleet)?;
    let limit = check_max_results(req.max_results, 1, 50, 50)?;
    let offset = parse_token(req.next_token.as_deref())?;
    let filters = req.filters.unwrap_or_default();
    if filters.len() > 10 {
        return Err(SsmError::new(
            Code::InvalidFilter,
            "At most 10 filters are taken.",
        ));
    }
    let mut matching: Vec<Activation> = Vec::new();
    'each: for a in state.store.list_activations().await? {
        for f in &filters {
            let field = match f.filter_key.as_deref() {
                Some("ActivationIds") => &a.activation_id,
                Some("DefaultInstanceName") => &a.default_instance_name,
                Some("IamRole") => &a.iam_role,
                other => {
                    return Err(SsmError::new(
                        Code::InvalidFilter,
                        format!("Filter key {} is not valid.", other.unwrap_or("(none)")),
                    ));
                }
            };
            if !f.filter_values.iter().any(|v| v == field) {
                continue 'each;
            }
        }
        matching.push(a);
    }
    let page: Vec<Value> = matching
        .iter()
        .skip(offset as usize)
        .take(limit as usize)
        .map(shape)
        .collect();
    let mut out = json!({ "ActivationList": page });
    let token = next_token(offset, page.len(), limit);
    if !token.is_null() && (offset as usize + page.len()) < matching.len() {
        out["NextToken"] = token;
    }
    Ok(out)
}

pub async fn delete_activation(
    state: &Arc<AppState>,
    p: &Principal,
    req: DeleteActivationRequest,
) -> SsmResult {
    let id = req.activation_id.ok_or_else(|| {
        SsmError::validation(
            "1 validation error detected: Value null at 'activationId' failed to satisfy constraint: Member must not be null",
        )
    })?;
    activations::delete_activation(state, p, &id).await?;
    Ok(json!({}))
}

pub async fn deregister_managed_instance(
    state: &Arc<AppState>,
    p: &Principal,
    req: DeregisterManagedInstanceRequest,
) -> SsmResult {
    let id = req.instance_id.ok_or_else(|| {
        SsmError::validation(
            "1 validation error detected: Value null at 'instanceId' failed to satisfy constraint: Member must not be null",
        )
    })?;
    let id: NodeId = id.parse().map_err(|_| {
        SsmError::new(
            Code::InvalidNodeId,
            format!("Instance id {id:.64} is not valid."),
        )
    })?;
    // SSM deregisters managed (mi-) instances only; an EC2 instance leaves by being terminated.
    // The native API (`fleetrun nodes deregister`) still removes one.
    if id.is_ec2() {
        return Err(SsmError::new(
            Code::InvalidNodeId,
            format!(
                "Instance id {id} is an EC2 instance: DeregisterManagedInstance takes managed instances (mi-) only"
            ),
        ));
    }
    nodes::deregister_node(state, p, &id).await?;
    Ok(json!({}))
}
