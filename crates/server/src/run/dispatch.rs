//! Dispatch of a command to its nodes with SSM's rate control, one task per running command.
//!
//! The dispatcher owns the decision of what to send next: at most `max_concurrency` invocations are
//! in flight (delivered and not ended); once more than `max_errors` have failed, nothing new starts
//! and the rest end as skipped; an invocation not delivered before the delivery timeout ends as
//! Delivery Timed Out; a node that is offline waits (without a slot) until it comes back in time.
//! Every state change is persisted before the frame it leads to is sent.
//!
//! Each write carries the fence of this replica's hold on the command (`cluster::replica`): once
//! another replica, or a later run of this one, has taken the command, the store refuses the
//! write and the dispatcher stops there, leaving the command to its new owner.

use crate::AppState;
use crate::cluster::bus::{Bus, Delivery};
use crate::run::invocations::Ender;
use fleetrun_proto::channel::{RunRequest, ServerFrame};
use fleetrun_proto::limits::SCRIPT_MAX;
use fleetrun_proto::status::details;
use fleetrun_proto::time::now_ms;
use fleetrun_proto::{CommandId, CommandStatus, InvocationStatus, NodeId};
use fleetrun_store::{CommandRow, Fence, Finish, ScriptFiles, StoreError, Tally};
use parking_lot::Mutex;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// A message to a command's dispatcher (over the bus too, when it runs on another replica).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub enum DispatchMsg {
    /// These invocations ended (already persisted).
    Ended(Vec<(NodeId, bool)>),
    /// An operator cancelled these nodes' invocations (all when empty).
    Cancel(Vec<NodeId>),
    /// The node lost a delivered invocation before starting it: deliver again.
    Undelivered(NodeId),
}

struct Handle {
    tx: mpsc::UnboundedSender<DispatchMsg>,
    progress: watch::Sender<u64>,
    /// Which dispatcher of the command this is (a later one replaces it).
    generation: u64,
    /// Cancelled when a later dispatcher of the same command replaces this one.
    retired: CancellationToken,
    /// The replica's hold on the command, to load it again with (`Dispatchers::reload_all`).
    fence: Fence,
}

/// The registry of running dispatchers.
#[derive(Default)]
pub struct Dispatchers {
    running: Mutex<HashMap<CommandId, Handle>>,
    generations: std::sync::atomic::AtomicU64,
    /// Where messages for dispatchers running on other replicas go.
    bus: Option<Arc<Bus>>,
    /// Change notifications of commands dispatched on other replicas that someone watches here,
    /// fed by the bus.
    elsewhere: Mutex<HashMap<CommandId, watch::Sender<u64>>>,
    /// Woken when invocations end: saved script runs' temp dirs may be removed
    /// (`scripts::runner::janitor`).
    pub cleanup: tokio::sync::Notify,
}

impl Dispatchers {
    /// The registry, passing messages for commands dispatched elsewhere to `bus` (when there is
    /// one: several replicas).
    pub fn new(bus: Option<Arc<Bus>>) -> Self {
        Dispatchers {
            bus,
            ..Default::default()
        }
    }

    /// Sends a message to a command's dispatcher; false if none runs.
    pub fn send(&self, cmd: &CommandId, msg: DispatchMsg) {
        let msg = match self.running.lock().get(cmd) {
            Some(h) => match h.tx.send(msg) {
                Ok(()) => return,
                Err(mpsc::error::SendError(msg)) => msg,
            },
            None => msg,
        };
        // Not dispatched here: the replica that does takes it from the bus.
        if let Some(bus) = &self.bus {
            bus.to_dispatcher(cmd, &msg);
        }
    }

    /// Passes `msg` to the dispatcher of `cmd` if it runs here (a message from the bus).
    pub fn send_here(&self, cmd: &CommandId, msg: DispatchMsg) -> bool {
        self.running
            .lock()
            .get(cmd)
            .is_some_and(|h| h.tx.send(msg).is_ok())
    }

    /// Loads every command dispatched here again from the database, at the same fence: after the
    /// bus was lost, messages for them may have been too. Each new dispatcher retires the old one.
    pub fn reload_all(&self, state: &Arc<AppState>) {
        let held: Vec<(CommandId, Fence)> = self
            .running
            .lock()
            .iter()
            .map(|(cmd, h)| (cmd.clone(), h.fence.clone()))
            .collect();
        if held.is_empty() {
            return;
        }
        tracing::info!(
            commands = held.len(),
            "loading the commands dispatched here again"
        );
        let state2 = state.clone();
        state.tasks.spawn(async move {
            for (cmd, fence) in held {
                match state2.store.command_row(&cmd).await {
                    Ok(Some(row)) if !row.status.is_terminal() => spawn(state2.clone(), row, fence),
                    Ok(_) => {}
                    Err(e) => tracing::error!(%cmd, "cannot load the command again: {e}"),
                }
            }
        });
    }

