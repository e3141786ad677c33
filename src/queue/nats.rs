//! The JetStream backend (`storage.backend: nats`): one queue shared by every replica.
//!
//! # Layout (`S` is `storage.stream`)
//!
//! | what | where |
//! | --- | --- |
//! | jobs | stream `S`, work-queue retention, subject `S.jobs.<route>.<id>`; the payload is the job record (the redb encoding); `Nats-Msg-Id` is a hash of route and idempotency key |
//! | deliveries | a durable pull consumer `<route>` on `S` (filter `S.jobs.<route>.*`, explicit acks), shared by every replica |
//! | dead letters | stream `S_DEAD`, subject `S_DEAD.<route>.<id>`: the job with its reason and last response |
//! | keys of finished jobs | key-value bucket `S_KEYS`: key hash → (id, fingerprint), kept for the dedupe window |
//! | route control, quotas, retry details | key-value bucket `S_STATE`: `route.<r>`, `quota.<r>.<i>`, `retry.<id>` |
//!
//! Route names may hold `.`, which separates subject tokens; in subjects and consumer names
//! it is written `~` (not allowed in route names, so the mapping is one to one).
//!
//! # How the trait maps onto JetStream
//!
//! - `enqueue` publishes and waits for the stream's ack: the job is stored on the stream's
//!   replicas before the caller answers 202. Concurrent accepts share the client's connection,
//!   so their publishes go out together and their acks come back in one read. A repeated key
//!   inside the duplicate window is dropped by JetStream, whose ack names the original's
//!   sequence; the original is read back (still queued) or found in `S_KEYS` (delivered or
//!   dead) to answer with its id and to tell a replay from a key conflict.
//! - `lease_due` fetches from the route's consumer. JetStream owns due times (a retry is a NAK
//!   with a delay), so the `now` arguments of the trait are not used for due times here;
//!   `attempts` is JetStream's delivery count plus the attempts a replayed job had before.
//!   A lease lives in this process until ack, reschedule or dead letter; progress is signalled
//!   every third of `ack_wait`, and the leases of a replica that dies go to another replica once
//!   `ack_wait` passes.
//! - `ack` writes the key marker, then acks (and waits for the server to confirm): once a job
//!   is gone from the stream its key still answers as a duplicate.
//! - `dead_letter` publishes the dead record (msg id = job id, so a repeat after a crash
//!   stores one record), writes the key marker, then terminates the message.
//! - Limits of this backend, reported as [`StoreError::Unsupported`] where a caller asks:
//!   ordering keys (refused by config validation), making a retrying job due early, and
//!   delivered jobs (the work-queue stream drops them on ack; `get` finds them no more).
//!   Max attempts and max age are enforced by the dispatcher, which dead-letters with the
//!   last response; JetStream's MaxDeliver would drop a message with no record of why.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{
    self,
    consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer},
    message::AckKind,
    stream::{self, DiscardPolicy, RetentionPolicy, StorageType},
};
use async_nats::HeaderMap;
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use parking_lot::Mutex;
use sha2::{Digest, Sha256};

use super::redb::schema;
use super::{
    Durable, EnqueueOutcome, Job, JobId, JobState, JobStore, LastOutcome, NewJob, RouteStats,
    StoreError,
};
use crate::config::NatsConfig;

/// How long a depth count read from the server is used before it is read again; accepts of
/// this replica since the read are added to it.
const DEPTH_TTL: Duration = Duration::from_secs(1);
/// Tries of a compare-and-set on a quota counter before giving up as busy.
const QUOTA_TRIES: usize = 16;
/// How long a route whose last fetch came back empty waits before fetching again (new jobs
/// from other replicas, retry delays that ended).
const IDLE_POLL: Duration = Duration::from_millis(250);
/// Largest dead-letter list `replay_dead` or `list` reads in one call.
const SCAN_MAX: usize = 100_000;
/// What a key marker says of the job that held the key.
const MARK_PENDING: u8 = 0;
const MARK_DELIVERED: u8 = 1;
const MARK_DEAD: u8 = 2;
const MARK_DELETED: u8 = 3;

/// Settings the store needs beside [`NatsConfig`].
#[derive(Clone, Debug)]
pub struct NatsOptions {
    /// Deferrable routes at start: their consumers are created or checked at once.
    pub routes: Vec<String>,
    /// The longest `dedupe_window` among the routes: JetStream's duplicate window and the
    /// age of key markers.
    pub dedupe_window: Duration,
}

/// A job leased by this process: the message to settle and the job as leased.
struct Lease {
    msg: jetstream::Message,
    job: Job,
}

struct DepthCache {
    read_at: tokio::time::Instant,
    depth: u64,
    /// One accept reads the server's count; the others use the last one meanwhile.
    refreshing: bool,
}

/// See the module docs.
pub struct NatsStore {
    client: async_nats::Client,
    js: jetstream::Context,
    stream: String,
    jobs: stream::Stream,
    dead: stream::Stream,
    keys: Bucket,
    state: Bucket,
    ack_wait: Duration,
    /// Routes this process knows: configured at start, and any that enqueued since.
    known: Mutex<BTreeSet<String>>,
    consumers: tokio::sync::Mutex<HashMap<String, PullConsumer>>,
    leases: Arc<Mutex<HashMap<JobId, Lease>>>,
    /// The stream's undelivered jobs (all routes), see [`Self::depth`].
    depth: Mutex<Option<DepthCache>>,
    /// When a route's last fetch came back empty (see `next_due`).
    empty_at: Mutex<HashMap<String, tokio::time::Instant>>,
    failed: AtomicBool,
    progress: tokio::task::JoinHandle<()>,
}

