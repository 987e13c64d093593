//! Live operations in groups: subscribers whose output cannot differ (the
//! same document, operation, variables and role) form a group, and each
//! change is rendered once per group, not once per subscriber. Every
//! member is sent the same bytes, each framed with its own subscription id
//! by its transport.
//!
//! A subscription starts on its own: async-graphql validates it and runs
//! the resolver, which joins the group at once (so nothing committed from
//! then on can be missed), then sends its snapshot or the changes after
//! its cursor, read from the log and rendered for it alone. Once caught up
//! it hands itself over ([`HandOff`]) and from then on takes the group's
//! renderings, skipping what it already sent. A member that falls behind
//! its group's buffer reads the log by its cursor again, rendering for
//! itself, and so never delays the others (`docs/adr/0007`).
//!
//! A member whose transport gives an [`Outlet`] is written to by the
//! renderer itself while it is caught up, without waking its task; when a
//! write cannot be made at once it goes back to its task, which catches up
//! from the log as above (`docs/adr/0011`).

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use async_graphql::futures_util::stream::{self, BoxStream};
use async_graphql::futures_util::{Stream, StreamExt};
use async_graphql::parser::types::{DocumentOperations, ExecutableDocument, OperationType};
use async_graphql::{Context, Request, Response, Variables};
use chrono::{DateTime, Utc};
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::broadcast::{self, Receiver, Sender};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use super::validate::fill_codes;
use super::{AppSchema, OperationContext, SseResume};
use crate::auth::Caller;
use crate::db::{Access, Identity, Role, events};
use crate::error::ApiError;
use crate::feed::{BATCH, Feed, FeedEvent};
use crate::metrics::{GroupGuard, Metrics, SubscriptionGuard};
use crate::prefetch::prefetch;

/// Renderings a group keeps for members momentarily behind; one further
/// behind reads the log.
const GROUP_BUFFER: usize = 512;
/// Fewest members one task writes a change to, when several share them.
const WRITE_SHARE_MIN: usize = 256;
/// Most writes the renderer makes before it counts them in the metrics;
/// their delay is the time at the run's end, at most a few hundred
/// microseconds later than the first write's.
const DELAY_RUN: u64 = 64;
/// Wait before the renderer reads the log again after a failed read.
const RETRY_READ: Duration = Duration::from_millis(500);

/// One change rendered: the GraphQL response (`data`, and `errors` if any)
/// as JSON text, the same for every member of a group.
#[derive(Debug)]
pub struct RenderedChange {
    /// The change's event id.
    pub event_id: i64,
    /// Its cursor, which an SSE stream sends as the event's `id`.
    pub cursor: String,
    /// When the change was committed.
    pub occurred_at: DateTime<Utc>,
    /// The response, serialised once.
    pub payload: Box<str>,
    /// The change as a transport frames it when its frame is the same for
    /// every member (an SSE event, which names no operation): built once,
    /// by the first member's outlet.
    shared_frame: OnceLock<Box<[u8]>>,
}

impl RenderedChange {
    /// The frame every member is sent, built by `frame` the first time.
    pub fn shared_frame(&self, frame: impl FnOnce(&mut Vec<u8>)) -> &[u8] {
        self.shared_frame.get_or_init(|| {
            let mut bytes = Vec::new();
            frame(&mut bytes);
            bytes.into_boxed_slice()
        })
    }

    /// Seconds from its commit to now: its delay if sent now.
    fn delay_seconds(&self) -> f64 {
        let delay = Utc::now() - self.occurred_at;
        delay.num_microseconds().unwrap_or(0) as f64 / 1e6
    }
}

/// What a live operation sends next.
pub enum Delivery {
    /// A response for this operation alone: a snapshot, a change read
    /// while catching up, an error, or a query's answer.
    Response(Box<Response>),
    /// A change rendered for the operation's group (or for it alone, while
    /// it catches up from the log).
    Rendered(Arc<RenderedChange>),
}

/// Where a member's renderings can be written by the renderer itself,
/// without waking the member's task: its transport's socket, with the
/// member's framing.
pub trait Outlet: Send + Sync {
    /// Writes `change`, framed for its operation, if that can be done now
    /// without waiting; `false` when nothing was written.
    fn offer(&self, change: &RenderedChange) -> bool;

    /// Asks for the memory `offer` reads through the outlet's own fields
    /// (its connection's parts), two members before it is offered to.
    fn prefetch(&self) {}

    /// Asks for the memory those parts lead to in turn (the socket), one
    /// member before.
    fn prefetch_socket(&self) {}
}

