//! Authorization: the one place that decides whether a principal may do an action on a resource.
//!
//! Permissions are Cedar policies (cedar-policy). A user's policy set is its role's built-in policies
//! ([`ROLE_POLICIES`]) plus its own (`users.policy`), so a policy file written for one user, with an
//! unconstrained `principal`, speaks of that user only. Nodes are resources whose Cedar entity tags
//! are the node's tags, so `resource.hasTag("env") && resource.getTag("env") == "dev"` limits a user
//! to a team's nodes. Nothing is allowed unless a policy permits it and none forbids it.
//!
//! Every authenticated request carries a [`Principal`]; handlers of both APIs ask [`Authz`] before
//! they act or answer, and the native API's middleware turns a successful answer from a handler that
//! never asked into a 403 (deny by default, even for a route that forgot).

use cedar_policy::{
    Authorizer, Context, Decision, Entities, Entity, EntityId, EntityTypeName, EntityUid,
    PolicySet, Request, RestrictedExpression, Schema, ValidationMode, Validator,
};
use fleetrun_proto::{CommandId, NodeId};
pub use fleetrun_store::NodeRef;
use fleetrun_store::{Store, StoreError, UserRow};
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Entity types and actions policies may name. `fleetrun policies validate` checks files against it.
pub const SCHEMA: &str = r#"
entity Role;
entity User in [Role] { role: String };
entity Node { name: String } tags String;
entity Document { name: String };
entity Parameter { name: String };
entity Object { name: String };
entity Script { name: String };
entity Fleet;
action "list" appliesTo { principal: [User], resource: [Node, Document, Fleet] };
action "send-command", "cancel", "read-output", "shell", "cp", "manage-nodes", "terminate-session",
    "port-forward", "port-forward-remote"
    appliesTo { principal: [User], resource: [Node] };
action "manage-documents" appliesTo { principal: [User], resource: [Document] };
action "read-objects", "write-objects" appliesTo { principal: [User], resource: [Object] };
action "read-scripts", "manage-scripts" appliesTo { principal: [User], resource: [Script] };
action "use-param" appliesTo { principal: [User], resource: [Parameter] };
action "manage-users", "manage-activations", "manage-access-keys", "manage-params", "read-audit"
    appliesTo { principal: [User], resource: [Fleet] };
"#;

/// The built-in roles, as policies. They never look at a resource's attributes or tags, which lets
/// [`Authz`] decide for a user without policies of its own once per action and resource type.
pub const ROLE_POLICIES: &str = r#"
// admin: everything.
permit (principal in Role::"admin", action, resource);

// operator: run, cancel and read commands on every node, open shells, forward ports (to the node
// and beyond it: a shell reaches as far) and copy files, manage documents, parameters and objects
// and use them in scripts, read and manage saved scripts. Not users, activations, access keys, node removal or the audit trail.
permit (
    principal in Role::"operator",
    action in [Action::"list", Action::"send-command", Action::"cancel", Action::"read-output",
               Action::"shell", Action::"cp", Action::"manage-documents", Action::"manage-params",
               Action::"use-param", Action::"read-objects", Action::"write-objects",
               Action::"read-scripts", Action::"manage-scripts",
               Action::"port-forward", Action::"port-forward-remote"],
    resource
);

// viewer: read nodes, commands, their output, documents and saved scripts.
permit (
    principal in Role::"viewer",
    action in [Action::"list", Action::"read-output", Action::"read-scripts"],
    resource
);
"#;

/// What a principal wants to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// See nodes, documents, commands, parameters, storage figures.
    List,
    /// Run a command on a node.
    SendCommand,
    /// Cancel a command on a node.
    Cancel,
    /// Read a command's invocation and output on a node.
    ReadOutput,
    /// Open a shell on a node.
    Shell,
    /// Copy files to or from a node.
    Cp,
    /// Forward TCP connections to a port on the node itself (its loopback).
    PortForward,
    /// Forward TCP connections through a node to another host (on top of `PortForward`).
    PortForwardRemote,
    /// End another's (or one's own) session on a node.
    TerminateSession,
    /// Deregister a node.
    ManageNodes,
    /// Create, change and delete documents.
    ManageDocuments,
    /// Create, change and delete users and their tokens.
    ManageUsers,
    /// Create activation codes (enrol nodes).
    ManageActivations,
    /// Create SigV4 access keys for any user.
    ManageAccessKeys,
    /// Create, change and delete parameters.
    ManageParams,
    /// Reference a parameter (`{{param:NAME}}`) in a script sent to nodes.
    UseParam,
    /// Read and verify the audit trail.
    ReadAudit,
    /// Read (download, list) objects kept for users.
    ReadObjects,
    /// Write (upload, replace, delete) objects kept for users.
    WriteObjects,
    /// List and show saved scripts.
    ReadScripts,
    /// Create, update and delete saved scripts.
    ManageScripts,
}