impl Drop for NatsStore {
    fn drop(&mut self) {
        self.progress.abort();
    }
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("nats: {e}"))
}

/// A route name as a subject token or consumer name.
fn token(route: &str) -> String {
    route.replace('.', "~")
}

fn route_of_token(token: &str) -> String {
    token.replace('~', ".")
}

/// The dedupe identity of (route, key): the `Nats-Msg-Id` and the `S_KEYS` key.
fn key_hash(route: &str, key: &str) -> String {
    let mut h = Sha256::new();
    h.update(route.as_bytes());
    h.update([0]);
    h.update(key.as_bytes());
    hex::encode(&h.finalize()[..16])
}

/// Where `reschedule` keeps a retrying job's attempts, due time and last outcome.
fn retry_key(id: JobId) -> String {
    format!("retry.{id}")
}

fn now_ms() -> u64 {
    crate::proxy::defer::now_ms()
}

fn encode_marker(id: JobId, fingerprint: &[u8; 32], mark: u8) -> Bytes {
    let mut v = Vec::with_capacity(49);
    v.extend_from_slice(&id.as_u128().to_be_bytes());
    v.extend_from_slice(fingerprint);
    v.push(mark);
    v.into()
}

fn decode_marker(v: &[u8]) -> Option<(JobId, [u8; 32], u8)> {
    if v.len() != 49 {
        return None;
    }
    let id = u128::from_be_bytes(v[..16].try_into().ok()?);
    let fp: [u8; 32] = v[16..48].try_into().ok()?;
    Some((JobId::from_u128(id), fp, v[48]))
}

fn decode_job(bytes: &[u8]) -> Result<Job, StoreError> {
    schema::decode_job(bytes).map_err(|e| unavailable(format!("a stored job is unreadable: {e}")))
}

/// A mismatch between the stream or consumer on the server and what this config needs.
fn mismatch(
    what: &str,
    setting: &str,
    found: impl std::fmt::Debug,
    want: impl std::fmt::Debug,
) -> StoreError {
    StoreError::Unavailable(format!(
        "nats: {what} has {setting} {found:?}, but spillway needs {want:?}; change it on the server or use another storage.stream"
    ))
}

impl NatsStore {
    /// Connects, then creates or checks the streams, buckets and the consumers of `routes`.
    pub async fn open(cfg: &NatsConfig, opts: NatsOptions) -> Result<Self, StoreError> {
        let mut connect = async_nats::ConnectOptions::new()
            .name("spillway")
            .connection_timeout(Duration::from_secs(5))
            // Keep trying for ever after a disconnect: the proxy answers 503 meanwhile.
            .max_reconnects(None);
        if let Some(path) = &cfg.credentials_file {
            connect = connect.credentials_file(path).await.map_err(|e| {
                StoreError::Unavailable(format!(
                    "nats: cannot read credentials_file {}: {e}",
                    path.display()
                ))
            })?;
        }
        let client = connect.connect(cfg.url.as_str()).await.map_err(|e| {
            StoreError::Unavailable(format!("nats: cannot connect to {}: {e}", redact(&cfg.url)))
        })?;
        let js = jetstream::new(client.clone());
        let s = &cfg.stream;
        let replicas = cfg.replicas as usize;
        let window = opts.dedupe_window.max(Duration::from_secs(1));

        let jobs = ensure_stream(
            &js,
            stream::Config {
                name: s.clone(),
                description: Some("spillway jobs".into()),
                subjects: vec![format!("{s}.jobs.>")],
                retention: RetentionPolicy::WorkQueue,
                storage: StorageType::File,
                num_replicas: replicas,
                duplicate_window: window,
                discard: DiscardPolicy::New,
                ..Default::default()
            },
        )
        .await?;
        let dead = ensure_stream(
            &js,
            stream::Config {
                name: format!("{s}_DEAD"),
                description: Some("spillway dead letters".into()),
                subjects: vec![format!("{s}_DEAD.>")],
                retention: RetentionPolicy::Limits,
                storage: StorageType::File,
                num_replicas: replicas,
                duplicate_window: Duration::from_secs(120),
                ..Default::default()
            },
        )
        .await?;
        let keys = Bucket::ensure(
            &js,
            format!("{s}_KEYS"),
            format!("{s}.keys"),
            "spillway: keys of delivered and dead jobs",
            window,
            replicas,
        )
        .await?;
        let state = Bucket::ensure(
            &js,
            format!("{s}_STATE"),
            format!("{s}.state"),
            "spillway: route pauses, quotas and retry details",
            Duration::ZERO,
            replicas,
        )
        .await?;

        let leases: Arc<Mutex<HashMap<JobId, Lease>>> = Arc::default();
        let progress = tokio::spawn(signal_progress(leases.clone(), cfg.ack_wait));
        let store = NatsStore {
            client,
            js,
            stream: s.clone(),
            jobs,
            dead,
            keys,
            state,
            ack_wait: cfg.ack_wait,
            known: Mutex::new(opts.routes.iter().cloned().collect()),
            consumers: tokio::sync::Mutex::default(),
            leases,
            depth: Mutex::default(),
            empty_at: Mutex::default(),
            failed: AtomicBool::new(false),
            progress,
        };
        for route in &opts.routes {
            store.consumer(route).await?;
        }
        Ok(store)
    }