    /// Tells watchers of a command that it changed, here and (through the bus) on the other
    /// replicas.
    pub fn bump(&self, cmd: &CommandId) {
        self.bump_here(cmd);
        if let Some(bus) = &self.bus {
            bus.changed(cmd);
        }
    }

    /// Tells watchers here that a command changed (on another replica, says the bus).
    pub fn bump_here(&self, cmd: &CommandId) {
        if let Some(h) = self.running.lock().get(cmd) {
            h.progress.send_modify(|v| *v += 1);
            return;
        }
        let mut elsewhere = self.elsewhere.lock();
        if let Some(tx) = elsewhere.get(cmd) {
            if tx.receiver_count() == 0 {
                elsewhere.remove(cmd);
            } else {
                tx.send_modify(|v| *v += 1);
            }
        }
    }

    /// Change notifications of a running command; None when it is not running here and there
    /// are no other replicas (it has ended). With replicas, a command dispatched elsewhere is
    /// watched through the bus, and its notifications never close: the watcher ends when the
    /// command does.
    pub fn watch(&self, cmd: &CommandId) -> Option<watch::Receiver<u64>> {
        if let Some(h) = self.running.lock().get(cmd) {
            return Some(h.progress.subscribe());
        }
        self.bus.as_ref()?;
        let mut elsewhere = self.elsewhere.lock();
        // Those nobody watches any more go (at most one per watched command stays).
        elsewhere.retain(|_, tx| tx.receiver_count() > 0);
        Some(
            elsewhere
                .entry(cmd.clone())
                .or_insert_with(|| watch::channel(0).0)
                .subscribe(),
        )
    }

    /// Whether a dispatcher of `cmd` runs here.
    pub fn is_running(&self, cmd: &CommandId) -> bool {
        self.running.lock().contains_key(cmd)
    }

    /// Removes the handle of dispatcher `generation` of `cmd`, unless a later one replaced it.
    fn remove(&self, cmd: &CommandId, generation: u64) {
        let mut running = self.running.lock();
        if running.get(cmd).is_some_and(|h| h.generation == generation) {
            running.remove(cmd);
        }
    }
}

/// An operator's cancel (all nodes when `nodes` is empty), from either API. A cancel of the
/// whole command is stored first, so the command's next owner reads it should this message be
/// lost; then it goes to the replica the database names as the command's owner: here, or over
/// the bus (a dispatcher here that lost the command, and would be fenced, is not trusted with it).
pub async fn cancel(
    state: &AppState,
    cmd: &CommandId,
    nodes: Vec<NodeId>,
) -> Result<(), StoreError> {
    if nodes.is_empty() {
        state.store.mark_cancel_requested(cmd, None).await?;
    }
    if let Some(bus) = &state.bus
        && let Some(lease) = state.store.command_lease(cmd).await?
        && lease.owner != state.replica.id()
    {
        bus.to_dispatcher(cmd, &DispatchMsg::Cancel(nodes));
        return Ok(());
    }
    state.dispatchers.send(cmd, DispatchMsg::Cancel(nodes));
    Ok(())
}

