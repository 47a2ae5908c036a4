//! Request members of the SSM operations (field docs: see the SSM model; names say it all) fleetrun serves (names and types as botocore's SSM model).
//! Responses are built as JSON in the operation modules so every member is present, as SSM sends them.

#![allow(missing_docs)]

use serde::Deserialize;
use std::collections::BTreeMap;

/// A `Target` of SendCommand.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Target {
    /// `InstanceIds`, `tag:<key>`, `tag-key`, `resource-groups:Name`...
    pub key: Option<String>,
    /// Values.
    #[serde(default)]
    pub values: Vec<String>,
}

/// SendCommand's input (members fleetrun ignores, such as DocumentHash, are left out).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct SendCommandRequest {
    pub instance_ids: Option<Vec<String>>,
    pub targets: Option<Vec<Target>>,
    pub document_name: Option<String>,
    pub document_version: Option<String>,
    pub timeout_seconds: Option<i64>,
    pub comment: Option<String>,
    pub parameters: Option<BTreeMap<String, Vec<String>>>,
    pub output_s3_region: Option<String>,
    pub output_s3_bucket_name: Option<String>,
    pub output_s3_key_prefix: Option<String>,
    pub max_concurrency: Option<String>,
    pub max_errors: Option<String>,
    pub service_role_arn: Option<String>,
    pub notification_config: Option<serde_json::Value>,
    pub cloud_watch_output_config: Option<serde_json::Value>,
}

/// A `CommandFilter` (lowercase member names, as in SSM's model).
#[derive(Debug, Deserialize)]
pub struct CommandFilter {
    pub key: String,
    pub value: String,
}

/// ListCommands' and ListCommandInvocations' input.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ListCommandsRequest {
    pub command_id: Option<String>,
    pub instance_id: Option<String>,
    pub max_results: Option<i64>,
    pub next_token: Option<String>,
    pub filters: Option<Vec<CommandFilter>>,
    #[serde(default)]
    pub details: bool,
}

/// GetCommandInvocation's input.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct GetCommandInvocationRequest {
    pub command_id: Option<String>,
    pub instance_id: Option<String>,
    pub plugin_name: Option<String>,
}

/// CancelCommand's input.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct CancelCommandRequest {
    pub command_id: Option<String>,
    pub instance_ids: Option<Vec<String>>,
}

/// DescribeInstanceInformation's `Filters` item.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct StringFilter {
    pub key: String,
    pub values: Vec<String>,
}

/// DescribeInstanceInformation's legacy `InstanceInformationFilterList` item.
#[derive(Debug, Deserialize)]
pub struct LegacyFilter {
    pub key: String,
    #[serde(rename = "valueSet")]
    pub value_set: Vec<String>,
}

/// DescribeInstanceInformation's input.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct DescribeInstanceInformationRequest {
    pub instance_information_filter_list: Option<Vec<LegacyFilter>>,
    pub filters: Option<Vec<StringFilter>>,
    pub max_results: Option<i64>,
    pub next_token: Option<String>,
}

/// CreateDocument's input (Attachments, Requires, TargetType and Tags are not supported).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct CreateDocumentRequest {
    pub content: Option<String>,
    pub name: Option<String>,
    pub display_name: Option<String>,
    pub version_name: Option<String>,
    pub document_type: Option<String>,
    pub document_format: Option<String>,
    pub target_type: Option<String>,
    pub requires: Option<serde_json::Value>,
    pub attachments: Option<serde_json::Value>,
    pub tags: Option<Vec<Tag>>,
}

/// GetDocument's and DescribeDocument's input.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct GetDocumentRequest {
    pub name: Option<String>,
    pub version_name: Option<String>,
    pub document_version: Option<String>,
    pub document_format: Option<String>,
}

/// A `DocumentKeyValuesFilter`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct DocumentKeyValuesFilter {
    pub key: Option<String>,
    #[serde(default)]
    pub values: Vec<String>,
}

/// A legacy `DocumentFilter` (lowercase member names, as in SSM's model).
#[derive(Debug, Deserialize)]
pub struct DocumentFilter {
    pub key: String,
    pub value: String,
}

/// ListDocuments' input.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ListDocumentsRequest {
    pub document_filter_list: Option<Vec<DocumentFilter>>,
    pub filters: Option<Vec<DocumentKeyValuesFilter>>,
    pub max_results: Option<i64>,
    pub next_token: Option<String>,
}

/// UpdateDocument's input.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct UpdateDocumentRequest {
    pub content: Option<String>,
    pub name: Option<String>,
    pub display_name: Option<String>,
    pub version_name: Option<String>,
    pub document_version: Option<String>,
    pub document_format: Option<String>,
    pub target_type: Option<String>,
    pub attachments: Option<serde_json::Value>,
}

/// ListDocumentVersions' input.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ListDocumentVersionsRequest {
    pub name: Option<String>,
    pub max_results: Option<i64>,
    pub next_token: Option<String>,
}