    /// Deletes the streams a store named `stream` made (jobs, dead letters, keys, state),
    /// with every job in them: for demos and tests that used a stream of their own. Streams
    /// that are not there, or a server that does not answer, are left as they are.
    pub async fn remove_streams(url: &str, stream: &str) {
        let Ok(client) = async_nats::connect(url).await else {
            return;
        };
        let js = jetstream::new(client);
        for name in [
            stream.to_owned(),
            format!("{stream}_DEAD"),
            format!("{stream}_KEYS"),
            format!("{stream}_STATE"),
        ] {
            let _ = js.delete_stream(name).await;
        }
    }

    fn job_subject(&self, route: &str, id: JobId) -> String {
        format!("{}.jobs.{}.{}", self.stream, token(route), id)
    }

    fn dead_subject(&self, route: &str, id: JobId) -> String {
        format!("{}_DEAD.{}.{}", self.stream, token(route), id)
    }

    fn fail(&self, e: impl std::fmt::Display) -> StoreError {
        self.failed.store(true, Ordering::Relaxed);
        unavailable(e)
    }

    /// Notes the outcome of a server call for `healthy`.
    fn seen<T, E: std::fmt::Display>(&self, r: Result<T, E>) -> Result<T, StoreError> {
        match r {
            Ok(v) => {
                self.failed.store(false, Ordering::Relaxed);
                Ok(v)
            }
            Err(e) => Err(self.fail(e)),
        }
    }

    /// The route's durable consumer, created (or checked) on first use.
    async fn consumer(&self, route: &str) -> Result<PullConsumer, StoreError> {
        let mut map = self.consumers.lock().await;
        if let Some(c) = map.get(route) {
            return Ok(c.clone());
        }
        let name = token(route);
        let want = pull::Config {
            durable_name: Some(name.clone()),
            description: Some(format!("spillway deliveries of route {route}")),
            filter_subject: format!("{}.jobs.{name}.*", self.stream),
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::Explicit,
            ack_wait: self.ack_wait,
            // Max attempts are the dispatcher's: it dead-letters with the last response.
            max_deliver: -1,
            // Jobs waiting out a retry delay count as pending acks; a cap would stall the route.
            max_ack_pending: -1,
            ..Default::default()
        };
        let consumer: PullConsumer =
            self.seen(self.jobs.get_or_create_consumer(&name, want.clone()).await)?;
        let have = &consumer.cached_info().config;
        let what = format!("consumer {name} of stream {}", self.stream);
        if have.filter_subject != want.filter_subject {
            return Err(mismatch(
                &what,
                "filter_subject",
                &have.filter_subject,
                &want.filter_subject,
            ));
        }
        if have.ack_policy != AckPolicy::Explicit {
            return Err(mismatch(
                &what,
                "ack_policy",
                have.ack_policy,
                AckPolicy::Explicit,
            ));
        }
        if have.max_deliver > 0 {
            return Err(mismatch(&what, "max_deliver", have.max_deliver, -1));
        }
        let consumer = if have.ack_wait != want.ack_wait {
            // ack_wait follows storage.ack_wait; the server allows changing it in place.
            self.seen(self.jobs.create_consumer(want).await)?
        } else {
            consumer
        };
        map.insert(route.to_owned(), consumer.clone());
        Ok(consumer)
    }

    /// What the `max_depth` check compares with: the stream's message count (a work queue
    /// holds only undelivered jobs, of every route), at most [`DEPTH_TTL`] old, plus what this
    /// replica accepted since. So the check is conservative when routes share a stream, and
    /// other replicas' accepts since the read are not seen. Not the consumer's pending count:
    /// a 2.9 server computes that by walking every subject (one per job) with the stream
    /// locked, which stalled concurrent accepts for tens of ms on a large backlog.
    async fn depth(&self) -> Result<u64, StoreError> {
        {
            let mut cache = self.depth.lock();
            if let Some(c) = cache.as_mut() {
                if c.refreshing || c.read_at.elapsed() < DEPTH_TTL {
                    return Ok(c.depth);
                }
                c.refreshing = true;
            }
        }
        let read = self.jobs.get_info().await;
        let mut cache = self.depth.lock();
        match self.seen(read) {
            Ok(info) => {
                *cache = Some(DepthCache {
                    read_at: tokio::time::Instant::now(),
                    depth: info.state.messages,
                    refreshing: false,
                });
                Ok(info.state.messages)
            }
            Err(e) => {
                if let Some(c) = cache.as_mut() {
                    c.refreshing = false;
                }
                Err(e)
            }
        }
    }

    fn count_accept(&self) {
        if let Some(c) = self.depth.lock().as_mut() {
            c.depth += 1;
        }
    }

    /// The message of a job in the jobs stream, if it is there.
    async fn queued_message(
        &self,
        route: &str,
        id: JobId,
    ) -> Result<Option<jetstream::message::StreamMessage>, StoreError> {
        last_by_subject(&self.jobs, &self.job_subject(route, id)).await
    }

    async fn dead_message(
        &self,
        route: &str,
        id: JobId,
    ) -> Result<Option<jetstream::message::StreamMessage>, StoreError> {
        last_by_subject(&self.dead, &self.dead_subject(route, id)).await
    }

    /// Retry details written by `reschedule`: attempts, due time and last outcome.
    async fn retry_info(&self, id: JobId) -> Result<Option<Job>, StoreError> {
        let v = self.seen(self.state.get(&retry_key(id)).await)?;
        v.map(|b| decode_job(&b)).transpose()
    }