/// Starts the dispatcher of a command this replica holds with `fence` (new, resumed after a
/// restart, or taken over). One that ran here already for the command (at an earlier epoch) is
/// retired: its writes would be fenced anyway, and the new one reads the stored state afresh.
pub fn spawn(state: Arc<AppState>, row: CommandRow, fence: Fence) {
    let (tx, rx) = mpsc::unbounded_channel();
    let (progress, _) = watch::channel(0);
    let generation = state
        .dispatchers
        .generations
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let retired = CancellationToken::new();
    let handle = Handle {
        tx,
        progress,
        generation,
        retired: retired.clone(),
        fence: fence.clone(),
    };
    let earlier = state
        .dispatchers
        .running
        .lock()
        .insert(row.command_id.clone(), handle);
    if let Some(earlier) = earlier {
        earlier.retired.cancel();
    }
    let tasks = state.tasks.clone();
    tasks.spawn(async move {
        let cmd = row.command_id.clone();
        let mut rx = rx;
        let mut row = Some(row);
        loop {
            let loaded = match row.take() {
                Some(row) => Ok(Some(row)),
                None => state.store.command_row(&cmd).await,
            };
            let stopped = match loaded {
                Ok(Some(row)) => {
                    match Dispatcher::load(state.clone(), row, fence.clone()).await {
                        Ok(d) => d.run_loop(&mut rx, &retired).await,
                        Err(e) => Stopped::Failed(e),
                    }
                }
                Ok(None) => Stopped::Done,
                Err(e) => Stopped::Failed(e),
            };
            match stopped {
                Stopped::Done => break,
                // Shutdown: left as it stands, resumed from the database at the next start.
                // Retired: a later dispatcher here owns the handle now.
                Stopped::Shutdown | Stopped::Retired => return,
                Stopped::Failed(StoreError::Fenced { held_by, epoch, .. }) => {
                    tracing::info!(%cmd, %held_by, epoch, "command taken over by another owner: dispatch stops here");
                    break;
                }
                // The database failed (unreachable, say): this replica still holds the command,
                // so it tries again from what is stored. Messages that came meanwhile wait in
                // `rx`; ends already stored are not counted twice (`handle`).
                Stopped::Failed(e) => {
                    tracing::error!(%cmd, "dispatch stopped on a storage error, retrying in {RETRY:?}: {e}");
                    tokio::select! {
                        () = state.shutdown.cancelled() => return,
                        () = retired.cancelled() => return,
                        () = tokio::time::sleep(RETRY) => {}
                    }
                }
            }
        }
        // Watchers on other replicas read the final state; dropping the handle closes the
        // channels of those here, which read it from storage.
        if state.bus.is_some() {
            state.dispatchers.bump(&cmd);
        }
        state.dispatchers.remove(&cmd, generation);
    });
}

/// Sleeps until `at`, or forever when there is none.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Wait before a dispatcher stopped by a storage error loads its command again.
const RETRY: Duration = Duration::from_secs(1);

/// Why a dispatcher's run stopped.
enum Stopped {
    /// Every invocation ended and the command's final status is stored.
    Done,
    /// The server is shutting down.
    Shutdown,
    /// A later dispatcher of the command replaced this one.
    Retired,
    /// A write failed: fenced (another owner holds the command) or the database failed.
    Failed(StoreError),
}

struct Dispatcher {
    state: Arc<AppState>,
    cmd: CommandId,
    /// This replica's hold on the command, carried by every write.
    fence: Fence,
    run: RunRequest,
    online: broadcast::Receiver<NodeId>,
    /// Not delivered, in dispatch order.
    pending: VecDeque<NodeId>,
    /// Not delivered; their node was offline when their turn came.
    waiting: HashSet<NodeId>,
    /// Delivered and not ended.
    in_flight: HashSet<NodeId>,
    /// In flight with a cancel sent (resent when their node reconnects).
    cancelling: HashSet<NodeId>,
    max_concurrency: u64,
    max_errors: u64,
    errors: u64,
    /// No new deliveries: max errors exceeded, or cancelled.
    stopped: Option<(InvocationStatus, &'static str)>,
    delivery_deadline: Instant,
    expiry: Instant,
    /// Waiting because the bus failed when their turn came (not because they were offline):
    /// tried again at `retry_at`.
    unreachable: HashSet<NodeId>,
    retry_at: Option<Instant>,
    /// A stored cancel of the whole command that did not reach every invocation in flight (it
    /// came while no dispatcher ran it, or one stopped halfway): applied when the drive starts.
    resume_cancel: bool,
    /// A saved script run's input and output: each node is prepared before its Run.
    files: Option<ScriptFiles>,
    /// That run's input, staged once for all its nodes.
    inputs: Arc<crate::scripts::runner::Inputs>,
}

impl Dispatcher {
    async fn load(state: Arc<AppState>, row: CommandRow, fence: Fence) -> Result<Self, StoreError> {
        let online = state.hub.subscribe_online();
        let invocations = state.store.invocation_rows(&row.command_id).await?;
        let files = state.store.script_files(&row.command_id).await?;
        let spec = &row.spec;
        let targets = row.target_count;
        // At least one in flight, whatever a percentage of few targets rounds to.
        let max_concurrency = spec.max_concurrency.resolve(targets).max(1);
        let max_errors = spec.max_errors.resolve(targets);
        // Deadlines are absolute times by the database's clock (the send's `requested_at` too),
        // so a replica taking over keeps them whatever its own clock says.
        let now = state.replica.now_ms();
        let at =
            |ms: i64| Instant::now() + Duration::from_millis(ms.saturating_sub(now).max(0) as u64);
        let delivery_end = spec.requested_at + spec.delivery_timeout as i64 * 1000;
        let mut d = Dispatcher {
            cmd: row.command_id.clone(),
            fence,
            run: RunRequest {
                command_id: row.command_id.clone(),
                script: spec.commands.join("\n"),
                working_dir: spec.working_dir.clone(),
                execution_timeout_secs: spec.execution_timeout,
                run_as: Some(spec.run_as.clone()).filter(|u| !u.is_empty()),
                memory_limit_bytes: spec.memory_limit_mb.map(|mb| mb * 1024 * 1024),
                cpu_limit_percent: spec.cpu_limit_percent,
            },
            online,
            pending: VecDeque::new(),
            waiting: HashSet::new(),
            in_flight: HashSet::new(),
            cancelling: HashSet::new(),
            max_concurrency,
            max_errors,
            errors: row.error_count,
            stopped: None,
            delivery_deadline: at(delivery_end),
            unreachable: HashSet::new(),
            retry_at: None,
            resume_cancel: false,
            expiry: at(delivery_end + spec.execution_timeout as i64 * 1000) + state.result_grace,
            files,
            inputs: Arc::default(),
            state,
        };
        for inv in invocations {
            if inv.status.is_terminal() {
                continue;
            }
            if inv.status == InvocationStatus::Cancelling {
                d.cancelling.insert(inv.node_id.clone());
            }
            if inv.delivered {
                d.in_flight.insert(inv.node_id);
            } else {
                d.pending.push_back(inv.node_id);
            }
        }
        if row.cancel_requested {
            d.stopped = Some((InvocationStatus::Cancelled, details::CANCELLED));
            d.resume_cancel = d.in_flight.iter().any(|n| !d.cancelling.contains(n));
        } else if d.errors > d.max_errors {
            d.stopped = Some((InvocationStatus::Cancelled, details::MAX_ERRORS_EXCEEDED));
        }
        Ok(d)
    }