/// DeleteDocument's input.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct DeleteDocumentRequest {
    pub name: Option<String>,
    pub document_version: Option<String>,
    pub version_name: Option<String>,
    pub force: Option<bool>,
}

/// UpdateDocumentDefaultVersion's input.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct UpdateDocumentDefaultVersionRequest {
    pub name: Option<String>,
    pub document_version: Option<String>,
}

/// A `Tag`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Tag {
    pub key: Option<String>,
    pub value: Option<String>,
}

/// AddTagsToResource's input.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct AddTagsToResourceRequest {
    pub resource_type: Option<String>,
    pub resource_id: Option<String>,
    pub tags: Option<Vec<Tag>>,
}

/// RemoveTagsFromResource's input.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RemoveTagsFromResourceRequest {
    pub resource_type: Option<String>,
    pub resource_id: Option<String>,
    pub tag_keys: Option<Vec<String>>,
}

/// ListTagsForResource's input.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ListTagsForResourceRequest {
    pub resource_type: Option<String>,
    pub resource_id: Option<String>,
}

/// A `SessionFilter`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionFilter {
    pub key: Option<String>,
    pub value: Option<String>,
}

/// DescribeSessions' input.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct DescribeSessionsRequest {
    pub state: Option<String>,
    pub max_results: Option<i64>,
    pub next_token: Option<String>,
    pub filters: Option<Vec<SessionFilter>>,
}

/// StartSession's input.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct StartSessionRequest {
    pub target: Option<String>,
    pub document_name: Option<String>,
    pub reason: Option<String>,
    pub parameters: Option<BTreeMap<String, Vec<String>>>,
}

/// TerminateSession's input.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct TerminateSessionRequest {
    pub session_id: Option<String>,
}

/// CreateActivation's input.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct CreateActivationRequest {
    pub description: Option<String>,
    pub default_instance_name: Option<String>,
    pub iam_role: Option<String>,
    pub registration_limit: Option<i64>,
    /// Epoch seconds.
    pub expiration_date: Option<f64>,
    pub tags: Option<Vec<Tag>>,
    pub registration_metadata: Option<serde_json::Value>,
}

/// A `DescribeActivationsFilter`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct DescribeActivationsFilter {
    pub filter_key: Option<String>,
    #[serde(default)]
    pub filter_values: Vec<String>,
}

/// DescribeActivations' input.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct DescribeActivationsRequest {
    pub filters: Option<Vec<DescribeActivationsFilter>>,
    pub max_results: Option<i64>,
    pub next_token: Option<String>,
}

/// DeleteActivation's input.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct DeleteActivationRequest {
    pub activation_id: Option<String>,
}

/// DeregisterManagedInstance's input.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct DeregisterManagedInstanceRequest {
    pub instance_id: Option<String>,
}

/// PutParameter's input.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct PutParameterRequest {
    pub name: Option<String>,
    pub description: Option<String>,
    pub value: Option<String>,
    pub r#type: Option<String>,
    pub key_id: Option<String>,
    pub overwrite: Option<bool>,
    pub allowed_pattern: Option<String>,
    pub tags: Option<Vec<Tag>>,
    pub tier: Option<String>,
    pub policies: Option<String>,
    pub data_type: Option<String>,
}

/// GetParameter's input.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct GetParameterRequest {
    pub name: Option<String>,
    pub with_decryption: Option<bool>,
}

/// GetParameters' input.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct GetParametersRequest {
    pub names: Option<Vec<String>>,
    pub with_decryption: Option<bool>,
}

/// A `ParameterStringFilter`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ParameterStringFilter {
    pub key: String,
    pub option: Option<String>,
    pub values: Option<Vec<String>>,
}

/// GetParametersByPath's input.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct GetParametersByPathRequest {
    pub path: Option<String>,
    pub recursive: Option<bool>,
    pub parameter_filters: Option<Vec<ParameterStringFilter>>,
    pub with_decryption: Option<bool>,
    pub max_results: Option<i64>,
    pub next_token: Option<String>,
}

/// DeleteParameter's input.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct DeleteParameterRequest {
    pub name: Option<String>,
}

/// DeleteParameters' input.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct DeleteParametersRequest {
    pub names: Option<Vec<String>>,
}

/// DescribeParameters' older `Filters` item.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ParametersFilter {
    pub key: String,
    #[serde(default)]
    pub values: Vec<String>,
}

/// DescribeParameters' input.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct DescribeParametersRequest {
    pub filters: Option<Vec<ParametersFilter>>,
    pub parameter_filters: Option<Vec<ParameterStringFilter>>,
    pub max_results: Option<i64>,
    pub next_token: Option<String>,
    pub shared: Option<bool>,
}

/// GetParameterHistory's input.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct GetParameterHistoryRequest {
    pub name: Option<String>,
    pub with_decryption: Option<bool>,
    pub max_results: Option<i64>,
    pub next_token: Option<String>,
}