    /// A job of `route` in the jobs stream (or leased here), with its retry details.
    async fn queued_job(&self, route: &str, id: JobId) -> Result<Option<(Job, Place)>, StoreError> {
        if let Some(l) = self.leases.lock().get(&id) {
            return Ok(Some((l.job.clone(), Place::Leased)));
        }
        let Some(m) = self.queued_message(route, id).await? else {
            return Ok(None);
        };
        let mut job = decode_job(&m.payload)?;
        if let Some(r) = self.retry_info(id).await? {
            job.state = JobState::Retrying;
            job.attempts = r.attempts;
            job.next_attempt_at_ms = r.next_attempt_at_ms;
            job.updated_at_ms = r.updated_at_ms;
            job.last = r.last;
        }
        Ok(Some((job, Place::Queued)))
    }

    /// Finds a job wherever it is: leased here, in the jobs stream, or dead.
    async fn find(&self, id: JobId) -> Result<Option<(Job, Place)>, StoreError> {
        if let Some(l) = self.leases.lock().get(&id) {
            return Ok(Some((l.job.clone(), Place::Leased)));
        }
        let routes: Vec<String> = self.known.lock().iter().cloned().collect();
        for route in &routes {
            if let Some(found) = self.queued_job(route, id).await? {
                return Ok(Some(found));
            }
            if let Some(m) = self.dead_message(route, id).await? {
                return Ok(Some((decode_job(&m.payload)?, Place::Dead(m.sequence))));
            }
        }
        Ok(None)
    }

    async fn mark_key(&self, job: &Job, mark: u8) -> Result<(), StoreError> {
        let key = key_hash(&job.route, &job.idempotency_key);
        self.seen(
            self.keys
                .put(&key, encode_marker(job.id, &job.fingerprint, mark))
                .await,
        )?;
        Ok(())
    }

    /// Publishes a job to the jobs stream with `msg_id` and waits for the ack.
    async fn publish_job(
        &self,
        job: &Job,
        msg_id: &str,
    ) -> Result<jetstream::publish::PublishAck, StoreError> {
        self.publish_record(self.job_subject(&job.route, job.id), job, msg_id)
            .await
    }

    /// Publishes a job record on `subject` with `msg_id` (JetStream drops a repeat of it
    /// within the duplicate window) and waits for the stream's ack.
    async fn publish_record(
        &self,
        subject: String,
        job: &Job,
        msg_id: &str,
    ) -> Result<jetstream::publish::PublishAck, StoreError> {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", msg_id);
        let payload: Bytes = schema::encode_job(job).into();
        let ack = self.seen(
            self.js
                .publish_with_headers(subject, headers, payload)
                .await,
        )?;
        self.seen(ack.await)
    }

    /// The answer to a repeated key (hash `key`) whose original is at `seq`; `job` is the
    /// repeat, not stored.
    async fn duplicate(
        &self,
        job: &Job,
        key: &str,
        seq: u64,
    ) -> Result<EnqueueOutcome, StoreError> {
        let original = match self.jobs.get_raw_message(seq).await {
            Ok(m) => Some(decode_job(&m.payload)?),
            Err(e) if matches!(e.kind(), stream::LastRawMessageErrorKind::NoMessageFound) => None,
            Err(e) => return Err(self.fail(e)),
        };
        let (id, fp) = match original {
            Some(j) => (j.id, j.fingerprint),
            None => {
                match self.seen(self.keys.get(key).await)?.and_then(|v| decode_marker(&v)) {
                    Some((_, _, MARK_DELETED)) => {
                        // The job holding the key was deleted: the key is free, but JetStream
                        // still remembers it, so this job is stored under its own msg id.
                        self.publish_job(job, &format!("{key}-{}", job.id)).await?;
                        // Later replays find the new job through the marker, not the old msg id.
                        self.mark_key(job, MARK_PENDING).await?;
                        return Ok(EnqueueOutcome::Stored(Durable::after_commit(job.id)));
                    }
                    Some((id, fp, _)) => (id, fp),
                    None => {
                        return Err(StoreError::Unavailable(
                            "nats: a repeated key's original job is neither queued nor recorded as finished; try again".into(),
                        ))
                    }
                }
            }
        };
        Ok(Self::held_by(id, fp, job))
    }

    /// The answer to a replay of a key held by `id`: the same request is a duplicate.
    fn held_by(id: JobId, fingerprint: [u8; 32], job: &Job) -> EnqueueOutcome {
        if fingerprint == job.fingerprint {
            EnqueueOutcome::Duplicate(Durable::after_commit(id))
        } else {
            EnqueueOutcome::KeyConflict(id)
        }
    }

    /// Jobs of `route` leased by this process.
    fn leased(&self, route: &str) -> usize {
        self.leases
            .lock()
            .values()
            .filter(|l| l.job.route == route)
            .count()
    }

    /// Writes a route's `(paused, paused_until_ms)`; replicas read it in `route_control`.
    async fn put_control(
        &self,
        route: &str,
        paused: bool,
        until: Option<u64>,
    ) -> Result<(), StoreError> {
        let value = schema::encode_route(&schema::RouteRecordV1 {
            paused,
            paused_until_ms: until,
        });
        self.seen(
            self.state
                .put(&format!("route.{route}"), value.into())
                .await,
        )?;
        Ok(())
    }

    fn take_lease(&self, id: JobId) -> Result<Lease, StoreError> {
        self.leases.lock().remove(&id).ok_or(StoreError::NotFound)
    }

    /// Puts a lease back after a failed settle, so the dispatcher's retry can settle it.
    fn restore_lease(&self, id: JobId, lease: Lease) {
        self.leases.lock().insert(id, lease);
    }