/// A member the renderer writes to while it is caught up. Its outlet is
/// kept in the same allocation: the renderer reads ten thousand of them
/// per change.
struct Direct<O: ?Sized = dyn Outlet> {
    state: Mutex<DirectState>,
    /// Tells the member's task it must deliver on its own again.
    fell_out: tokio::sync::Notify,
    outlet: O,
}

#[derive(Default)]
struct DirectState {
    /// The renderer writes to this member.
    on: bool,
    /// The newest change it was sent, while `on`.
    cursor: i64,
}

impl Direct {
    /// Its key in its group's list: unique while it lives.
    fn address(self: &Arc<Self>) -> usize {
        Arc::as_ptr(self).cast::<()>() as usize
    }

    fn state(&self) -> std::sync::MutexGuard<'_, DirectState> {
        self.state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }
}

/// Every group of this process, and the task rendering changes for them.
pub struct LiveGroups {
    schema: AppSchema,
    feed: Arc<Feed>,
    groups: Mutex<HashMap<GroupKey, Weak<Group>>>,
    /// The last event handed to the groups; a group formed later starts
    /// after it.
    position: AtomicI64,
    /// Tasks that write a change to a group's members at once: the cores.
    writers: usize,
}

impl std::fmt::Debug for LiveGroups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveGroups")
            .field("position", &self.position.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// What makes two subscriptions' output the same.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct GroupKey {
    query: Arc<str>,
    operation_name: Option<String>,
    /// The variables (sorted by name), less those that only choose where
    /// a subscription starts (`after`, `initial`).
    variables: String,
    role: Role,
}

/// A request as a group renders it again for each change.
struct RenderTemplate {
    query: Arc<str>,
    operation_name: Option<String>,
    variables: Variables,
    document: Option<ExecutableDocument>,
}

/// Subscribers whose output is the same, and the channel their renderings
/// go out on. Freed with its last member.
pub struct Group {
    key: GroupKey,
    live: Arc<LiveGroups>,
    template: RenderTemplate,
    /// Whom renderings run as: the members' role, without their claims
    /// (no policy or resolver reads more; see the ADR).
    caller: Caller,
    resources: Option<Vec<String>>,
    sender: Sender<Arc<RenderedChange>>,
    /// Members written to by the renderer, by their address.
    direct: Mutex<HashMap<usize, Arc<Direct>>>,
    /// The event id of the newest rendering sent.
    latest: AtomicI64,
    _counted: GroupGuard,
}

/// Tells the resolver that a group is rendering `event`: the subscription
/// yields that one change.
pub(super) struct RenderOne(pub Arc<FeedEvent>);

impl LiveGroups {
    /// Starts rendering the changes of `feed` for the groups that will form.
    pub fn start(schema: AppSchema, feed: Arc<Feed>) -> Arc<Self> {
        let receiver = feed.subscribe();
        let live = Arc::new(Self {
            schema,
            feed,
            groups: Mutex::new(HashMap::new()),
            position: AtomicI64::new(-1),
            writers: std::thread::available_parallelism().map_or(1, |cores| cores.get()),
        });
        tokio::spawn(render_changes(Arc::downgrade(&live), receiver));
        live
    }

    /// The live feed the groups follow.
    pub fn feed(&self) -> &Arc<Feed> {
        &self.feed
    }