    async fn run_loop(
        mut self,
        rx: &mut mpsc::UnboundedReceiver<DispatchMsg>,
        retired: &CancellationToken,
    ) -> Stopped {
        let shutdown = self.state.shutdown.clone();
        let driven = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Stopped::Shutdown,
            _ = retired.cancelled() => return Stopped::Retired,
            r = self.drive(rx) => r,
        };
        // At shutdown the dispatch is left as it stands: the next start resumes it from the
        // database (deliveries are recorded before they are sent), as after a crash.
        match driven {
            Ok(()) => match self.finalize().await {
                Ok(()) => Stopped::Done,
                Err(e) => Stopped::Failed(e),
            },
            Err(e) => Stopped::Failed(e),
        }
    }

    async fn drive(
        &mut self,
        rx: &mut mpsc::UnboundedReceiver<DispatchMsg>,
    ) -> Result<(), StoreError> {
        if std::mem::take(&mut self.resume_cancel) {
            self.cancel(Vec::new()).await?;
        }
        loop {
            if let Some((status, why)) = self.stopped {
                self.end_undelivered(status, why).await?;
            } else {
                self.fill().await?;
            }
            if self.pending.is_empty() && self.waiting.is_empty() && self.in_flight.is_empty() {
                return Ok(());
            }
            let undelivered = !self.pending.is_empty() || !self.waiting.is_empty();
            tokio::select! {
                msg = rx.recv() => match msg {
                    Some(m) => self.handle(m).await?,
                    None => return Ok(()),
                },
                ev = self.online.recv() => match ev {
                    Ok(node) => self.node_online(node),
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        // Missed some events: give every waiting node another look.
                        let waiting: Vec<_> = self.waiting.drain().collect();
                        self.pending.extend(waiting);
                        let cancelling: Vec<_> = self.cancelling.iter().cloned().collect();
                        for n in cancelling { self.send_cancel(&n); }
                    }
                    Err(broadcast::error::RecvError::Closed) => {}
                },
                _ = tokio::time::sleep_until(self.delivery_deadline), if undelivered => {
                    self.end_undelivered(InvocationStatus::TimedOut, details::DELIVERY_TIMED_OUT).await?;
                }
                _ = tokio::time::sleep_until(self.expiry) => {
                    self.expire().await?;
                }
                _ = sleep_until_some(self.retry_at) => {
                    self.retry_at = None;
                    for node in std::mem::take(&mut self.unreachable) {
                        if self.waiting.remove(&node) {
                            self.pending.push_back(node);
                        }
                    }
                }
            }
        }
    }

    async fn handle(&mut self, msg: DispatchMsg) -> Result<(), StoreError> {
        match msg {
            DispatchMsg::Ended(ends) => {
                for (node, is_error) in ends {
                    let pending = self.pending.len();
                    self.pending.retain(|n| n != &node);
                    let tracked = self.in_flight.remove(&node)
                        | self.waiting.remove(&node)
                        | (self.pending.len() != pending);
                    self.cancelling.remove(&node);
                    // An end this dispatcher loaded as stored already is in `errors`.
                    if tracked {
                        self.errors += u64::from(is_error);
                    }
                }
                if self.errors > self.max_errors && self.stopped.is_none() {
                    self.stopped =
                        Some((InvocationStatus::Cancelled, details::MAX_ERRORS_EXCEEDED));
                }
            }
            DispatchMsg::Undelivered(node) => {
                if self.in_flight.remove(&node) {
                    self.cancelling.remove(&node);
                    self.pending.push_front(node);
                }
            }
            DispatchMsg::Cancel(nodes) => self.cancel(nodes).await?,
        }
        Ok(())
    }

    fn node_online(&mut self, node: NodeId) {
        if self.waiting.remove(&node) {
            self.pending.push_front(node.clone());
        }
        if self.cancelling.contains(&node) {
            self.send_cancel(&node);
        }
    }

    /// Delivers pending invocations to online nodes while slots are free.
    async fn fill(&mut self) -> Result<(), StoreError> {
        let free = self
            .max_concurrency
            .saturating_sub(self.in_flight.len() as u64) as usize;
        let mut batch = Vec::new();
        while batch.len() < free {
            let Some(node) = self.pending.pop_front() else {
                break;
            };
            // With other replicas, the node may be connected to one of them: try it.
            if self.state.hub.is_online(&node) || self.state.bus.is_some() {
                batch.push(node);
            } else {
                self.waiting.insert(node);
            }
        }
        if batch.is_empty() {
            return Ok(());
        }
        // Parameters are substituted here, with their values of now, and only into the frame.
        let rendered = match crate::run::params::render(
            &self.state.store,
            &self.state.secret_box,
            &self.run.script,
        )
        .await
        {
            // A value put since the send may have grown the script past what a frame may carry.
            Ok(script) if script.len() > SCRIPT_MAX => Err(format!(
                "not delivered: with its parameters substituted the script is {} bytes; the limit is {SCRIPT_MAX}",
                script.len()
            )),
            Ok(script) => Ok(script),
            Err(crate::run::params::RenderError::Store(e)) => {
                self.pending.extend(batch);
                return Err(e);
            }
            Err(crate::run::params::RenderError::Missing(names)) => Err(format!(
                "not delivered: the script references parameter(s) that no longer exist: {}",
                names.join(", ")
            )),
        };
        let run = match rendered {
            Ok(script) => RunRequest {
                script: script.into_owned(),
                ..self.run.clone()
            },
            Err(message) => {
                let now = now_ms();
                let ends = batch
                    .into_iter()
                    .map(|n| {
                        let f = Finish::without_running(
                            InvocationStatus::Failed,
                            details::UNDELIVERABLE,
                            now,
                            &message,
                        );
                        (n, f)
                    })
                    .collect();
                self.ender().end(&self.cmd, ends).await?;
                return Ok(());
            }
        };
        self.state
            .store
            .mark_delivered(&self.cmd, &batch, now_ms(), Some(&self.fence))
            .await?;
        let mut direct = Vec::with_capacity(batch.len());
        for node in batch {
            if let Some(files) = &self.files {
                // Its dir and input first (a task: they may take a while); then its Run.
                self.in_flight.insert(node.clone());
                let prepare = Prepare {
                    state: self.state.clone(),
                    cmd: self.cmd.clone(),
                    node,
                    files: files.clone(),
                    inputs: self.inputs.clone(),
                    run: run.clone(),
                    fence: self.fence.clone(),
                };
                self.state.tasks.spawn(prepare.run());
                continue;
            }
            direct.push(node);
        }
        let state = self.state.clone();
        let sent = futures_util::future::join_all(
            direct
                .iter()
                .map(|node| crate::cluster::deliver(&state, node, ServerFrame::Run(run.clone()))),
        )
        .await;
        for (node, delivery) in direct.into_iter().zip(sent) {
            if delivery == Delivery::Sent {
                self.in_flight.insert(node);
                continue;
            }
            // Offline (or gone between the check and the send): it waits for the node again;
            // past a failure of the bus, it is also tried again shortly.
            self.state
                .store
                .mark_undelivered(&self.cmd, &node, Some(&self.fence))
                .await?;
            if delivery == Delivery::Unreachable {
                self.retry_at.get_or_insert(Instant::now() + RETRY);
                self.unreachable.insert(node.clone());
            }
            self.waiting.insert(node);
        }
        self.state.dispatchers.bump(&self.cmd);
        Ok(())
    }

    /// Ends every invocation not yet delivered with `status`.
    async fn end_undelivered(
        &mut self,
        status: InvocationStatus,
        why: &'static str,
    ) -> Result<(), StoreError> {
        if self.pending.is_empty() && self.waiting.is_empty() {
            return Ok(());
        }
        let now = now_ms();
        let message = match why {
            details::DELIVERY_TIMED_OUT => "the node was not reachable before the delivery timeout",
            details::MAX_ERRORS_EXCEEDED => "not started: the command exceeded its max errors",
            _ => "cancelled before it was delivered",
        };
        let nodes: Vec<NodeId> = self.pending.drain(..).chain(self.waiting.drain()).collect();
        let ends = nodes
            .into_iter()
            .map(|n| (n, Finish::without_running(status, why, now, message)))
            .collect();
        self.ender().end(&self.cmd, ends).await?;
        Ok(())
    }

    /// Past the command's expiry: invocations still unfinished (their node never came back) end.
    async fn expire(&mut self) -> Result<(), StoreError> {
        let now = now_ms();
        let nodes: Vec<NodeId> = self.in_flight.drain().collect();
        for n in &nodes {
            self.state.hub.send(
                n,
                ServerFrame::Cancel {
                    command_id: self.cmd.clone(),
                },
            );
        }
        let msg =
            "no result from the node before the command expired (delivery + execution timeout)";
        let ends = nodes
            .into_iter()
            .map(|n| {
                (
                    n,
                    Finish::without_running(
                        InvocationStatus::TimedOut,
                        details::DELIVERY_TIMED_OUT,
                        now,
                        msg,
                    ),
                )
            })
            .collect();
        self.ender().end(&self.cmd, ends).await?;
        self.end_undelivered(InvocationStatus::TimedOut, details::DELIVERY_TIMED_OUT)
            .await
    }

    async fn cancel(&mut self, nodes: Vec<NodeId>) -> Result<(), StoreError> {
        let all = nodes.is_empty();
        let chosen = |n: &NodeId| all || nodes.contains(n);
        if all {
            self.stopped = Some((InvocationStatus::Cancelled, details::CANCELLED));
            self.state
                .store
                .mark_cancel_requested(&self.cmd, Some(&self.fence))
                .await?;
        }
        // Not delivered: they end now.
        let now = now_ms();
        let undelivered: Vec<NodeId> = self
            .pending
            .iter()
            .chain(self.waiting.iter())
            .filter(|n| chosen(n))
            .cloned()
            .collect();
        if !undelivered.is_empty() {
            self.pending.retain(|n| !chosen(n));
            self.waiting.retain(|n| !chosen(n));
            let ends = undelivered
                .into_iter()
                .map(|n| {
                    let f = Finish::without_running(
                        InvocationStatus::Cancelled,
                        details::CANCELLED,
                        now,
                        "cancelled before it started",
                    );
                    (n, f)
                })
                .collect();
            self.ender().end(&self.cmd, ends).await?;
        }
        // In flight: the node stops them and reports Cancelled.
        let flying: Vec<NodeId> = self
            .in_flight
            .iter()
            .filter(|n| chosen(n))
            .cloned()
            .collect();
        if !flying.is_empty() {
            self.state
                .store
                .mark_cancelling(&self.cmd, &flying, Some(&self.fence))
                .await?;
            for n in flying {
                self.send_cancel(&n);
                self.cancelling.insert(n);
            }
            if all {
                self.state
                    .store
                    .set_command_status(
                        &self.cmd,
                        CommandStatus::Cancelling,
                        details::CANCELLING,
                        Some(&self.fence),
                    )
                    .await?;
            }
        }
        self.state.dispatchers.bump(&self.cmd);
        Ok(())
    }

    fn send_cancel(&self, node: &NodeId) {
        let frame = ServerFrame::Cancel {
            command_id: self.cmd.clone(),
        };
        if self.state.hub.send(node, frame.clone()) || self.state.bus.is_none() {
            return;
        }
        // Perhaps connected to another replica.
        let (state, node) = (self.state.clone(), node.clone());
        self.state.tasks.spawn(async move {
            crate::cluster::deliver(&state, &node, frame).await;
        });
    }

    /// Ends invocations through the one place that does (it closes their output actors too),
    /// under this dispatcher's fence.
    fn ender(&self) -> Ender<'_> {
        Ender::of(&self.state).fenced(&self.fence)
    }

    /// Rolls the invocations' statuses up into the command's final status.
    async fn finalize(&self) -> Result<(), StoreError> {
        let Some(row) = self.state.store.command_row(&self.cmd).await? else {
            return Ok(());
        };
        let tally = self.state.store.invocation_tally(&self.cmd).await?;
        let ending = Ending {
            total: row.target_count,
            errors: row.error_count,
            max_errors: self.max_errors,
            cancel_requested: row.cancel_requested,
        };
        let (status, why) = roll_up(&tally, ending);
        self.state
            .store
            .set_command_status(&self.cmd, status, why, Some(&self.fence))
            .await
    }
}