    /// Moves a dead job back to the jobs stream (queued, with a fresh budget of attempts) and drops the dead record.
    async fn revive(&self, mut job: Job, dead_seq: u64, now_ms: u64) -> Result<(), StoreError> {
        job.state = JobState::Queued;
        job.dead_reason = None;
        // A fresh budget of attempts, as with redb: the old count would kill it at once.
        job.attempts = 0;
        job.next_attempt_at_ms = now_ms;
        job.updated_at_ms = now_ms;
        // A msg id of its own: the key's id is still in the duplicate window.
        let msg_id = format!("revive-{}-{dead_seq}", job.id);
        self.publish_job(&job, &msg_id).await?;
        self.seen(self.dead.delete_message(dead_seq).await)?;
        Ok(())
    }

    async fn dead_count(&self, route: &str) -> Result<u64, StoreError> {
        let filter = format!("{}_DEAD.{}.*", self.stream, token(route));
        let mut info = self.seen(self.dead.info_with_subjects(filter).await)?;
        let mut n = 0u64;
        while let Some(entry) = info.next().await {
            n += self.seen(entry)?.1 as u64;
        }
        Ok(n)
    }

    /// Ids stored under `filter` in `stream`, read from the stream's subject list.
    async fn ids_in(
        &self,
        stream: &stream::Stream,
        filter: String,
    ) -> Result<Vec<(String, JobId)>, StoreError> {
        let mut info = self.seen(stream.info_with_subjects(filter).await)?;
        let mut out = Vec::new();
        while let Some(entry) = info.next().await {
            let (subject, _) = self.seen(entry)?;
            let mut parts = subject.rsplitn(3, '.');
            if let (Some(id), Some(route)) = (parts.next(), parts.next()) {
                if let Ok(id) = id.parse::<JobId>() {
                    out.push((route_of_token(route), id));
                }
            }
            if out.len() >= SCAN_MAX {
                break;
            }
        }
        Ok(out)
    }
}

enum Place {
    Leased,
    Queued,
    /// In the dead stream, at this sequence.
    Dead(u64),
}

/// Creates the stream, or checks that the one on the server fits.
async fn ensure_stream(
    js: &jetstream::Context,
    want: stream::Config,
) -> Result<stream::Stream, StoreError> {
    let mut s = js
        .get_or_create_stream(want.clone())
        .await
        .map_err(|e| unavailable(format!("stream {}: {e}", want.name)))?;
    let have = s
        .info()
        .await
        .map_err(|e| unavailable(format!("stream {}: {e}", want.name)))?
        .config
        .clone();
    let what = format!("stream {}", want.name);
    if have.retention != want.retention {
        return Err(mismatch(&what, "retention", have.retention, want.retention));
    }
    if have.storage != want.storage {
        return Err(mismatch(&what, "storage", have.storage, want.storage));
    }
    if have.num_replicas.max(1) != want.num_replicas.max(1) {
        return Err(mismatch(
            &what,
            "replicas (storage.replicas)",
            have.num_replicas,
            want.num_replicas,
        ));
    }
    if have.subjects != want.subjects {
        return Err(mismatch(&what, "subjects", &have.subjects, &want.subjects));
    }
    if have.duplicate_window != want.duplicate_window {
        // Follows the longest dedupe_window of the routes; JetStream allows changing it.
        let mut update = have;
        update.duplicate_window = want.duplicate_window;
        js.update_stream(update).await.map_err(|e| {
            unavailable(format!(
                "stream {}: cannot set duplicate_window: {e}",
                want.name
            ))
        })?;
    }
    Ok(s)
}

async fn last_by_subject(
    stream: &stream::Stream,
    subject: &str,
) -> Result<Option<jetstream::message::StreamMessage>, StoreError> {
    match stream.get_last_raw_message_by_subject(subject).await {
        Ok(m) => Ok(Some(m)),
        Err(e) if matches!(e.kind(), stream::LastRawMessageErrorKind::NoMessageFound) => Ok(None),
        Err(e) => Err(unavailable(e)),
    }
}

/// Keeps leases alive while deliveries run longer than a third of `ack_wait`.
async fn signal_progress(leases: Arc<Mutex<HashMap<JobId, Lease>>>, ack_wait: Duration) {
    let every = (ack_wait / 3).max(Duration::from_millis(100));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let msgs: Vec<jetstream::Message> = leases.lock().values().map(|l| l.msg.clone()).collect();
        for m in msgs {
            if let Err(e) = m.ack_with(AckKind::Progress).await {
                tracing::debug!(error = %e, "nats: progress signal failed");
            }
        }
    }
}

/// The URL without its password, for errors.
fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_owned(),
    }
}

/// A key-value map on a plain stream: the last message of subject `<prefix>.<key>` is the
/// value. (async-nats' own key-value API asks a 2.9 server for what it cannot answer.)
struct Bucket {
    stream: stream::Stream,
    js: jetstream::Context,
    prefix: String,
}

/// One value and the stream sequence that wrote it (for compare-and-set).
struct Entry {
    value: Bytes,
    revision: u64,
}

impl Bucket {
    /// Creates or checks the bucket's stream; `max_age` zero keeps values for ever.
    async fn ensure(
        js: &jetstream::Context,
        name: String,
        prefix: String,
        description: &str,
        max_age: Duration,
        replicas: usize,
    ) -> Result<Bucket, StoreError> {
        let stream = ensure_stream(
            js,
            stream::Config {
                name,
                description: Some(description.into()),
                subjects: vec![format!("{prefix}.>")],
                max_messages_per_subject: 1,
                max_age,
                storage: StorageType::File,
                num_replicas: replicas,
                discard: DiscardPolicy::Old,
                ..Default::default()
            },
        )
        .await?;
        Ok(Bucket {
            stream,
            js: js.clone(),
            prefix,
        })
    }