impl Action {
    /// The action's name in policies (`Action::"send-command"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Action::List => "list",
            Action::SendCommand => "send-command",
            Action::Cancel => "cancel",
            Action::ReadOutput => "read-output",
            Action::Shell => "shell",
            Action::Cp => "cp",
            Action::PortForward => "port-forward",
            Action::PortForwardRemote => "port-forward-remote",
            Action::TerminateSession => "terminate-session",
            Action::ManageNodes => "manage-nodes",
            Action::ManageDocuments => "manage-documents",
            Action::ManageUsers => "manage-users",
            Action::ManageActivations => "manage-activations",
            Action::ManageAccessKeys => "manage-access-keys",
            Action::ManageParams => "manage-params",
            Action::UseParam => "use-param",
            Action::ReadAudit => "read-audit",
            Action::ReadObjects => "read-objects",
            Action::WriteObjects => "write-objects",
            Action::ReadScripts => "read-scripts",
            Action::ManageScripts => "manage-scripts",
        }
    }
}

/// What an action is done to.
#[derive(Clone, Copy, Debug)]
pub enum Resource<'a> {
    /// The fleet as a whole (users, activations, audit, ...).
    Fleet,
    /// A node.
    Node(&'a NodeRef),
    /// A document, by name.
    Document(&'a str),
    /// A parameter of the parameter store, by name.
    Parameter(&'a str),
    /// An object kept for users, by key.
    Object(&'a str),
    /// A saved script, by name.
    Script(&'a str),
}

impl Resource<'_> {
    fn kind(&self) -> &'static str {
        match self {
            Resource::Fleet => "Fleet",
            Resource::Node(_) => "Node",
            Resource::Document(_) => "Document",
            Resource::Parameter(_) => "Parameter",
            Resource::Object(_) => "Object",
            Resource::Script(_) => "Script",
        }
    }
}

/// Who is asking: the user a credential acts as. Put in the request extensions by authentication.
#[derive(Clone, Debug)]
pub struct Principal {
    /// The user.
    pub user: UserRow,
    /// The credential used: a token id (`tok_...`) or an access key id.
    pub credential: String,
    /// Set once any authorization question was asked for this request.
    asked: Arc<AtomicBool>,
}

impl Principal {
    /// A principal authenticated with `credential`.
    pub fn new(user: UserRow, credential: String) -> Self {
        Principal {
            user,
            credential,
            asked: Arc::default(),
        }
    }

    /// The user's name (what the audit trail records).
    pub fn name(&self) -> &str {
        &self.user.name
    }

    /// Whether a handler asked an authorization question for this request.
    pub fn was_authorized(&self) -> bool {
        self.asked.load(Ordering::Relaxed)
    }
}

/// A refusal, naming what was refused.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{message}")]
pub struct Denied {
    /// One line for the caller: who may not do what on which resources.
    pub message: String,
    /// The nodes refused (empty for other resources).
    pub nodes: Vec<NodeId>,
}

/// Which nodes a principal may do an action on.
#[derive(Clone, Debug)]
pub enum NodeScope {
    /// Every node.
    All,
    /// Only these.
    Only(Arc<HashSet<NodeId>>),
}

impl NodeScope {
    /// Whether the scope holds a node.
    pub fn contains(&self, node: &NodeId) -> bool {
        match self {
            NodeScope::All => true,
            NodeScope::Only(set) => set.contains(node),
        }
    }

    /// The nodes in either scope.
    pub fn union(self, other: NodeScope) -> NodeScope {
        match (self, other) {
            (NodeScope::All, _) | (_, NodeScope::All) => NodeScope::All,
            (NodeScope::Only(a), NodeScope::Only(b)) => {
                NodeScope::Only(Arc::new(a.union(&b).cloned().collect()))
            }
        }
    }

    /// The set to filter by; None for every node.
    pub fn as_filter(&self) -> Option<&HashSet<NodeId>> {
        match self {
            NodeScope::All => None,
            NodeScope::Only(set) => Some(set.as_ref()),
        }
    }
}

/// A policy text that is not valid.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InvalidPolicy(pub String);

/// Checks a user policy: it must parse and validate against [`SCHEMA`] (strict mode), so a typo in an
/// action, attribute or tag type is found when the policy is stored, not when a request is denied.
/// Checks its size and nesting first ([`check_shape`]), so no text makes the parser recurse without bound.
pub fn validate(policy: &str) -> Result<usize, InvalidPolicy> {
    check_shape(policy)?;
    let text = policy.to_owned();
    on_big_stack(move || {
        let set = PolicySet::from_str(&text).map_err(|e| InvalidPolicy(pretty(&e)))?;
        let result = Validator::new(schema()).validate(&set, ValidationMode::Strict);
        if !result.validation_passed() {
            let errors: Vec<String> = result.validation_errors().map(|e| pretty(e)).collect();
            return Err(InvalidPolicy(errors.join("\n")));
        }
        Ok(set.policies().count())
    })
}

/// Longest policy text a user may carry, in bytes.
pub const POLICY_TEXT_MAX: usize = 64 * 1024;
/// Deepest nesting of parentheses, brackets and braces in a policy text, and most `if` expressions
/// in one policy. Cedar's parser recurses once per level (150 nested parentheses overflowed a 2 MiB
/// stack); real policies nest a handful deep.
pub const POLICY_NESTING_MAX: usize = 32;
/// Stack of the thread that parses and validates a policy text: room for whatever [`check_shape`]
/// lets through (long operator chains build deep trees too), whatever the caller's stack.
const POLICY_PARSE_STACK: usize = 64 * 1024 * 1024;

/// Runs `f` (a parse) on a thread with [`POLICY_PARSE_STACK`] bytes of stack; what it returns is
/// dropped on that thread too unless it is moved out.
fn on_big_stack<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, InvalidPolicy> + Send + 'static,
) -> Result<T, InvalidPolicy> {
    std::thread::Builder::new()
        .name("policy-parse".into())
        .stack_size(POLICY_PARSE_STACK)
        .spawn(f)
        .map_err(|e| InvalidPolicy(format!("cannot start the policy parser: {e}")))?
        .join()
        .map_err(|_| InvalidPolicy("the policy parser failed".into()))?
}

/// A cheap scan before any parse: the text's size ([`POLICY_TEXT_MAX`]) and its nesting (brackets
/// of all kinds, and `if` expressions per policy; [`POLICY_NESTING_MAX`]), string literals and `//`
/// comments skipped.
pub fn check_shape(policy: &str) -> Result<(), InvalidPolicy> {
    if policy.len() > POLICY_TEXT_MAX {
        return Err(InvalidPolicy(format!(
            "the policy text is {} bytes; the limit is {POLICY_TEXT_MAX}",
            policy.len()
        )));
    }
    let deep = |what: &str, at: usize| {
        InvalidPolicy(format!(
            "{what} nested deeper than {POLICY_NESTING_MAX} (at byte {at}); the limit is {POLICY_NESTING_MAX}"
        ))
    };
    let b = policy.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let (mut depth, mut ifs, mut i) = (0usize, 0usize, 0usize);
    while i < b.len() {
        match b[i] {
            b'"' => {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
            }
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'(' | b'[' | b'{' => {
                depth += 1;
                if depth > POLICY_NESTING_MAX {
                    return Err(deep("parentheses, brackets or braces are", i));
                }
            }
            b')' | b']' | b'}' => depth = depth.saturating_sub(1),
            b';' if depth == 0 => ifs = 0,
            b'i' if b.get(i + 1) == Some(&b'f')
                && (i == 0 || !ident(b[i - 1]))
                && !b.get(i + 2).is_some_and(|&c| ident(c)) =>
            {
                ifs += 1;
                if ifs > POLICY_NESTING_MAX {
                    return Err(deep("if-expressions are", i));
                }
            }
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

/// A diagnostic with its source position and help, as one text.
fn pretty(e: &(dyn miette::Diagnostic + Send + Sync + 'static)) -> String {
    let mut out = e.to_string();
    if let Some(labels) = e.labels() {
        for l in labels {
            out.push_str(&format!(" (at byte {})", l.offset()));
        }
    }
    if let Some(help) = e.help() {
        out.push_str(&format!("; {help}"));
    }
    out
}

fn schema() -> Schema {
    // SCHEMA is a constant checked by the unit tests below.
    match Schema::from_cedarschema_str(SCHEMA) {
        Ok((schema, _warnings)) => schema,
        Err(e) => panic!("built-in Cedar schema is invalid: {e}"),
    }
}

/// One user's compiled policies.
struct Compiled {
    user: UserRow,
    set: PolicySet,
    /// Decisions that depend only on action and resource type (the user has no policy of its own).
    fixed: Mutex<HashMap<(Action, &'static str), bool>>,
}

/// A user's whole-fleet scope for an action, as of a fleet generation.
struct CachedScope {
    fleet: u64,
    user: UserRow,
    scope: NodeScope,
}

/// The authorizer: compiled policy sets per user, cached until the user's role or policy changes;
/// whole-fleet scopes of users with their own policies, cached until the fleet changes.
pub struct Authz {
    authorizer: Authorizer,
    compiled: Mutex<HashMap<String, Arc<Compiled>>>,
    /// Bumped whenever a node registers or leaves (tags only change then).
    fleet: std::sync::atomic::AtomicU64,
    scopes: Mutex<HashMap<(String, Action), CachedScope>>,
}

impl Default for Authz {
    fn default() -> Self {
        Authz {
            authorizer: Authorizer::new(),
            compiled: Mutex::default(),
            fleet: Default::default(),
            scopes: Mutex::default(),
        }
    }
}

impl Authz {
    /// Whether `principal` may do `action` on `resource`.
    pub fn allowed(&self, principal: &Principal, action: Action, resource: Resource<'_>) -> bool {
        principal.asked.store(true, Ordering::Relaxed);
        let compiled = self.compiled(&principal.user);
        if compiled.user.policy.trim().is_empty() {
            let key = (action, resource.kind());
            if let Some(d) = compiled.fixed.lock().get(&key) {
                return *d;
            }
            let d = self.evaluate(&compiled, action, resource);
            compiled.fixed.lock().insert(key, d);
            return d;
        }
        self.evaluate(&compiled, action, resource)
    }

    /// Marks a request that acts only on the caller's own credentials (whoami, its own tokens and
    /// access keys): allowed for every authenticated principal, whatever its policies.
    pub fn self_service(&self, principal: &Principal) {
        principal.asked.store(true, Ordering::Relaxed);
    }

    /// Marks a request whose answer is filtered resource by resource with [`Authz::allowed`] (a
    /// listing): it is authorized even when there is nothing to filter.
    pub fn filtered(&self, principal: &Principal) {
        principal.asked.store(true, Ordering::Relaxed);
    }

    /// `Ok` when allowed, else a [`Denied`] naming the user, action and resource.
    pub fn require(
        &self,
        principal: &Principal,
        action: Action,
        resource: Resource<'_>,
    ) -> Result<(), Denied> {
        if self.allowed(principal, action, resource) {
            return Ok(());
        }
        let what = match resource {
            Resource::Fleet => String::new(),
            Resource::Node(n) => format!(" on node {} ({})", n.node_id, n.name),
            Resource::Document(d) => format!(" on document {d}"),
            Resource::Parameter(n) => format!(" on parameter {n}"),
            Resource::Object(k) => format!(" on object {k}"),
            Resource::Script(n) => format!(" on script {n}"),
        };
        Err(Denied {
            message: format!(
                "user {} is not allowed to {}{what}",
                principal.name(),
                action.as_str()
            ),
            nodes: match resource {
                Resource::Node(n) => vec![n.node_id.clone()],
                _ => Vec::new(),
            },
        })
    }

    /// `Ok` when the action is allowed on every node; else a [`Denied`] naming the refused ones, so
    /// nothing is done to any (a send to a mix of permitted and forbidden nodes is refused whole).
    pub fn require_nodes(
        &self,
        principal: &Principal,
        action: Action,
        nodes: &[NodeRef],
    ) -> Result<(), Denied> {
        let refused: Vec<&NodeRef> = nodes
            .iter()
            .filter(|n| !self.allowed(principal, action, Resource::Node(n)))
            .collect();
        if refused.is_empty() {
            // Asked even with no nodes, so the request counts as authorized.
            principal.asked.store(true, Ordering::Relaxed);
            return Ok(());
        }
        const SHOWN: usize = 10;
        let mut list: Vec<String> = refused
            .iter()
            .take(SHOWN)
            .map(|n| format!("{} ({})", n.node_id, n.name))
            .collect();
        if refused.len() > SHOWN {
            list.push(format!("and {} more", refused.len() - SHOWN));
        }
        Err(Denied {
            message: format!(
                "user {} is not allowed to {} on {} of the {} target nodes: {}",
                principal.name(),
                action.as_str(),
                refused.len(),
                nodes.len(),
                list.join(", ")
            ),
            nodes: refused.iter().map(|n| n.node_id.clone()).collect(),
        })
    }

    /// The nodes among `nodes` the principal may do `action` on; [`NodeScope::All`] when its
    /// decision does not depend on the node (then `nodes` is not looked at).
    pub fn scope(&self, principal: &Principal, action: Action, nodes: &[NodeRef]) -> NodeScope {
        self.filtered(principal);
        match self.on_every_node(principal, action) {
            Some(true) => return NodeScope::All,
            Some(false) => return NodeScope::Only(Arc::default()),
            None => {}
        }
        NodeScope::Only(Arc::new(
            nodes
                .iter()
                .filter(|n| self.allowed(principal, action, Resource::Node(n)))
                .map(|n| n.node_id.clone())
                .collect(),
        ))
    }

    /// Says the fleet changed (a node registered or left): scopes cached for [`Authz::node_scope`] are stale.
    pub fn fleet_changed(&self) {
        self.fleet.fetch_add(1, Ordering::Relaxed);
    }

    /// The decision for every node at once when it cannot depend on which node (the principal has no
    /// policy of its own); None when it can. Lets callers skip loading nodes and their tags.
    pub fn on_every_node(&self, principal: &Principal, action: Action) -> Option<bool> {
        self.node_independent(principal).then(|| {
            let any = NodeRef {
                node_id: NodeId::from_random(0),
                name: String::new(),
                tags: BTreeMap::new(),
            };
            self.allowed(principal, action, Resource::Node(&any))
        })
    }

    /// Whether the principal's decisions cannot depend on which node (it has no policy of its own),
    /// so callers need not load nodes to ask.
    pub fn node_independent(&self, principal: &Principal) -> bool {
        principal.user.policy.trim().is_empty()
    }

    fn compiled(&self, user: &UserRow) -> Arc<Compiled> {
        let mut cache = self.compiled.lock();
        if let Some(c) = cache.get(&user.name).filter(|c| c.user == *user) {
            return c.clone();
        }
        // A stored policy was validated when stored; if it no longer parses (hand-edited row), the
        // user keeps only its role's permissions and the server says why.
        let text = format!("{ROLE_POLICIES}\n{}", user.policy);
        let parsed = check_shape(&user.policy).and_then(|()| {
            on_big_stack(move || PolicySet::from_str(&text).map_err(|e| InvalidPolicy(pretty(&e))))
        });
        let set = parsed.unwrap_or_else(|e| {
            tracing::error!(user = %user.name, "stored policy does not parse, ignoring it: {e}");
            PolicySet::from_str(ROLE_POLICIES).unwrap_or_default()
        });
        let c = Arc::new(Compiled {
            user: user.clone(),
            set,
            fixed: Mutex::default(),
        });
        cache.insert(user.name.clone(), c.clone());
        c
    }

    fn evaluate(&self, c: &Compiled, action: Action, resource: Resource<'_>) -> bool {
        match self.request(c, action, resource) {
            Ok((request, entities)) => {
                self.authorizer
                    .is_authorized(&request, &c.set, &entities)
                    .decision()
                    == Decision::Allow
            }
            Err(e) => {
                tracing::error!(user = %c.user.name, action = action.as_str(), "cannot build an authorization request, denying: {e}");
                false
            }
        }
    }

    fn request(
        &self,
        c: &Compiled,
        action: Action,
        resource: Resource<'_>,
    ) -> anyhow::Result<(Request, Entities)> {
        let role = uid("Role", c.user.role.as_str())?;
        let user = uid("User", &c.user.name)?;
        let user_entity = Entity::new(
            user.clone(),
            HashMap::from([(
                "role".to_owned(),
                RestrictedExpression::new_string(c.user.role.as_str().to_owned()),
            )]),
            HashSet::from([role.clone()]),
        )?;
        let (resource_uid, resource_entity) = match resource {
            Resource::Fleet => {
                let u = uid("Fleet", "fleet")?;
                (u.clone(), Entity::with_uid(u))
            }
            Resource::Document(name)
            | Resource::Parameter(name)
            | Resource::Object(name)
            | Resource::Script(name) => {
                let kind = resource.kind();
                let u = uid(kind, name)?;
                let e = Entity::new(
                    u.clone(),
                    HashMap::from([(
                        "name".to_owned(),
                        RestrictedExpression::new_string(name.to_owned()),
                    )]),
                    HashSet::new(),
                )?;
                (u, e)
            }
            Resource::Node(n) => {
                let u = uid("Node", n.node_id.as_str())?;
                let e = Entity::new_with_tags(
                    u.clone(),
                    [(
                        "name".to_owned(),
                        RestrictedExpression::new_string(n.name.clone()),
                    )],
                    [],
                    n.tags
                        .iter()
                        .map(|(k, v)| (k.clone(), RestrictedExpression::new_string(v.clone()))),
                )?;
                (u, e)
            }
        };
        let entities =
            Entities::from_entities([user_entity, Entity::with_uid(role), resource_entity], None)?;
        let request = Request::new(
            user,
            uid("Action", action.as_str())?,
            resource_uid,
            Context::empty(),
            None,
        )?;
        Ok((request, entities))
    }
}

/// A refusal or a storage failure while deciding.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// Refused.
    #[error(transparent)]
    Denied(#[from] Denied),
    /// The store failed loading what the decision needs.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Authz {
    /// The nodes (every one ever registered) the principal may do `action` on, for filtering listings.
    pub async fn node_scope(
        &self,
        store: &Store,
        principal: &Principal,
        action: Action,
    ) -> Result<NodeScope, StoreError> {
        let authz = self;
        if authz.node_independent(principal) {
            return Ok(authz.scope(principal, action, &[]));
        }
        // Evaluating a tag policy over every node is the costly part (50,000 nodes: ~1 s); the answer
        // only changes with the user or the fleet, so it is kept until either does.
        let key = (principal.user.name.clone(), action);
        let fleet = authz.fleet.load(Ordering::Relaxed);
        if let Some(c) = authz
            .scopes
            .lock()
            .get(&key)
            .filter(|c| c.fleet == fleet && c.user == principal.user)
        {
            authz.filtered(principal);
            return Ok(c.scope.clone());
        }
        let nodes = store.node_refs(None).await?;
        let scope = authz.scope(principal, action, &nodes);
        authz.scopes.lock().insert(
            key,
            CachedScope {
                fleet,
                user: principal.user.clone(),
                scope: scope.clone(),
            },
        );
        Ok(scope)
    }

    /// `Ok` when the principal may do `action` on this node. A node that does not exist is checked
    /// with no tags, so a refusal does not tell whether it exists.
    pub async fn require_node(
        &self,
        store: &Store,
        principal: &Principal,
        action: Action,
        node: &NodeId,
    ) -> Result<(), CheckError> {
        if self.on_every_node(principal, action) == Some(true) {
            return Ok(());
        }
        let found = store.node_refs(Some(std::slice::from_ref(node))).await?;
        let unknown = NodeRef {
            node_id: node.clone(),
            name: String::new(),
            tags: BTreeMap::new(),
        };
        let n = found.first().unwrap_or(&unknown);
        Ok(self.require(principal, action, Resource::Node(n))?)
    }

    /// The nodes of a command's invocations, and which of them the principal may do `action` on.
    /// Refused when it may on none of them (a command without invocations: when it may on every node).
    pub async fn command_scope(
        &self,
        store: &Store,
        principal: &Principal,
        action: Action,
        command: &CommandId,
    ) -> Result<NodeScope, CheckError> {
        if self.on_every_node(principal, action) == Some(true) {
            return Ok(NodeScope::All);
        }
        let nodes = store.command_node_refs(command).await?;
        let scope = self.scope(principal, action, &nodes);
        let any = match &scope {
            NodeScope::All => true,
            NodeScope::Only(set) => !set.is_empty(),
        };
        if any {
            return Ok(scope);
        }
        Err(CheckError::Denied(Denied {
            message: format!(
                "user {} is not allowed to {} on any node of command {command}",
                principal.name(),
                action.as_str()
            ),
            nodes: nodes.into_iter().map(|n| n.node_id).collect(),
        }))
    }

    /// `Ok` when the principal may do `action` on every node of `nodes` (ids of a command's invocations).
    pub async fn require_command_nodes(
        &self,
        store: &Store,
        principal: &Principal,
        action: Action,
        command: &CommandId,
        only: &[NodeId],
    ) -> Result<(), CheckError> {
        if self.on_every_node(principal, action) == Some(true) {
            return Ok(());
        }
        let mut nodes = store.command_node_refs(command).await?;
        if !only.is_empty() {
            nodes.retain(|n| only.contains(&n.node_id));
        }
        Ok(self.require_nodes(principal, action, &nodes)?)
    }
}

fn uid(kind: &str, id: &str) -> anyhow::Result<EntityUid> {
    Ok(EntityUid::from_type_name_and_id(
        EntityTypeName::from_str(kind)?,
        EntityId::new(id),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetrun_proto::api::Role;

    fn principal(role: Role, policy: &str) -> Principal {
        Principal::new(
            UserRow {
                name: "alice".into(),
                role,
                policy: policy.into(),
            },
            "tok_test".into(),
        )
    }

    fn node(n: u128, env: &str) -> NodeRef {
        NodeRef {
            node_id: NodeId::from_random(n),
            name: format!("{env}-{n}"),
            tags: BTreeMap::from([("env".to_owned(), env.to_owned())]),
        }
    }

    const DEV_ONLY: &str = r#"
        permit (principal, action in [Action::"send-command", Action::"cancel",
                                      Action::"read-output", Action::"list"], resource is Node)
        when { resource.hasTag("env") && resource.getTag("env") == "dev" };
    "#;

    #[test]
    fn built_in_texts_are_valid() {
        schema();
        assert_eq!(validate(ROLE_POLICIES).expect("role policies"), 3);
        assert_eq!(validate(DEV_ONLY).expect("example"), 1);
    }

    #[test]
    fn the_documented_example_policies_are_valid_and_do_what_they_say() {
        let authz = Authz::default();
        let team = include_str!("../../../../docs/policies/dev-team.cedar");
        let junior = include_str!("../../../../docs/policies/operator-but-not-prod.cedar");
        validate(team).expect("dev-team.cedar");
        validate(junior).expect("operator-but-not-prod.cedar");
        let (dev, prod) = (node(1, "dev"), node(2, "prod"));
        let p = principal(Role::None, team);
        assert!(authz.allowed(&p, Action::Shell, Resource::Node(&dev)));
        assert!(authz.allowed(&p, Action::PortForward, Resource::Node(&dev)));
        assert!(!authz.allowed(&p, Action::PortForwardRemote, Resource::Node(&dev)));
        // Shells and copies are decided like sends (their routes come with the shell feature).
        for action in [
            Action::Shell,
            Action::Cp,
            Action::PortForward,
            Action::SendCommand,
            Action::Cancel,
        ] {
            assert!(
                !authz.allowed(&p, action, Resource::Node(&prod)),
                "{action:?}"
            );
        }
        assert!(!authz.allowed(&p, Action::ReadOutput, Resource::Node(&prod)));
        assert!(authz.allowed(&p, Action::List, Resource::Document("AWS-RunShellScript")));
        assert!(authz.allowed(&p, Action::UseParam, Resource::Parameter("dev/api-token")));
        assert!(!authz.allowed(&p, Action::UseParam, Resource::Parameter("prod/db-pass")));
        let p = principal(Role::Operator, junior);
        assert!(authz.allowed(&p, Action::SendCommand, Resource::Node(&dev)));
        assert!(!authz.allowed(&p, Action::List, Resource::Node(&prod)));
    }

    #[test]
    fn roles_grant_what_they_say() {
        let authz = Authz::default();
        let dev = node(1, "dev");
        for (role, send, read, users) in [
            (Role::Admin, true, true, true),
            (Role::Operator, true, true, false),
            (Role::Viewer, false, true, false),
            (Role::None, false, false, false),
        ] {
            let p = principal(role, "");
            assert_eq!(
                authz.allowed(&p, Action::SendCommand, Resource::Node(&dev)),
                send,
                "{role}"
            );
            assert_eq!(
                authz.allowed(&p, Action::ReadOutput, Resource::Node(&dev)),
                read,
                "{role}"
            );
            assert_eq!(
                authz.allowed(&p, Action::ManageUsers, Resource::Fleet),
                users,
                "{role}"
            );
            // Saved scripts: whoever may send manages them; whoever may read output reads them.
            assert_eq!(
                authz.allowed(&p, Action::ManageScripts, Resource::Script("collect")),
                send,
                "{role}"
            );
            assert_eq!(
                authz.allowed(&p, Action::ReadScripts, Resource::Script("collect")),
                read,
                "{role}"
            );
            assert!(p.was_authorized());
        }
    }

    #[test]
    fn tag_conditions_limit_a_user_to_its_nodes_and_mixed_sets_are_refused_whole() {
        let authz = Authz::default();
        let p = principal(Role::None, DEV_ONLY);
        let (dev, prod, untagged) = (node(1, "dev"), node(2, "prod"), {
            let mut n = node(3, "x");
            n.tags.clear();
            n
        });
        assert!(authz.allowed(&p, Action::SendCommand, Resource::Node(&dev)));
        assert!(!authz.allowed(&p, Action::SendCommand, Resource::Node(&prod)));
        assert!(!authz.allowed(&p, Action::SendCommand, Resource::Node(&untagged)));
        assert!(!authz.allowed(&p, Action::Shell, Resource::Node(&dev)));
        let mixed = [dev.clone(), prod.clone()];
        let denied = authz
            .require_nodes(&p, Action::SendCommand, &mixed)
            .expect_err("mixed");
        assert_eq!(denied.nodes, vec![prod.node_id.clone()]);
        assert!(denied.message.contains(prod.node_id.as_str()), "{denied}");
        assert!(denied.message.contains("1 of the 2"), "{denied}");
        let NodeScope::Only(set) = authz.scope(&p, Action::ReadOutput, &mixed) else {
            panic!("a tag policy is node dependent");
        };
        assert_eq!(*set, HashSet::from([dev.node_id.clone()]));
    }

    #[test]
    fn forbid_beats_a_role_and_policy_changes_take_effect() {
        let authz = Authz::default();
        let prod = node(2, "prod");
        let p = principal(Role::Operator, "");
        assert!(authz.allowed(&p, Action::SendCommand, Resource::Node(&prod)));
        let p = principal(
            Role::Operator,
            r#"forbid (principal, action, resource is Node) when { resource.hasTag("env") && resource.getTag("env") == "prod" };"#,
        );
        assert!(!authz.allowed(&p, Action::SendCommand, Resource::Node(&prod)));
        assert!(authz.allowed(&p, Action::SendCommand, Resource::Node(&node(1, "dev"))));
    }

    /// Texts that overflowed the parser's stack (the process aborted) are refused by name, before
    /// the parser sees them, on any thread; legal nesting and brackets in strings and comments pass.
    #[test]
    fn deep_nesting_is_refused_before_parsing() {
        let head = "permit(principal, action, resource) when { ";
        let parens = format!("{head}{}true{} }};", "(".repeat(150), ")".repeat(150));
        let ifs = format!(
            "{head}{}true }};",
            "if true then ".repeat(2_000) + "true else ".repeat(2_000).as_str()
        );
        let brackets = format!(
            "{head}{}1{} == [] }};",
            "[".repeat(8_000),
            "]".repeat(8_000)
        );
        for text in [&parens, &ifs, &brackets] {
            let err = validate(text).unwrap_err().0;
            assert!(
                err.contains(&format!("deeper than {POLICY_NESTING_MAX}")),
                "{err}"
            );
        }
        let huge = format!("// {}\n", "x".repeat(POLICY_TEXT_MAX));
        assert!(validate(&huge).unwrap_err().0.contains("limit is 65536"));
        let fine = format!(
            "// ((((((((((((((((((((((((((((((((((((((((\n{head}\"(((((((((((((((((((((((((((((((((((([[\" == \"x\" && {}true{} }};",
            "(".repeat(POLICY_NESTING_MAX - 1),
            ")".repeat(POLICY_NESTING_MAX - 1)
        );
        assert_eq!(validate(&fine).unwrap(), 1);
        let chain = format!("{head}true{} }};", " || true".repeat(6_000));
        assert_eq!(
            validate(&chain).unwrap(),
            1,
            "long flat chains are no nesting"
        );
    }

    #[test]
    fn invalid_policies_are_refused_with_a_reason() {
        for (text, says) in [
            (
                "permit (principal, action, resource",
                "unexpected end of input",
            ),
            (
                r#"permit (principal, action == Action::"sned-command", resource);"#,
                "sned-command",
            ),
            (
                r#"permit (principal, action == Action::"list", resource is Node) when { resource.owner == "x" };"#,
                "owner",
            ),
        ] {
            let e = validate(text).expect_err(text).to_string();
            assert!(e.contains(says), "{text}: {e}");
        }
    }
}