/// A node of a saved script run with files, made ready for its Run and then sent it.
struct Prepare {
    state: Arc<AppState>,
    cmd: CommandId,
    node: NodeId,
    files: ScriptFiles,
    inputs: Arc<crate::scripts::runner::Inputs>,
    run: RunRequest,
    /// The dispatcher's hold on the command: a taken-over command is not prepared further.
    fence: Fence,
}

impl Prepare {
    async fn run(self) {
        let shutdown = self.state.shutdown.clone();
        // At shutdown the delivery stays recorded: the agent does not know it when it reconnects,
        // so it is delivered (and prepared) again.
        tokio::select! {
            () = shutdown.cancelled() => {}
            r = self.go() => match r {
                Ok(()) => {}
                Err(StoreError::Fenced { held_by, .. }) => {
                    tracing::info!(cmd = %self.cmd, %held_by, "command taken over: its preparation stops here");
                }
                Err(e) => tracing::error!("a script run's preparation stopped on a storage error: {e}"),
            },
        }
    }

    async fn go(&self) -> Result<(), StoreError> {
        let Prepare {
            state, cmd, node, ..
        } = self;
        let prepared = crate::scripts::runner::prepare(
            state,
            &self.inputs,
            cmd,
            node,
            &self.files,
            &self.run.script,
            self.run.run_as.clone(),
        )
        .await;
        let script = match prepared {
            Ok(s) if s.len() > SCRIPT_MAX => Err(format!(
                "not delivered: the script with its input and output is {} bytes; the limit is {SCRIPT_MAX}",
                s.len()
            )),
            r => r,
        };
        let status = self.status().await?;
        if status.is_none_or(|s| s.is_terminal()) {
            // Ended meanwhile (expired, cancelled): its dir goes with the other ended ones.
            state.dispatchers.cleanup.notify_one();
            return Ok(());
        }
        let end = |status, why, message: &str| {
            vec![(
                node.clone(),
                Finish::without_running(status, why, now_ms(), message),
            )]
        };
        if status == Some(InvocationStatus::Cancelling) {
            let ends = end(
                InvocationStatus::Cancelled,
                details::CANCELLED,
                "cancelled before it started",
            );
            Ender::of(state).fenced(&self.fence).end(cmd, ends).await?;
            return Ok(());
        }
        let script = match script {
            Ok(s) => s,
            Err(why) => {
                tracing::info!(%cmd, %node, "script run not started: {why}");
                let ends = end(InvocationStatus::Failed, details::FAILED, &why);
                Ender::of(state).fenced(&self.fence).end(cmd, ends).await?;
                return Ok(());
            }
        };
        let run = RunRequest {
            script,
            ..self.run.clone()
        };
        if crate::cluster::deliver(state, node, ServerFrame::Run(run)).await != Delivery::Sent {
            state
                .store
                .mark_undelivered(cmd, node, Some(&self.fence))
                .await?;
            state
                .dispatchers
                .send(cmd, DispatchMsg::Undelivered(node.clone()));
        } else if self.status().await? == Some(InvocationStatus::Cancelling) {
            // A cancel that came while the Run was on its way: sent again after it.
            let cancel = ServerFrame::Cancel {
                command_id: cmd.clone(),
            };
            crate::cluster::deliver(state, node, cancel).await;
        }
        Ok(())
    }