    /// Runs `request` for `caller` as a live operation: a subscription's
    /// own responses first, then its group's renderings. Its span, when
    /// traces are on, is the child of `trace_parent` if given (a WebSocket
    /// connection's upgrade request), else of the current span (an SSE
    /// request's server span).
    pub fn subscribe(
        self: &Arc<Self>,
        mut request: Request,
        caller: Caller,
        sse_resume: Option<Arc<SseResume>>,
        trace_parent: Option<&opentelemetry::Context>,
    ) -> LiveStream {
        let traced = Traced::start(&mut request, sse_resume.is_some(), trace_parent);
        let hand_off = Arc::new(HandOff {
            template: Mutex::new(Some(RenderTemplate {
                query: Arc::from(request.query.as_str()),
                operation_name: request.operation_name.clone(),
                variables: request.variables.clone(),
                document: request.parsed_query().ok().cloned(),
            })),
            role: caller.role,
            member: Mutex::new(None),
        });
        let context = OperationContext::subscriptions(caller, self.clone(), sse_resume);
        let results = self
            .schema
            .execute_stream(request.data(context).data(hand_off.clone()));
        LiveStream {
            phase: Phase::Own {
                results,
                hand_off,
                direct: None,
            },
            traced,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<GroupKey, Weak<Group>>> {
        // Every update is one insert or remove: a panic elsewhere cannot
        // leave the map half-written.
        self.groups
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Hands `event` to every group that wants it, each rendering it once.
    async fn hand_out(&self, event: &Arc<FeedEvent>) {
        let id = event.event.id;
        let mut wanted: Vec<Arc<Group>> = {
            let groups = self.lock();
            if id <= self.position.load(Ordering::Acquire) {
                return;
            }
            // Under the lock: a member joining now either is in this list,
            // or starts after this event.
            self.position.store(id, Ordering::Release);
            groups.values().filter_map(Weak::upgrade).collect()
        };
        // Outside the lock, as every other drop of these: a group's last
        // reference may go with them.
        wanted.retain(|group| group.wants(&event.event.resource));
        if wanted.len() <= 1 {
            if let Some(group) = wanted.pop() {
                group.deliver(event).await;
            }
            return;
        }
        // Several groups are dealt out to every core, each rendering and
        // writing its groups in turn: in one task a group's rendering and
        // its writes, too few to share out, would all wait for the groups
        // before it on one core while the others idle.
        side_by_side(deal(wanted, self.writers), |groups| {
            let event = event.clone();
            async move {
                for group in groups {
                    group.deliver(&event).await;
                }
            }
        })
        .await;
    }

    /// Reads the log after the position and hands each event out: the
    /// renderer fell behind the feed's buffer. Retries until it succeeds,
    /// so no group misses a change.
    async fn catch_up(&self) {
        let reader = Identity::of_role(Role::Authenticated);
        loop {
            let after = self.position.load(Ordering::Acquire);
            let batch = self
                .feed
                .read(&reader, Access::Read, async |txn| {
                    events::read_after(txn, after, BATCH, None).await
                })
                .await;
            match batch {
                Ok(batch) => {
                    let full = batch.len() as u64 == BATCH;
                    for event in batch {
                        self.hand_out(&Arc::new(FeedEvent::new(event))).await;
                    }
                    if !full {
                        return;
                    }
                }
                Err(error) => {
                    tracing::warn!(?error, "live groups could not read the log; retrying");
                    tokio::time::sleep(RETRY_READ).await;
                }
            }
        }
    }
}

/// The renderer: every change of the feed, handed to the groups in order.
/// Ends with the server.
async fn render_changes(live: Weak<LiveGroups>, mut changes: Receiver<Arc<FeedEvent>>) {
    loop {
        let received = changes.recv().await;
        let Some(live) = live.upgrade() else {
            return;
        };
        match received {
            Ok(event) => live.hand_out(&event).await,
            Err(RecvError::Lagged(_)) => live.catch_up().await,
            Err(RecvError::Closed) => return,
        }
    }
}

impl Group {
    fn wants(&self, resource: &str) -> bool {
        self.resources
            .as_ref()
            .is_none_or(|resources| resources.iter().any(|wanted| wanted == resource))
    }

    fn direct(&self) -> std::sync::MutexGuard<'_, HashMap<usize, Arc<Direct>>> {
        self.direct
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Renders `event` once, writes it to the members the renderer writes
    /// to, and sends it to the others.
    async fn deliver(&self, event: &Arc<FeedEvent>) {
        // A member in the shared path holds a receiver; one the renderer
        // writes to is in `direct`.
        if self.sender.receiver_count() == 0 && self.direct().is_empty() {
            return;
        }
        let rendered = Arc::new(self.render(event).await);
        // Before the list is read: a member that joins the list, then
        // compares this with its cursor to be written to, either sees
        // this change (and takes it from the channel or the log) or is in
        // the list below.
        self.latest.store(rendered.event_id, Ordering::SeqCst);
        if self.sender.receiver_count() > 0 {
            // No receivers is fine: the last of them left meanwhile.
            let _ = self.sender.send(rendered.clone());
        }
        let direct: Vec<Arc<Direct>> = self.direct().values().cloned().collect();
        let metrics = self.live.feed.metrics_handle();
        // On every core: one task writing to ten thousand sockets would
        // leave the other cores idle, and each write would wake its
        // reader alone.
        if direct.len().div_ceil(self.live.writers) < WRITE_SHARE_MIN {
            write_directly(&direct, &rendered, &metrics);
            return;
        }
        side_by_side(deal(direct, self.live.writers), |members| {
            let (rendered, metrics) = (rendered.clone(), metrics.clone());
            async move { write_directly(&members, &rendered, &metrics) }
        })
        .await;
    }

    /// `event` as this group's members see it.
    async fn render(&self, event: &Arc<FeedEvent>) -> RenderedChange {
        let template = &self.template;
        let mut request =
            Request::new(template.query.as_ref()).variables(template.variables.clone());
        request.operation_name = template.operation_name.clone();
        if let Some(document) = &template.document {
            request.set_parsed_query(document.clone());
        }
        let context = OperationContext::subscriptions(self.caller.clone(), self.live.clone(), None);
        let request = request.data(context).data(RenderOne(event.clone()));
        let mut response = Box::pin(self.live.schema.execute_stream(request).next())
            .await
            .unwrap_or_else(|| {
                Response::from_errors(vec![
                    async_graphql::Error::from(ApiError::internal("a change rendered nothing"))
                        .into_server_error(Default::default()),
                ])
            });
        fill_codes(&mut response);
        self.live.feed.metrics().change_rendered();
        let payload = serde_json::to_string(&response)
            .unwrap_or_else(|_| r#"{"data":null}"#.to_owned())
            .into_boxed_str();
        RenderedChange {
            event_id: event.event.id,
            cursor: crate::feed::cursor::Cursor::at(event.event.id).encode(),
            occurred_at: event.event.occurred_at.with_timezone(&Utc),
            payload,
            shared_frame: OnceLock::new(),
        }
    }
}

/// `items` dealt round into at most `hands` parts, none of them empty.
fn deal<T>(items: Vec<T>, hands: usize) -> Vec<Vec<T>> {
    let count = hands.clamp(1, items.len().max(1));
    let mut parts: Vec<Vec<T>> = (0..count)
        .map(|_| Vec::with_capacity(items.len().div_ceil(count)))
        .collect();
    for (index, item) in items.into_iter().enumerate() {
        parts[index % count].push(item);
    }
    parts.retain(|part| !part.is_empty());
    parts
}

/// Runs `work` on each of `parts` at once, each on whichever core is free,
/// and returns when all are done.
async fn side_by_side<T, Work>(parts: Vec<Vec<T>>, work: impl Fn(Vec<T>) -> Work)
where
    Work: Future<Output = ()> + Send + 'static,
{
    // Every part is a task of its own. A task spawned alone waits in its
    // worker's next-to-run slot, which no other worker may take: worked on
    // here beside it, the parts would run one after another.
    let tasks: Vec<_> = parts
        .into_iter()
        .map(|part| tokio::spawn(work(part)))
        .collect();
    for task in tasks {
        let _ = task.await;
    }
}

/// Writes `rendered` to each member the renderer writes to; one that
/// cannot take it now is handed back to its task.
fn write_directly(members: &[Arc<Direct>], rendered: &RenderedChange, metrics: &Metrics) {
    // Counted here and reported once per run of writes, each timed at its
    // run's end: every core's writes share the metrics.
    let mut run = 0;
    for (index, member) in members.iter().enumerate() {
        // Each member's memory is a chain of pointers out of cache, and
        // each write's system call waits for the loads before it: asked
        // for ahead, one link per member, it arrives while earlier
        // members' writes run.
        if let Some(ahead) = members.get(index + 3) {
            prefetch(&**ahead);
        }
        if let Some(ahead) = members.get(index + 2) {
            ahead.outlet.prefetch();
        }
        if let Some(ahead) = members.get(index + 1) {
            ahead.outlet.prefetch_socket();
        }
        let mut state = member.state();
        if !state.on || rendered.event_id <= state.cursor {
            continue;
        }
        if member.outlet.offer(rendered) {
            state.cursor = rendered.event_id;
            run += 1;
            if run == DELAY_RUN {
                metrics.events_written_directly(rendered.delay_seconds(), run);
                run = 0;
            }
        } else {
            // Its socket is full, or busy with its own task's writes: the
            // task takes over from the log, by its cursor.
            state.on = false;
            drop(state);
            metrics.subscriber_fell_behind();
            member.fell_out.notify_one();
        }
    }
    if run > 0 {
        metrics.events_written_directly(rendered.delay_seconds(), run);
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        let mut groups = self.live.lock();
        if groups
            .get(&self.key)
            .is_some_and(|group| group.strong_count() == 0)
        {
            groups.remove(&self.key);
        }
    }
}

/// What a subscription and its transport share: how it was asked (to form
/// or find its group), and the member it becomes once caught up.
pub(super) struct HandOff {
    template: Mutex<Option<RenderTemplate>>,
    role: Role,
    member: Mutex<Option<Member>>,
}

/// A subscription joined to its group, with its own cursor, before it has
/// caught up.
pub(super) struct Joined {
    pub group: Arc<Group>,
    pub receiver: Receiver<Arc<RenderedChange>>,
    /// Every change up to this event id was rendered before the member
    /// joined; its renderings after it will all arrive.
    pub position: i64,
}

impl HandOff {
    /// Joins (or forms) the group of the subscription whose root field is
    /// `ctx`'s, following `resources`.
    pub fn join(
        &self,
        ctx: &Context<'_>,
        live: &Arc<LiveGroups>,
        resources: Option<Vec<String>>,
    ) -> Result<Joined, ApiError> {
        let template = self
            .template
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .take()
            .ok_or_else(|| ApiError::internal("one subscription joined twice"))?;
        let starts = starting_variables(ctx, &template.query);
        let variables = variables_text(&template.variables, &starts);
        let key = GroupKey {
            query: template.query.clone(),
            operation_name: template.operation_name.clone(),
            variables,
            role: self.role,
        };
        let mut groups = live.lock();
        let group = match groups.get(&key).and_then(Weak::upgrade) {
            Some(group) => group,
            None => {
                let group = Arc::new(Group {
                    key: key.clone(),
                    live: live.clone(),
                    template,
                    caller: Caller::for_role(self.role),
                    resources,
                    sender: broadcast::channel(GROUP_BUFFER).0,
                    direct: Mutex::new(HashMap::new()),
                    latest: AtomicI64::new(-1),
                    _counted: live.feed.metrics_handle().group_formed(),
                });
                groups.insert(key, Arc::downgrade(&group));
                group
            }
        };
        let receiver = group.sender.subscribe();
        let position = live
            .position
            .load(Ordering::Acquire)
            .max(live.feed.position());
        drop(groups);
        Ok(Joined {
            group,
            receiver,
            position,
        })
    }

    /// Leaves `member` for the transport: the subscription has caught up.
    pub fn hand_over(&self, member: Member) {
        *self
            .member
            .lock()
            .unwrap_or_else(|poison| poison.into_inner()) = Some(member);
    }

    fn take(&self) -> Option<Member> {
        self.member
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .take()
    }
}

/// The variables that only say where the root field's subscription starts
/// (its `after` and `initial` arguments), when nothing else in `query`
/// uses them: members differing only in those render the same changes.
fn starting_variables(ctx: &Context<'_>, query: &str) -> Vec<String> {
    ctx.item
        .node
        .arguments
        .iter()
        .filter(|(name, _)| matches!(name.node.as_str(), "after" | "initial"))
        // A variable writes itself as `$name`; nothing else starts so.
        .filter_map(|(_, value)| value.node.to_string().strip_prefix('$').map(str::to_owned))
        .filter(|name| uses_of(query, name) == 2)
        .collect()
}

/// How often `$name` appears in `query` (its declaration counts one).
fn uses_of(query: &str, name: &str) -> usize {
    let needle = format!("${name}");
    query
        .match_indices(&needle)
        .filter(|(at, _)| {
            !query[at + needle.len()..]
                .chars()
                .next()
                .is_some_and(|next| next.is_ascii_alphanumeric() || next == '_')
        })
        .count()
}

/// `variables` as text, in name order, without `left_out`.
fn variables_text(variables: &Variables, left_out: &[String]) -> String {
    let mut text = String::new();
    for (name, value) in variables.iter() {
        if left_out.iter().any(|left| left == name.as_str()) {
            continue;
        }
        text.push_str(name.as_str());
        text.push('=');
        text.push_str(&value.to_string());
        text.push(';');
    }
    text
}

/// A caught-up subscription: its place in a group, its cursor, and what
/// it needs to catch up again if it falls behind.
pub struct Member {
    group: Arc<Group>,
    /// The group's channel; `None` while the renderer writes to it.
    receiver: Option<Receiver<Arc<RenderedChange>>>,
    /// Its place in the group's `direct` list, when its transport gave an
    /// outlet.
    direct: Option<Arc<Direct>>,
    cursor: i64,
    pending: VecDeque<Arc<RenderedChange>>,
    needs_log: bool,
    done: bool,
    _counted: SubscriptionGuard,
}

impl Member {
    /// `joined`, having sent everything up to `cursor`.
    pub(super) fn new(joined: Joined, cursor: i64, counted: SubscriptionGuard) -> Self {
        Self {
            group: joined.group,
            receiver: Some(joined.receiver),
            direct: None,
            cursor,
            pending: VecDeque::new(),
            needs_log: false,
            done: false,
            _counted: counted,
        }
    }

    /// Lets the renderer write to this member through `direct` whenever
    /// it is caught up.
    fn through(mut self, direct: Arc<Direct>) -> Self {
        self.group.direct().insert(direct.address(), direct.clone());
        self.direct = Some(direct);
        self
    }

    fn delivered(&self, change: &RenderedChange) {
        self.group
            .live
            .feed
            .metrics()
            .event_delivered(change.delay_seconds());
    }

    /// Reads one batch of the log after the cursor, rendering for itself.
    async fn read_log(&mut self) -> Result<(), ApiError> {
        let after = self.cursor;
        let resources = self.group.resources.clone();
        let batch = self
            .group
            .live
            .feed
            .read(&self.group.caller.identity(), Access::Read, async |txn| {
                events::read_after(txn, after, BATCH, resources.as_deref()).await
            })
            .await?;
        self.needs_log = batch.len() as u64 == BATCH;
        for event in batch {
            let rendered = self.group.render(&Arc::new(FeedEvent::new(event))).await;
            self.pending.push_back(Arc::new(rendered));
        }
        Ok(())
    }

    async fn next(mut self) -> Option<(Delivery, Self)> {
        loop {
            if let Some(change) = self.pending.pop_front() {
                if change.event_id <= self.cursor {
                    continue;
                }
                self.cursor = change.event_id;
                if self.pending.is_empty() {
                    self.pending = VecDeque::new();
                }
                self.delivered(&change);
                return Some((Delivery::Rendered(change), self));
            }
            if self.done {
                return None;
            }
            if self.needs_log {
                if let Err(error) = Box::pin(self.read_log()).await {
                    // Ends the subscription; the client resumes from its
                    // last cursor and loses nothing.
                    tracing::warn!(?error, "subscription could not read the log");
                    self.done = true;
                    let mut response = Response::from_errors(vec![
                        async_graphql::Error::from(ApiError::Unavailable)
                            .into_server_error(Default::default()),
                    ]);
                    fill_codes(&mut response);
                    return Some((Delivery::Response(Box::new(response)), self));
                }
                continue;
            }
            if self.receiver.is_none() {
                // Written to by the renderer: wait until it stops, then
                // take over from the newest change it wrote.
                let direct = self.direct.as_ref()?;
                direct.fell_out.notified().await;
                let state = direct.state();
                if state.on {
                    continue;
                }
                self.cursor = self.cursor.max(state.cursor);
                drop(state);
                // Subscribed before the log is read: nothing rendered from
                // now on is missed.
                self.receiver = Some(self.group.sender.subscribe());
                self.needs_log = true;
                continue;
            }
            // What the channel holds already; a member the renderer may
            // write to first looks, and goes direct once it is caught up.
            let ready = match (&self.direct, &mut self.receiver) {
                (Some(direct), Some(receiver)) => match receiver.try_recv() {
                    Ok(change) => Some(Ok(change)),
                    Err(TryRecvError::Lagged(missed)) => Some(Err(RecvError::Lagged(missed))),
                    Err(TryRecvError::Closed) => Some(Err(RecvError::Closed)),
                    Err(TryRecvError::Empty) => {
                        // Caught up with everything rendered so far: the
                        // renderer writes the next change itself (see
                        // `Group::deliver` on the order of these).
                        let mut state = direct.state();
                        if self.group.latest.load(Ordering::SeqCst) <= self.cursor {
                            state.on = true;
                            state.cursor = self.cursor;
                            drop(state);
                            self.receiver = None;
                            continue;
                        }
                        None
                    }
                },
                _ => None,
            };
            let received = match (ready, self.receiver.as_mut()) {
                (Some(received), _) => received,
                (None, Some(receiver)) => receiver.recv().await,
                (None, None) => continue,
            };
            match received {
                Ok(change) => {
                    if change.event_id > self.cursor {
                        self.cursor = change.event_id;
                        self.delivered(&change);
                        return Some((Delivery::Rendered(change), self));
                    }
                }
                // Fell behind the group's buffer: read the log instead,
                // then take the renderings still buffered.
                Err(RecvError::Lagged(_)) => {
                    self.group.live.feed.metrics().subscriber_fell_behind();
                    self.needs_log = true;
                }
                Err(RecvError::Closed) => return None,
            }
        }
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        if let Some(direct) = self.direct.take() {
            // Under its lock: a write of the renderer's under way finishes
            // first, and none follows (a `complete` may come next).
            direct.state().on = false;
            self.group.direct().remove(&direct.address());
        }
    }
}

/// A live operation's deliveries, ending when it completes.
pub struct LiveStream {
    phase: Phase,
    /// Its span and how many messages it sent; `None` when traces are off,
    /// so a delivery then costs nothing more than a null check.
    traced: Option<Box<Traced>>,
}

/// The field that counts a live operation's deliveries, recorded once, at
/// its end: a span per delivery would be a span per subscriber per change.
const DELIVERIES: &str = "vantage_sync.subscription.deliveries";

/// A live operation's span, open for its life, and its deliveries.
struct Traced {
    span: tracing::Span,
    deliveries: u64,
}

impl Traced {
    /// The span of `request`'s operation, by OpenTelemetry's conventions
    /// for GraphQL: named by the operation's type and name, never by its
    /// document or variables. `None` (and nothing read) when traces are off.
    fn start(
        request: &mut Request,
        sse: bool,
        parent: Option<&opentelemetry::Context>,
    ) -> Option<Box<Self>> {
        let span = tracing::debug_span!(
            "graphql.subscription",
            otel.name = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
            graphql.operation.type = tracing::field::Empty,
            graphql.operation.name = tracing::field::Empty,
            vantage_sync.subscription.transport = if sse { "sse" } else { "websocket" },
            vantage_sync.subscription.deliveries = tracing::field::Empty,
            error.type = tracing::field::Empty,
        );
        if span.is_disabled() {
            return None;
        }
        let (kind, name) = operation_of(request);
        span.record("graphql.operation.type", kind);
        match &name {
            Some(name) => {
                span.record("otel.name", format!("{kind} {name}").as_str());
                span.record("graphql.operation.name", name.as_str());
            }
            None => {
                span.record("otel.name", kind);
            }
        }
        if let Some(parent) = parent {
            let _ = span.set_parent(parent.clone());
        }
        Some(Box::new(Self {
            span,
            deliveries: 0,
        }))
    }

    fn delivered(&mut self, delivery: &Delivery) {
        self.deliveries += 1;
        // A response of its own may be an error that ends it: its code.
        if let Delivery::Response(response) = delivery
            && let Some(code) = response.errors.first().and_then(|error| {
                match error.extensions.as_ref()?.get("code")? {
                    async_graphql::Value::String(code) => Some(code.clone()),
                    _ => None,
                }
            })
        {
            self.span.record("error.type", code.as_str());
            self.span.record("otel.status_code", "error");
        }
    }
}

impl Drop for Traced {
    fn drop(&mut self) {
        self.span.record(DELIVERIES, self.deliveries);
    }
}

/// The type and name of the operation `request` runs, as its span says
/// them: `unknown` when the document does not parse or names none.
fn operation_of(request: &mut Request) -> (&'static str, Option<String>) {
    let wanted = request.operation_name.clone();
    let Ok(document) = request.parsed_query() else {
        return ("unknown", None);
    };
    let found = match &document.operations {
        DocumentOperations::Single(operation) => Some((operation.node.ty, None)),
        DocumentOperations::Multiple(operations) => match wanted {
            Some(wanted) => operations
                .get(wanted.as_str())
                .map(|operation| (operation.node.ty, Some(wanted))),
            None if operations.len() == 1 => operations
                .iter()
                .next()
                .map(|(name, operation)| (operation.node.ty, Some(name.to_string()))),
            None => None,
        },
    };
    match found {
        Some((ty, name)) => (
            match ty {
                OperationType::Query => "query",
                OperationType::Mutation => "mutation",
                OperationType::Subscription => "subscription",
            },
            name,
        ),
        None => ("unknown", None),
    }
}

enum Phase {
    /// async-graphql runs the operation: validation, errors, and a
    /// subscription's start, rendered for it alone.
    Own {
        results: BoxStream<'static, Response>,
        hand_off: Arc<HandOff>,
        /// Where the renderer may write to it once it is a member.
        direct: Option<Arc<Direct>>,
    },
    /// A member of its group.
    Member(BoxStream<'static, Delivery>),
    Done,
}

impl Phase {
    fn poll_next(&mut self, cx: &mut TaskContext<'_>) -> Poll<Option<Delivery>> {
        loop {
            match self {
                Phase::Own {
                    results,
                    hand_off,
                    direct,
                } => match results.poll_next_unpin(cx) {
                    Poll::Ready(Some(mut response)) => {
                        fill_codes(&mut response);
                        return Poll::Ready(Some(Delivery::Response(Box::new(response))));
                    }
                    Poll::Ready(None) => {
                        *self = match hand_off.take() {
                            Some(member) => {
                                let member = match direct.take() {
                                    Some(direct) => member.through(direct),
                                    None => member,
                                };
                                Phase::Member(stream::unfold(member, Member::next).boxed())
                            }
                            None => Phase::Done,
                        };
                    }
                    Poll::Pending => return Poll::Pending,
                },
                Phase::Member(deliveries) => {
                    let next = deliveries.poll_next_unpin(cx);
                    if let Poll::Ready(None) = next {
                        *self = Phase::Done;
                    }
                    return next;
                }
                Phase::Done => return Poll::Ready(None),
            }
        }
    }
}

impl LiveStream {
    /// Ends the operation at once: nothing more of it is delivered.
    pub fn end(&mut self) {
        self.phase = Phase::Done;
    }

    /// Lets the renderer write this operation's changes through `outlet`
    /// while it is caught up with its group, instead of handing each to
    /// the transport's task. Not while traced: its span counts every
    /// delivery.
    pub fn deliver_through(&mut self, outlet: impl Outlet + 'static) {
        if self.traced.is_none()
            && let Phase::Own { direct, .. } = &mut self.phase
        {
            *direct = Some(Arc::new(Direct {
                state: Mutex::new(DirectState::default()),
                fell_out: tokio::sync::Notify::new(),
                outlet,
            }));
        }
    }
}

impl Stream for LiveStream {
    type Item = Delivery;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Delivery>> {
        let this = &mut *self;
        let Some(traced) = &mut this.traced else {
            return this.phase.poll_next(cx);
        };
        // Its start (the snapshot, or the log after its cursor) is read
        // in its span; a member's deliveries are only counted.
        let next = if matches!(this.phase, Phase::Own { .. }) {
            let _entered = traced.span.enter();
            this.phase.poll_next(cx)
        } else {
            this.phase.poll_next(cx)
        };
        if let Poll::Ready(Some(delivery)) = &next {
            traced.delivered(delivery);
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_variable_counts_as_starting_only_where_nothing_else_uses_it() {
        let query = "subscription($after: String, $afterAll: Boolean) { syncStateChanged(after: $after) @include(if: $afterAll) { cursor } }";
        assert_eq!(uses_of(query, "after"), 2);
        assert_eq!(uses_of(query, "afterAll"), 2);
        assert_eq!(
            uses_of(
                "subscription($x: Boolean) { a(initial: $x) @include(if: $x) { b } }",
                "x"
            ),
            3
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn parts_side_by_side_run_at_once_on_two_cores() {
        use std::sync::atomic::AtomicUsize;
        // Each part waits (a while) for the other to start: one after the
        // other, the first waits in vain.
        let started = Arc::new(AtomicUsize::new(0));
        let met = Arc::new(AtomicUsize::new(0));
        let (started_in, met_in) = (started.clone(), met.clone());
        // From a task on a worker, as the renderer calls it.
        tokio::spawn(side_by_side(vec![vec![1], vec![2]], move |_: Vec<i32>| {
            let (started_in, met_in) = (started_in.clone(), met_in.clone());
            async move {
                started_in.fetch_add(1, Ordering::SeqCst);
                let until = std::time::Instant::now() + Duration::from_secs(5);
                while started_in.load(Ordering::SeqCst) < 2 && std::time::Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(1));
                }
                if started_in.load(Ordering::SeqCst) == 2 {
                    met_in.fetch_add(1, Ordering::SeqCst);
                }
            }
        }))
        .await
        .unwrap();
        assert_eq!(started.load(Ordering::SeqCst), 2);
        assert_eq!(
            met.load(Ordering::SeqCst),
            2,
            "the parts ran one after the other"
        );
    }

    #[test]
    fn dealt_parts_hold_every_item_once_and_none_is_empty() {
        assert_eq!(
            deal(vec![1, 2, 3, 4, 5], 2),
            vec![vec![1, 3, 5], vec![2, 4]]
        );
        assert_eq!(deal(vec![1, 2], 4), vec![vec![1], vec![2]]);
        assert_eq!(deal(vec![1, 2], 0), vec![vec![1, 2]]);
        assert!(deal(Vec::<i32>::new(), 2).is_empty());
    }

    #[test]
    fn variables_text_is_in_name_order_and_leaves_out_what_it_is_told() {
        let variables = Variables::from_json(serde_json::json!({
            "resources": ["funds"], "after": "1:3", "initial": true
        }));
        assert_eq!(
            variables_text(&variables, &["after".to_owned()]),
            r#"initial=true;resources=["funds"];"#
        );
    }
}