    fn subject(&self, key: &str) -> String {
        format!("{}.{key}", self.prefix)
    }

    async fn entry(&self, key: &str) -> Result<Option<Entry>, async_nats::Error> {
        match self
            .stream
            .get_last_raw_message_by_subject(&self.subject(key))
            .await
        {
            Ok(m) => Ok(Some(Entry {
                value: m.payload,
                revision: m.sequence,
            })),
            Err(e) if matches!(e.kind(), stream::LastRawMessageErrorKind::NoMessageFound) => {
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>, async_nats::Error> {
        Ok(self.entry(key).await?.map(|e| e.value))
    }

    async fn publish(
        &self,
        key: &str,
        value: Bytes,
        expect: Option<u64>,
    ) -> Result<u64, async_nats::Error> {
        let mut headers = HeaderMap::new();
        if let Some(seq) = expect {
            headers.insert(
                "Nats-Expected-Last-Subject-Sequence",
                seq.to_string().as_str(),
            );
        }
        let ack = self
            .js
            .publish_with_headers(self.subject(key), headers, value)
            .await?
            .await?;
        Ok(ack.sequence)
    }

    async fn put(&self, key: &str, value: Bytes) -> Result<u64, async_nats::Error> {
        self.publish(key, value, None).await
    }

    /// Writes only if the key has no value.
    async fn create(&self, key: &str, value: Bytes) -> Result<u64, async_nats::Error> {
        self.publish(key, value, Some(0)).await
    }

    /// Writes only if the value is still the one at `revision`.
    async fn update(
        &self,
        key: &str,
        value: Bytes,
        revision: u64,
    ) -> Result<u64, async_nats::Error> {
        self.publish(key, value, Some(revision)).await
    }

    async fn purge(&self, key: &str) -> Result<(), async_nats::Error> {
        self.stream.purge().filter(self.subject(key)).await?;
        Ok(())
    }
}

#[async_trait]
impl JobStore for NatsStore {
    async fn enqueue(
        &self,
        new: NewJob,
        _dedupe_window_ms: u64,
        max_depth: u64,
    ) -> Result<EnqueueOutcome, StoreError> {
        let job = Job::from_new(new);
        {
            let mut known = self.known.lock();
            if !known.contains(&job.route) {
                known.insert(job.route.clone());
            }
        }
        let msg_id = key_hash(&job.route, &job.idempotency_key);
        if self.depth().await? >= max_depth {
            // A replay of a stored key is still answered when full (as redb does): look for it.
            let key = &msg_id;
            if let Some((id, fp, mark)) = self
                .seen(self.keys.get(key).await)?
                .and_then(|v| decode_marker(&v))
            {
                if mark != MARK_DELETED {
                    return Ok(Self::held_by(id, fp, &job));
                }
            }
            return Ok(EnqueueOutcome::QueueFull);
        }
        let ack = self.publish_job(&job, &msg_id).await?;
        if ack.duplicate {
            return self.duplicate(&job, &msg_id, ack.sequence).await;
        }
        self.count_accept();
        // Deliver it now rather than after the idle poll.
        self.empty_at.lock().remove(&job.route);
        Ok(EnqueueOutcome::Stored(Durable::after_commit(job.id)))
    }

    async fn lease_due(
        &self,
        route: &str,
        now_ms: u64,
        limit: usize,
    ) -> Result<Vec<Job>, StoreError> {
        let (paused, until) = self.route_control(route).await?;
        if paused || until.is_some_and(|u| u > now_ms) || limit == 0 {
            return Ok(Vec::new());
        }
        let consumer = self.consumer(route).await?;
        let mut batch = self.seen(
            consumer
                .fetch()
                .max_messages(limit)
                .expires(Duration::from_millis(200))
                .messages()
                .await,
        )?;
        let mut out = Vec::new();
        while let Some(msg) = batch.next().await {
            let msg = self.seen(msg)?;
            let delivered = msg.info().map(|i| i.delivered).unwrap_or(1).max(1);
            let mut job = match decode_job(&msg.payload) {
                Ok(j) => j,
                Err(e) => {
                    // Not a spillway record (someone published to our subject): keep it out
                    // of the way but on the server, for whoever inspects the stream.
                    tracing::error!(route, error = %e, "nats: unreadable message on the jobs subject; terminating it");
                    let _ = msg.ack_with(AckKind::Term).await;
                    continue;
                }
            };
            job.attempts = job
                .attempts
                .saturating_add(u32::try_from(delivered).unwrap_or(u32::MAX));
            job.state = JobState::InFlight;
            job.updated_at_ms = now_ms;
            if delivered > 1 {
                if let Some(r) = self.retry_info(job.id).await? {
                    job.last = r.last;
                }
            }
            self.leases.lock().insert(
                job.id,
                Lease {
                    msg,
                    job: job.clone(),
                },
            );
            out.push(job);
        }
        if out.is_empty() {
            self.empty_at
                .lock()
                .insert(route.to_owned(), tokio::time::Instant::now());
        } else {
            self.empty_at.lock().remove(route);
        }
        Ok(out)
    }

    async fn ack(&self, id: JobId, _now_ms: u64) -> Result<(), StoreError> {
        let lease = self.take_lease(id)?;
        let result = async {
            self.mark_key(&lease.job, MARK_DELIVERED).await?;
            self.seen(lease.msg.double_ack().await)
        }
        .await;
        if let Err(e) = result {
            self.restore_lease(id, lease);
            return Err(e);
        }
        if lease.job.attempts > 1 {
            let _ = self.state.purge(&retry_key(id)).await;
        }
        Ok(())
    }

    async fn reschedule(
        &self,
        id: JobId,
        next_attempt_at_ms: u64,
        last: LastOutcome,
    ) -> Result<(), StoreError> {
        let lease = self.take_lease(id)?;
        let now = now_ms();
        let mut info = lease.job.clone();
        info.body = Bytes::new();
        info.headers.clear();
        info.state = JobState::Retrying;
        info.next_attempt_at_ms = next_attempt_at_ms;
        info.updated_at_ms = now;
        info.last = Some(last);
        let delay = Duration::from_millis(next_attempt_at_ms.saturating_sub(now));
        let result = async {
            self.seen(
                self.state
                    .put(&retry_key(id), schema::encode_job(&info).into())
                    .await,
            )?;
            self.seen(lease.msg.double_ack_with(AckKind::Nak(Some(delay))).await)
        }
        .await;
        if let Err(e) = result {
            self.restore_lease(id, lease);
            return Err(e);
        }
        Ok(())
    }

    async fn dead_letter(
        &self,
        id: JobId,
        reason: String,
        last: Option<LastOutcome>,
    ) -> Result<(), StoreError> {
        let lease = self.take_lease(id)?;
        let mut dead = lease.job.clone();
        dead.state = JobState::Dead;
        dead.dead_reason = Some(reason);
        dead.updated_at_ms = now_ms();
        if last.is_some() {
            dead.last = last;
        }
        let result = async {
            // Msg id = job id: a repeat after a crash stores one dead record.
            self.publish_record(self.dead_subject(&dead.route, id), &dead, &id.to_string())
                .await?;
            self.mark_key(&dead, MARK_DEAD).await?;
            self.seen(lease.msg.double_ack_with(AckKind::Term).await)
        }
        .await;
        if let Err(e) = result {
            self.restore_lease(id, lease);
            return Err(e);
        }
        let _ = self.state.purge(&retry_key(id)).await;
        Ok(())
    }

    async fn get(&self, id: JobId) -> Result<Option<Job>, StoreError> {
        Ok(self.find(id).await?.map(|(job, _)| job))
    }

    async fn list(
        &self,
        route: Option<&str>,
        state: Option<JobState>,
        limit: usize,
        cursor: Option<JobId>,
    ) -> Result<Vec<Job>, StoreError> {
        if state == Some(JobState::Delivered) {
            return Err(StoreError::Unsupported(
                "the nats backend keeps no delivered jobs: the stream drops a job once it is acked"
                    .into(),
            ));
        }
        let tok = route.map_or_else(|| "*".to_owned(), token);
        let mut ids = Vec::new();
        if state != Some(JobState::Dead) {
            ids.extend(
                self.ids_in(&self.jobs, format!("{}.jobs.{tok}.*", self.stream))
                    .await?
                    .into_iter()
                    .map(|(r, id)| (r, id, false)),
            );
        }
        if state.is_none() || state == Some(JobState::Dead) {
            ids.extend(
                self.ids_in(&self.dead, format!("{}_DEAD.{tok}.*", self.stream))
                    .await?
                    .into_iter()
                    .map(|(r, id)| (r, id, true)),
            );
        }
        // UUIDv7 ids order by creation: newest first, after the cursor.
        ids.sort_by_key(|e| std::cmp::Reverse(e.1));
        let mut out = Vec::new();
        for (r, id, dead) in ids {
            if cursor.is_some_and(|c| id >= c) {
                continue;
            }
            let job = if dead {
                self.dead_message(&r, id)
                    .await?
                    .map(|m| decode_job(&m.payload))
                    .transpose()?
            } else {
                self.queued_job(&r, id).await?.map(|(j, _)| j)
            };
            let Some(job) = job else { continue };
            if state.is_some_and(|s| s != job.state) {
                continue;
            }
            out.push(job);
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    async fn retry(&self, id: JobId, now_ms: u64) -> Result<bool, StoreError> {
        match self.find(id).await? {
            Some((job, Place::Dead(seq))) => {
                self.revive(job, seq, now_ms).await?;
                Ok(true)
            }
            Some((job, Place::Queued)) if job.state == JobState::Retrying => Err(StoreError::Unsupported(
                "the nats backend cannot make a retrying job due early: JetStream redelivers it when its delay ends".into(),
            )),
            _ => Ok(false),
        }
    }

    async fn delete(&self, id: JobId) -> Result<bool, StoreError> {
        let Some((job, place)) = self.find(id).await? else {
            return Ok(false);
        };
        match place {
            Place::Leased => {
                let lease = self.take_lease(id)?;
                self.seen(lease.msg.double_ack_with(AckKind::Term).await)?;
            }
            Place::Queued => {
                let subject = self.job_subject(&job.route, id);
                self.seen(self.jobs.purge().filter(subject).await)?;
            }
            Place::Dead(seq) => {
                self.seen(self.dead.delete_message(seq).await)?;
            }
        }
        self.mark_key(&job, MARK_DELETED).await?;
        let _ = self.state.purge(&retry_key(id)).await;
        Ok(true)
    }

    async fn replay_dead(&self, route: &str, now_ms: u64) -> Result<u64, StoreError> {
        let filter = format!("{}_DEAD.{}.*", self.stream, token(route));
        let mut n = 0;
        for (r, id) in self.ids_in(&self.dead, filter).await? {
            if let Some(m) = self.dead_message(&r, id).await? {
                self.revive(decode_job(&m.payload)?, m.sequence, now_ms)
                    .await?;
                n += 1;
            }
        }
        Ok(n)
    }

    async fn set_paused(&self, route: &str, paused: bool) -> Result<(), StoreError> {
        let (_, until) = self.route_control(route).await?;
        self.put_control(route, paused, until).await
    }

    async fn pause_until(&self, route: &str, until_ms: u64) -> Result<(), StoreError> {
        let (paused, _) = self.route_control(route).await?;
        self.put_control(route, paused, Some(until_ms)).await
    }

    async fn route_control(&self, route: &str) -> Result<(bool, Option<u64>), StoreError> {
        match self.seen(self.state.get(&format!("route.{route}")).await)? {
            None => Ok((false, None)),
            Some(v) => {
                let r = schema::decode_route(&v).map_err(unavailable)?;
                Ok((r.paused, r.paused_until_ms))
            }
        }
    }

    async fn quota_acquire(
        &self,
        route: &str,
        index: usize,
        per_ms: u64,
        limit: u64,
        now_ms: u64,
    ) -> Result<Option<u64>, StoreError> {
        let key = format!("quota.{route}.{index}");
        let per = per_ms.max(1);
        let window = now_ms / per * per;
        for _ in 0..QUOTA_TRIES {
            let entry = self.seen(self.state.entry(&key).await)?;
            let (start, count, revision) = match &entry {
                Some(e) if e.value.len() == 16 => {
                    let start = u64::from_be_bytes(e.value[..8].try_into().unwrap_or_default());
                    let count = u64::from_be_bytes(e.value[8..].try_into().unwrap_or_default());
                    (start, count, Some(e.revision))
                }
                Some(e) => (0, 0, Some(e.revision)),
                None => (0, 0, None),
            };
            let count = if start == window { count } else { 0 };
            if count >= limit {
                return Ok(Some(window + per));
            }
            let mut v = Vec::with_capacity(16);
            v.extend_from_slice(&window.to_be_bytes());
            v.extend_from_slice(&(count + 1).to_be_bytes());
            // Compare-and-set: replicas share the count, so two cannot spend the same unit.
            let written = match revision {
                Some(rev) => self.state.update(&key, v.into(), rev).await.is_ok(),
                None => self.state.create(&key, v.into()).await.is_ok(),
            };
            if written {
                return Ok(None);
            }
        }
        Err(StoreError::Busy)
    }

    async fn next_due(&self, route: &str) -> Result<Option<u64>, StoreError> {
        // JetStream holds the due times, so the answer is "due" unless the last fetch came
        // back empty within IDLE_POLL: then look again after it. No server call here: on a
        // 2.9 server a consumer's pending count costs a walk over every subject of the
        // stream (one per job), which stalled delivery of large backlogs. An accept on this
        // replica clears the idle mark, so its own jobs go out at once; other replicas'
        // accepts and ended retry delays are seen within IDLE_POLL.
        let idle = self
            .empty_at
            .lock()
            .get(route)
            .is_some_and(|t| t.elapsed() < IDLE_POLL);
        Ok(Some(if idle {
            now_ms() + IDLE_POLL.as_millis() as u64
        } else {
            // Due already; JetStream does not say since when. Not `now`: the caller
            // compares with a clock read before this call.
            0
        }))
    }

    async fn stats(&self, route: &str) -> Result<RouteStats, StoreError> {
        if !self.known.lock().contains(route) && !self.routes().await?.iter().any(|r| r == route) {
            return Ok(RouteStats::default());
        }
        let consumer = self.consumer(route).await?;
        let info = self.seen(consumer.get_info().await)?;
        let leased = self.leased(route) as u64;
        let ack_pending = info.num_ack_pending as u64;
        let oldest = match self
            .jobs
            // From the ack floor: everything below it is gone, so the search starts close.
            .get_first_raw_message_by_subject(
                format!("{}.jobs.{}.*", self.stream, token(route)),
                info.ack_floor.stream_sequence + 1,
            )
            .await
        {
            Ok(m) => decode_job(&m.payload).ok().map(|j| j.created_at_ms),
            Err(_) => None,
        };
        Ok(RouteStats {
            queued: info.num_pending,
            // In flight: leased here or by another replica; retrying: waiting out a delay.
            // JetStream counts both as pending acks; this replica's leases tell them apart
            // only for itself, so others' leases count as retrying.
            in_flight: leased.min(ack_pending),
            retrying: ack_pending.saturating_sub(leased),
            dead: self.dead_count(route).await?,
            delivered_kept: 0,
            oldest_queued_created_at_ms: oldest,
        })
    }

    async fn routes(&self) -> Result<Vec<String>, StoreError> {
        let names: Vec<String> = self.seen(self.jobs.consumer_names().try_collect().await)?;
        let mut out = BTreeSet::new();
        for name in names {
            let route = route_of_token(&name);
            let consumer = self.consumer(&route).await?;
            let info = self.seen(consumer.get_info().await)?;
            if info.num_pending + info.num_ack_pending as u64 > 0
                || self.dead_count(&route).await? > 0
            {
                out.insert(route);
            }
        }
        Ok(out.into_iter().collect())
    }

    async fn purge_expired(&self, _now_ms: u64, _batch: usize) -> Result<u64, StoreError> {
        // Nothing to purge: acked jobs leave the work-queue stream at once and key markers
        // expire with their bucket's max_age.
        Ok(0)
    }

    fn healthy(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
            && !self.failed.load(Ordering::Relaxed)
    }
}