    async fn status(&self) -> Result<Option<InvocationStatus>, StoreError> {
        let rows = self.state.store.invocation_rows(&self.cmd).await?;
        Ok(rows
            .into_iter()
            .find(|r| r.node_id == self.node)
            .map(|r| r.status))
    }
}

/// What a command's final status is rolled up from, besides its invocations' tally.
#[derive(Clone, Copy, Debug)]
pub struct Ending {
    /// Invocations of the command.
    pub total: u64,
    /// Invocations that counted as errors (the command's counter).
    pub errors: u64,
    /// The command's max errors, resolved.
    pub max_errors: u64,
    /// Whether an operator cancelled the whole command.
    pub cancel_requested: bool,
}

/// The final status of a command whose invocations all ended, as SSM rolls it up.
pub fn roll_up(tally: &Tally, e: Ending) -> (CommandStatus, &'static str) {
    let count = |status: InvocationStatus, detail: Option<&str>| -> u64 {
        tally
            .iter()
            .filter(|((s, d), _)| *s == status && detail.is_none_or(|x| x == d))
            .map(|(_, n)| *n)
            .sum()
    };
    let success = count(InvocationStatus::Success, None);
    let delivery_timeouts = count(
        InvocationStatus::TimedOut,
        Some(details::DELIVERY_TIMED_OUT),
    );
    let exec_timeouts = count(InvocationStatus::TimedOut, None).saturating_sub(delivery_timeouts);
    let operator_cancelled = count(InvocationStatus::Cancelled, Some(details::CANCELLED));
    if success == e.total {
        (CommandStatus::Success, details::SUCCESS)
    } else if e.cancel_requested && operator_cancelled > 0 {
        (CommandStatus::Cancelled, details::CANCELLED)
    } else if e.errors > e.max_errors {
        if exec_timeouts == e.errors {
            (CommandStatus::TimedOut, details::EXECUTION_TIMED_OUT)
        } else {
            (CommandStatus::Failed, details::FAILED)
        }
    } else if delivery_timeouts == e.total.saturating_sub(success) && success == 0 {
        (CommandStatus::TimedOut, details::DELIVERY_TIMED_OUT)
    } else if success + e.errors < e.total {
        // Some never ran (delivery timed out, cancelled, skipped): SSM calls this Incomplete.
        (CommandStatus::Failed, details::INCOMPLETE)
    } else {
        // Failures within max errors: the command succeeded, as SSM reports it.
        (CommandStatus::Success, details::SUCCESS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use InvocationStatus::{Cancelled, Failed, Success, TimedOut};

    /// Tally rows, total, errors, max errors, cancel requested; then the expected status.
    type Row = (
        &'static [(InvocationStatus, &'static str, u64)],
        u64,
        u64,
        u64,
        bool,
        CommandStatus,
        &'static str,
    );

    /// A tally from (status, details, count) rows.
    fn tally(rows: &[(InvocationStatus, &str, u64)]) -> Tally {
        rows.iter()
            .map(|(s, d, n)| ((*s, (*d).to_owned()), *n))
            .collect()
    }

    #[test]
    fn roll_up_follows_ssm() {
        // (rows, total, errors, max errors, cancel requested) -> final status and details.
        #[rustfmt::skip]
        let table: Vec<Row> = vec![
            (&[(Success, details::SUCCESS, 3)], 3, 0, 0, false, CommandStatus::Success, details::SUCCESS),
            // A cancel that ended nothing itself (all had finished) does not make it Cancelled.
            (&[(Success, details::SUCCESS, 2)], 2, 0, 0, true, CommandStatus::Success, details::SUCCESS),
            (&[(Success, details::SUCCESS, 1), (Cancelled, details::CANCELLED, 1)], 2, 0, 0, true, CommandStatus::Cancelled, details::CANCELLED),
            (&[(Failed, details::FAILED, 1), (Success, details::SUCCESS, 1)], 2, 1, 0, false, CommandStatus::Failed, details::FAILED),
            // Every error an execution timeout: the command timed out.
            (&[(TimedOut, details::EXECUTION_TIMED_OUT, 2)], 2, 2, 0, false, CommandStatus::TimedOut, details::EXECUTION_TIMED_OUT),
            (&[(TimedOut, details::EXECUTION_TIMED_OUT, 1), (Failed, details::FAILED, 1)], 2, 2, 0, false, CommandStatus::Failed, details::FAILED),
            // No node reached: delivery timed out.
            (&[(TimedOut, details::DELIVERY_TIMED_OUT, 3)], 3, 0, 0, false, CommandStatus::TimedOut, details::DELIVERY_TIMED_OUT),
            // Some reached, some not: Incomplete.
            (&[(Success, details::SUCCESS, 1), (TimedOut, details::DELIVERY_TIMED_OUT, 1)], 2, 0, 0, false, CommandStatus::Failed, details::INCOMPLETE),
            (&[(Failed, details::FAILED, 1), (Cancelled, details::MAX_ERRORS_EXCEEDED, 2)], 3, 1, 0, false, CommandStatus::Failed, details::FAILED),
            // Failures within max errors: Success, as SSM reports it.
            (&[(Success, details::SUCCESS, 2), (Failed, details::FAILED, 1)], 3, 1, 1, false, CommandStatus::Success, details::SUCCESS),
            (&[(Success, details::SUCCESS, 1), (Failed, details::UNDELIVERABLE, 1), (Cancelled, details::CANCELLED, 1)], 3, 1, 1, false, CommandStatus::Failed, details::INCOMPLETE),
        ];
        for (i, (rows, total, errors, max_errors, cancel_requested, status, why)) in
            table.into_iter().enumerate()
        {
            let ending = Ending {
                total,
                errors,
                max_errors,
                cancel_requested,
            };
            assert_eq!(
                roll_up(&tally(rows), ending),
                (status, why),
                "row {i}: {rows:?}"
            );
        }
    }
}
