//! The `JobStore` conformance suite (functions over `&dyn JobStore`, so every backend runs the
//! same checks) and the redb backend's own tests: recovery, refusal of foreign files, group
//! commit.

use std::sync::Arc;

use bytes::Bytes;
use sha2::{Digest, Sha256};

use super::*;

const WINDOW: u64 = 60_000;
const DEEP: u64 = 1_000;

fn fp(body: &str) -> [u8; 32] {
    Sha256::digest(body.as_bytes()).into()
}

fn job(route: &str, key: &str, body: &str, at: u64) -> NewJob {
    NewJob {
        id: JobId::new(),
        route: route.into(),
        method: "POST".into(),
        uri: "http://up.example/hook".into(),
        headers: vec![("content-type".into(), b"application/json".to_vec())],
        body: Bytes::from(body.to_owned()),
        traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
        idempotency_key: key.into(),
        fingerprint: fp(body),
        created_at_ms: at,
        ordering_key: None,
    }
}

fn outcome(status: u16, at: u64) -> LastOutcome {
    LastOutcome {
        status: Some(status),
        headers: vec![("retry-after".into(), b"1".to_vec())],
        body_prefix: vec![b'x'; BODY_PREFIX_MAX + 100],
        error: None,
        at_ms: at,
    }
}

/// A job accepted without a client key: the proxy makes its id the key.
fn generated(route: &str, body: &str, at: u64) -> NewJob {
    let mut j = job(route, "", body, at);
    j.idempotency_key = j.id.to_string();
    j
}

async fn stored(s: &dyn JobStore, j: NewJob) -> JobId {
    match s.enqueue(j, WINDOW, DEEP).await.unwrap() {
        EnqueueOutcome::Stored(id) => id.into_inner(),
        other => panic!("expected Stored, got {other:?}"),
    }
}

// === conformance suite ===

pub(crate) async fn enqueue_lease_ack(s: &dyn JobStore) {
    let new = job("r", "k1", "{}", 1_000);
    let id = stored(s, new.clone()).await;
    assert_eq!(id, new.id);
    let got = s.get(id).await.unwrap().unwrap();
    assert_eq!(got.state, JobState::Queued);
    assert_eq!(got.body, new.body);
    assert_eq!(got.headers, new.headers);
    assert_eq!(got.traceparent, new.traceparent);
    assert_eq!(got.next_attempt_at_ms, 1_000);
    let st = s.stats("r").await.unwrap();
    assert_eq!(st.queued, 1);
    assert_eq!(st.oldest_queued_created_at_ms, Some(1_000));
    assert_eq!(s.next_due("r").await.unwrap(), Some(1_000));

    assert!(s.lease_due("r", 999, 10).await.unwrap().is_empty());
    let leased = s.lease_due("r", 1_000, 10).await.unwrap();
    assert_eq!(leased.len(), 1);
    assert_eq!(leased[0].state, JobState::InFlight);
    assert_eq!(leased[0].attempts, 1);
    let got = s.get(id).await.unwrap().unwrap();
    assert_eq!(got.state, JobState::InFlight);
    assert_eq!(got.attempts, 1);
    assert!(s.lease_due("r", 5_000, 10).await.unwrap().is_empty());
    assert_eq!(s.stats("r").await.unwrap().in_flight, 1);
    assert_eq!(s.next_due("r").await.unwrap(), None);

    s.ack(id, 2_000).await.unwrap();
    s.ack(id, 2_500).await.unwrap();
    let got = s.get(id).await.unwrap().unwrap();
    assert_eq!(got.state, JobState::Delivered);
    assert_eq!(got.updated_at_ms, 2_000);
    let st = s.stats("r").await.unwrap();
    assert_eq!(
        st,
        RouteStats {
            delivered_kept: 1,
            ..RouteStats::default()
        }
    );
    assert!(matches!(
        s.ack(JobId::new(), 1).await,
        Err(StoreError::NotFound)
    ));
}

pub(crate) async fn lease_order_and_limit(s: &dyn JobStore) {
    let c = stored(s, job("r", "c", "c", 300)).await;
    let a = stored(s, job("r", "a", "a", 100)).await;
    let b = stored(s, job("r", "b", "b", 200)).await;
    let other = stored(s, job("other", "a", "a", 100)).await;
    let first = s.lease_due("r", 1_000, 2).await.unwrap();
    let ids: Vec<_> = first.iter().map(|j| j.id).collect();
    assert_eq!(ids, vec![a, b]);
    let rest = s.lease_due("r", 1_000, 10).await.unwrap();
    assert_eq!(rest.iter().map(|j| j.id).collect::<Vec<_>>(), vec![c]);
    assert_eq!(s.get(other).await.unwrap().unwrap().state, JobState::Queued);
}

pub(crate) async fn reschedule_then_lease_again(s: &dyn JobStore) {
    let id = stored(s, job("r", "k", "b", 100)).await;
    s.lease_due("r", 100, 1).await.unwrap();
    s.reschedule(id, 5_000, outcome(503, 150)).await.unwrap();
    let got = s.get(id).await.unwrap().unwrap();
    assert_eq!(got.state, JobState::Retrying);
    assert_eq!(got.next_attempt_at_ms, 5_000);
    let last = got.last.unwrap();
    assert_eq!(last.status, Some(503));
    assert_eq!(last.body_prefix.len(), BODY_PREFIX_MAX);
    assert_eq!(s.next_due("r").await.unwrap(), Some(5_000));
    assert_eq!(s.stats("r").await.unwrap().retrying, 1);
    assert!(s.lease_due("r", 4_999, 5).await.unwrap().is_empty());
    let again = s.lease_due("r", 5_000, 5).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].attempts, 2);
}

pub(crate) async fn dead_retry_replay_delete(s: &dyn JobStore) {
    let a = stored(s, job("r", "a", "a", 100)).await;
    let b = stored(s, job("r", "b", "b", 100)).await;
    s.lease_due("r", 100, 10).await.unwrap();
    s.dead_letter(a, "status 400".into(), Some(outcome(400, 120)))
        .await
        .unwrap();
    s.dead_letter(b, "max_attempts".into(), None).await.unwrap();
    let got = s.get(a).await.unwrap().unwrap();
    assert_eq!(got.state, JobState::Dead);
    assert_eq!(got.dead_reason.as_deref(), Some("status 400"));
    assert_eq!(got.last.unwrap().status, Some(400));
    let st = s.stats("r").await.unwrap();
    assert_eq!((st.dead, st.in_flight, st.queued), (2, 0, 0));
    assert_eq!(st.oldest_queued_created_at_ms, None);

    assert!(s.retry(a, 1_000).await.unwrap());
    let got = s.get(a).await.unwrap().unwrap();
    assert_eq!(got.state, JobState::Retrying);
    // A dead job comes back with a fresh budget of attempts.
    assert_eq!(got.attempts, 0);
    assert_eq!(got.next_attempt_at_ms, 1_000);
    assert_eq!(got.dead_reason, None);
    let leased = s.lease_due("r", 1_000, 10).await.unwrap();
    assert_eq!(leased.len(), 1);
    assert_eq!(leased[0].attempts, 1);
    assert!(
        !s.retry(a, 1_000).await.unwrap(),
        "in_flight is not retried"
    );

    assert_eq!(s.replay_dead("r", 2_000).await.unwrap(), 1);
    assert_eq!(s.get(b).await.unwrap().unwrap().state, JobState::Retrying);
    assert_eq!(s.replay_dead("r", 2_000).await.unwrap(), 0);

    assert!(s.delete(b).await.unwrap());
    assert!(!s.delete(b).await.unwrap());
    assert_eq!(s.get(b).await.unwrap(), None);
    let st = s.stats("r").await.unwrap();
    assert_eq!((st.retrying, st.in_flight, st.dead), (0, 1, 0));
    // The deleted job's key is free again.
    stored(s, job("r", "b", "other body", 3_000)).await;
}

pub(crate) async fn dedupe_and_key_conflict(s: &dyn JobStore) {
    let first = job("r", "key", "body", 100);
    let id = stored(s, first.clone()).await;
    let mut again = job("r", "key", "body", 200);
    again.id = JobId::new();
    assert_eq!(
        s.enqueue(again, WINDOW, DEEP).await.unwrap(),
        EnqueueOutcome::Duplicate(Durable::after_commit(id))
    );
    assert_eq!(
        s.enqueue(job("r", "key", "different", 200), WINDOW, DEEP)
            .await
            .unwrap(),
        EnqueueOutcome::KeyConflict(id)
    );
    // Same key on another route is another job.
    stored(s, job("r2", "key", "different", 200)).await;
    assert_eq!(s.stats("r").await.unwrap().queued, 1);

    // Delivered: still a duplicate within the window, a new job after it.
    s.lease_due("r", 200, 1).await.unwrap();
    s.ack(id, 1_000).await.unwrap();
    assert!(matches!(
        s.enqueue(job("r", "key", "body", 1_000 + WINDOW - 1), WINDOW, DEEP)
            .await
            .unwrap(),
        EnqueueOutcome::Duplicate(d) if *d.get() == id
    ));
    assert_eq!(s.purge_expired(1_000 + WINDOW - 1, 10).await.unwrap(), 0);
    let later = stored(s, job("r", "key", "body", 1_000 + WINDOW)).await;
    assert_ne!(later, id);
    assert_eq!(s.purge_expired(1_000 + WINDOW + 1, 10).await.unwrap(), 1);
    assert_eq!(s.get(id).await.unwrap(), None);
    // The new job still holds the key after the old one was purged.
    assert!(matches!(
        s.enqueue(job("r", "key", "body", 1_000 + WINDOW + 2), WINDOW, DEEP)
            .await
            .unwrap(),
        EnqueueOutcome::Duplicate(d) if *d.get() == later
    ));
    assert_eq!(s.stats("r").await.unwrap().delivered_kept, 0);
}

/// A job accepted without a client key has its own id as key (what the proxy does); a
/// client that sends that key back later is answered like any other repeat.
pub(crate) async fn generated_key_dedupes_like_a_client_key(s: &dyn JobStore) {
    let first = generated("r", "body", 100);
    let key = first.idempotency_key.clone();
    let id = stored(s, first).await;
    let at = |k: &str, body: &str, t: u64| job("r", k, body, t);
    assert_eq!(
        s.enqueue(at(&key, "body", 200), WINDOW, DEEP)
            .await
            .unwrap(),
        EnqueueOutcome::Duplicate(Durable::after_commit(id))
    );
    assert_eq!(
        s.enqueue(at(&key, "different", 200), WINDOW, DEEP)
            .await
            .unwrap(),
        EnqueueOutcome::KeyConflict(id)
    );
    // Only the exact text is the key; on another route it is another job's key.
    stored(s, at(&key.to_uppercase(), "different", 200)).await;
    stored(s, job("r2", &key, "different", 200)).await;
    assert_eq!(s.stats("r").await.unwrap().queued, 2);

    // Delivered: still a duplicate within the window, a new job after it.
    s.lease_due("r", 200, 1).await.unwrap();
    s.ack(id, 1_000).await.unwrap();
    assert!(matches!(
        s.enqueue(at(&key, "body", 1_000 + WINDOW - 1), WINDOW, DEEP).await.unwrap(),
        EnqueueOutcome::Duplicate(d) if *d.get() == id
    ));
    assert_eq!(s.purge_expired(1_000 + WINDOW - 1, 10).await.unwrap(), 0);
    let later = stored(s, at(&key, "body", 1_000 + WINDOW)).await;
    assert_ne!(later, id);
    assert_eq!(s.purge_expired(1_000 + WINDOW + 1, 10).await.unwrap(), 1);
    assert_eq!(s.get(id).await.unwrap(), None);
    assert!(matches!(
        s.enqueue(at(&key, "body", 1_000 + WINDOW + 2), WINDOW, DEEP).await.unwrap(),
        EnqueueOutcome::Duplicate(d) if *d.get() == later
    ));
    // Dead: held, and deleting the job frees the key.
    let dead = generated("r", "x", 3);
    let dead_key = dead.idempotency_key.clone();
    let dead_id = stored(s, dead).await;
    s.dead_letter(dead_id, "gone".into(), None).await.unwrap();
    assert_eq!(
        s.enqueue(at(&dead_key, "x", u64::MAX / 2), WINDOW, DEEP)
            .await
            .unwrap(),
        EnqueueOutcome::Duplicate(Durable::after_commit(dead_id))
    );
    assert!(s.delete(dead_id).await.unwrap());
    stored(s, at(&dead_key, "x", u64::MAX / 2)).await;
}

pub(crate) async fn max_depth_rejects_and_stores_nothing(s: &dyn JobStore) {
    let a = job("r", "a", "a", 1);
    s.enqueue(a.clone(), WINDOW, 2).await.unwrap();
    s.enqueue(job("r", "b", "b", 1), WINDOW, 2).await.unwrap();
    let c = job("r", "c", "c", 1);
    assert_eq!(
        s.enqueue(c.clone(), WINDOW, 2).await.unwrap(),
        EnqueueOutcome::QueueFull
    );
    assert_eq!(s.get(c.id).await.unwrap(), None);
    // A replay of a stored key is still answered when full.
    assert!(matches!(
        s.enqueue(job("r", "a", "a", 2), WINDOW, 2).await.unwrap(),
        EnqueueOutcome::Duplicate(d) if *d.get() == a.id
    ));
    // In flight still counts toward depth; delivered does not.
    s.lease_due("r", 1, 1).await.unwrap();
    assert_eq!(
        s.enqueue(c.clone(), WINDOW, 2).await.unwrap(),
        EnqueueOutcome::QueueFull
    );
    s.ack(a.id, 5).await.unwrap();
    assert!(matches!(
        s.enqueue(c, WINDOW, 2).await.unwrap(),
        EnqueueOutcome::Stored(_)
    ));
}

pub(crate) async fn ordering_key_serialises_a_route(s: &dyn JobStore) {
    let mut a = job("r", "a", "a", 100);
    a.ordering_key = Some("acct-1".into());
    let mut b = job("r", "b", "b", 100);
    b.ordering_key = Some("acct-1".into());
    let mut c = job("r", "c", "c", 100);
    c.ordering_key = Some("acct-2".into());
    let (a, b, c) = (stored(s, a).await, stored(s, b).await, stored(s, c).await);
    let leased: Vec<_> = s
        .lease_due("r", 100, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(leased, vec![a, c]);
    // Still blocked while a is retrying.
    s.reschedule(a, 500, outcome(503, 100)).await.unwrap();
    let leased = s.lease_due("r", 200, 10).await.unwrap();
    assert!(leased.is_empty(), "{leased:?}");
    let leased = s.lease_due("r", 500, 10).await.unwrap();
    assert_eq!(leased.iter().map(|j| j.id).collect::<Vec<_>>(), vec![a]);
    s.ack(a, 600).await.unwrap();
    let leased = s.lease_due("r", 600, 10).await.unwrap();
    assert_eq!(leased.iter().map(|j| j.id).collect::<Vec<_>>(), vec![b]);
}

pub(crate) async fn pause_and_resume(s: &dyn JobStore) {
    stored(s, job("r", "a", "a", 100)).await;
    assert_eq!(s.route_control("r").await.unwrap(), (false, None));
    s.set_paused("r", true).await.unwrap();
    assert_eq!(s.route_control("r").await.unwrap(), (true, None));
    assert!(s.lease_due("r", 1_000, 10).await.unwrap().is_empty());
    s.set_paused("r", false).await.unwrap();
    s.pause_until("r", 2_000).await.unwrap();
    assert_eq!(s.route_control("r").await.unwrap(), (false, Some(2_000)));
    assert!(s.lease_due("r", 1_999, 10).await.unwrap().is_empty());
    assert_eq!(s.lease_due("r", 2_000, 10).await.unwrap().len(), 1);
    assert_eq!(s.route_control("other").await.unwrap(), (false, None));
}

pub(crate) async fn quota_fixed_windows(s: &dyn JobStore) {
    assert_eq!(
        s.quota_acquire("r", 0, 1_000, 2, 10_100).await.unwrap(),
        None
    );
    assert_eq!(
        s.quota_acquire("r", 0, 1_000, 2, 10_900).await.unwrap(),
        None
    );
    assert_eq!(
        s.quota_acquire("r", 0, 1_000, 2, 10_999).await.unwrap(),
        Some(11_000)
    );
    // Another index and another route have their own counts.
    assert_eq!(
        s.quota_acquire("r", 1, 60_000, 1, 10_999).await.unwrap(),
        None
    );
    assert_eq!(
        s.quota_acquire("x", 0, 1_000, 2, 10_999).await.unwrap(),
        None
    );
    assert_eq!(
        s.quota_acquire("r", 0, 1_000, 2, 11_000).await.unwrap(),
        None
    );
    assert_eq!(
        s.quota_acquire("r", 1, 60_000, 1, 11_000).await.unwrap(),
        Some(60_000)
    );
}

pub(crate) async fn list_newest_first_with_cursor(s: &dyn JobStore) {
    let mut ids = Vec::new();
    for i in 0..5u64 {
        ids.push(stored(s, job("r", &format!("k{i}"), "b", i)).await);
    }
    stored(s, job("other", "k", "b", 9)).await;
    let page: Vec<_> = s
        .list(Some("r"), None, 2, None)
        .await
        .unwrap()
        .into_iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(page, vec![ids[4], ids[3]]);
    let page2: Vec<_> = s
        .list(Some("r"), None, 10, Some(ids[3]))
        .await
        .unwrap()
        .into_iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(page2, vec![ids[2], ids[1], ids[0]]);
    assert_eq!(s.list(None, None, 100, None).await.unwrap().len(), 6);
    s.lease_due("r", 0, 1).await.unwrap();
    let in_flight = s
        .list(None, Some(JobState::InFlight), 10, None)
        .await
        .unwrap();
    assert_eq!(in_flight.len(), 1);
    assert_eq!(in_flight[0].id, ids[0]);
}

pub(crate) async fn stats_follow_every_transition(s: &dyn JobStore) {
    let ids = [
        stored(s, job("r", "a", "a", 10)).await,
        stored(s, job("r", "b", "b", 20)).await,
        stored(s, job("r", "c", "c", 30)).await,
        stored(s, job("r", "d", "d", 40)).await,
    ];
    s.lease_due("r", 100, 3).await.unwrap();
    s.ack(ids[0], 100).await.unwrap();
    s.reschedule(ids[1], 900, outcome(500, 100)).await.unwrap();
    s.dead_letter(ids[2], "gone".into(), None).await.unwrap();
    assert_eq!(
        s.stats("r").await.unwrap(),
        RouteStats {
            queued: 1,
            in_flight: 0,
            retrying: 1,
            dead: 1,
            delivered_kept: 1,
            oldest_queued_created_at_ms: Some(20),
        }
    );
    assert_eq!(s.stats("nothing").await.unwrap(), RouteStats::default());
}

pub(crate) async fn routes_lists_routes_with_stored_jobs(s: &dyn JobStore) {
    assert!(s.routes().await.unwrap().is_empty());
    let a = stored(s, job("b-route", "1", "1", 10)).await;
    stored(s, job("a-route", "2", "2", 10)).await;
    let dead = stored(s, job("c-route", "3", "3", 10)).await;
    assert_eq!(s.routes().await.unwrap(), ["a-route", "b-route", "c-route"]);
    // Every state counts: a dead or delivered job is still stored under its route.
    s.dead_letter(dead, "gone".into(), None).await.unwrap();
    s.lease_due("b-route", 100, 1).await.unwrap();
    s.ack(a, 100).await.unwrap();
    assert_eq!(s.routes().await.unwrap(), ["a-route", "b-route", "c-route"]);
    // Once its last job is gone, the route is gone, though its counters remain at zero.
    assert!(s.delete(dead).await.unwrap());
    assert_eq!(s.routes().await.unwrap(), ["a-route", "b-route"]);
    // Pausing a route stores control state, not jobs.
    s.set_paused("d-route", true).await.unwrap();
    assert_eq!(s.routes().await.unwrap(), ["a-route", "b-route"]);
}

/// Every conformance check, each against a fresh store from `make`.
macro_rules! conformance {
    ($make:expr; $($name:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let (_guard, store) = $make;
            super::$name(&store).await;
        }
    )*};
}

/// The wall-clock checks, listed once so every backend runs all of them.
macro_rules! live_conformance {
    ($make:expr) => {
        conformance!($make;
            live_enqueue_lease_ack,
            live_dedupe_and_key_conflict,
            live_reschedule_redelivers_later,
            live_dead_retry_replay_delete,
            live_pause_and_resume,
            live_max_depth_and_listing,
        );
    };
}

mod redb_conformance {
    use super::*;

    fn fresh() -> (tempfile::TempDir, RedbStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path().join("q/queue.redb"), 4 << 20).unwrap();
        (dir, store)
    }

    conformance!(fresh();
        enqueue_lease_ack,
        lease_order_and_limit,
        reschedule_then_lease_again,
        dead_retry_replay_delete,
        dedupe_and_key_conflict,
        generated_key_dedupes_like_a_client_key,
        max_depth_rejects_and_stores_nothing,
        ordering_key_serialises_a_route,
        pause_and_resume,
        quota_fixed_windows,
        list_newest_first_with_cursor,
        stats_follow_every_transition,
        routes_lists_routes_with_stored_jobs,
    );
    live_conformance!(fresh());
}

// === conformance on the wall clock (every backend) ===
//
// The checks above drive time by hand, which only a store that takes `now` from its
// caller can follow. These use real time and poll with a deadline where a backend
// (JetStream) owns due times, so they run unchanged against every backend.

fn now() -> u64 {
    crate::proxy::defer::now_ms()
}

/// Leases until `want` jobs came back or `within` passed.
async fn lease_within(
    s: &dyn JobStore,
    route: &str,
    want: usize,
    within: std::time::Duration,
) -> Vec<Job> {
    let deadline = tokio::time::Instant::now() + within;
    let mut got = Vec::new();
    while got.len() < want && tokio::time::Instant::now() < deadline {
        got.extend(s.lease_due(route, now(), want - got.len()).await.unwrap());
        if got.len() < want {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
    got
}

const SOON: std::time::Duration = std::time::Duration::from_secs(5);

pub(crate) async fn live_enqueue_lease_ack(s: &dyn JobStore) {
    let new = job("r", "k1", "{}", now());
    let id = stored(s, new.clone()).await;
    let got = s.get(id).await.unwrap().unwrap();
    assert_eq!(got.state, JobState::Queued);
    assert_eq!(
        (got.body, got.headers),
        (new.body.clone(), new.headers.clone())
    );
    assert_eq!(got.traceparent, new.traceparent);
    let st = s.stats("r").await.unwrap();
    assert_eq!(st.queued, 1);
    assert_eq!(st.oldest_queued_created_at_ms, Some(new.created_at_ms));
    // Due means "at or before a clock the caller read before asking": a later answer
    // makes the dispatcher wait, and with a slow store it waited for ever.
    let before = now();
    let due = s.next_due("r").await.unwrap();
    assert!(due.is_some_and(|d| d <= before), "{due:?} > {before}");

    let leased = lease_within(s, "r", 1, SOON).await;
    assert_eq!(leased.len(), 1);
    assert_eq!(
        (leased[0].id, leased[0].state, leased[0].attempts),
        (id, JobState::InFlight, 1)
    );
    assert_eq!(leased[0].body, new.body);
    assert_eq!(s.get(id).await.unwrap().unwrap().state, JobState::InFlight);
    assert!(s.lease_due("r", now(), 10).await.unwrap().is_empty());
    assert_eq!(s.stats("r").await.unwrap().in_flight, 1);

    s.ack(id, now()).await.unwrap();
    let st = s.stats("r").await.unwrap();
    assert_eq!(
        (st.queued, st.in_flight, st.retrying, st.dead),
        (0, 0, 0, 0)
    );
    assert!(matches!(
        s.ack(JobId::new(), now()).await,
        Err(StoreError::NotFound)
    ));
}

/// Key "key" on route "r" is held by `id`: the same body is a duplicate, another a conflict.
async fn replays_answer_with(s: &dyn JobStore, id: JobId) {
    assert_eq!(
        s.enqueue(job("r", "key", "body", now()), WINDOW, DEEP)
            .await
            .unwrap(),
        EnqueueOutcome::Duplicate(Durable::after_commit(id))
    );
    assert_eq!(
        s.enqueue(job("r", "key", "different", now()), WINDOW, DEEP)
            .await
            .unwrap(),
        EnqueueOutcome::KeyConflict(id)
    );
}

pub(crate) async fn live_dedupe_and_key_conflict(s: &dyn JobStore) {
    let id = stored(s, job("r", "key", "body", now())).await;
    replays_answer_with(s, id).await;
    // Same key on another route is another job.
    stored(s, job("r2", "key", "different", now())).await;
    assert_eq!(s.stats("r").await.unwrap().queued, 1);
    // Delivered: still the same job within the window.
    assert_eq!(lease_within(s, "r", 1, SOON).await.len(), 1);
    s.ack(id, now()).await.unwrap();
    replays_answer_with(s, id).await;
}

pub(crate) async fn live_reschedule_redelivers_later(s: &dyn JobStore) {
    let id = stored(s, job("r", "k", "b", now())).await;
    assert_eq!(lease_within(s, "r", 1, SOON).await.len(), 1);
    let at = now() + 400;
    s.reschedule(id, at, outcome(503, now())).await.unwrap();
    let got = s.get(id).await.unwrap().unwrap();
    assert_eq!(got.state, JobState::Retrying);
    assert_eq!(got.next_attempt_at_ms, at);
    assert_eq!(got.last.as_ref().unwrap().status, Some(503));
    assert_eq!(got.last.unwrap().body_prefix.len(), BODY_PREFIX_MAX);
    assert_eq!(s.stats("r").await.unwrap().retrying, 1);
    let again = lease_within(s, "r", 1, SOON).await;
    assert!(now() >= at, "leased again before its time");
    assert_eq!(again.len(), 1);
    assert_eq!((again[0].id, again[0].attempts), (id, 2));
    assert_eq!(again[0].body, Bytes::from("b"));
    s.ack(id, now()).await.unwrap();
}

pub(crate) async fn live_dead_retry_replay_delete(s: &dyn JobStore) {
    let a = stored(s, job("r", "a", "a", now())).await;
    let b = stored(s, job("r", "b", "b", now())).await;
    assert_eq!(lease_within(s, "r", 2, SOON).await.len(), 2);
    s.dead_letter(a, "status 400".into(), Some(outcome(400, now())))
        .await
        .unwrap();
    s.dead_letter(b, "max_attempts".into(), None).await.unwrap();
    let got = s.get(a).await.unwrap().unwrap();
    assert_eq!(got.state, JobState::Dead);
    assert_eq!(got.dead_reason.as_deref(), Some("status 400"));
    assert_eq!(got.last.unwrap().status, Some(400));
    assert_eq!(got.body, Bytes::from("a"));
    let st = s.stats("r").await.unwrap();
    assert_eq!((st.dead, st.in_flight, st.queued), (2, 0, 0));
    // A dead job holds its key.
    assert_eq!(
        s.enqueue(job("r", "a", "a", now()), WINDOW, DEEP)
            .await
            .unwrap(),
        EnqueueOutcome::Duplicate(Durable::after_commit(a))
    );
    let dead = s
        .list(Some("r"), Some(JobState::Dead), 10, None)
        .await
        .unwrap();
    assert_eq!(dead.iter().map(|j| j.id).collect::<Vec<_>>(), vec![b, a]);

    assert!(s.retry(a, now()).await.unwrap());
    let leased = lease_within(s, "r", 1, SOON).await;
    assert_eq!(leased.len(), 1);
    // A fresh budget of attempts after a retry from dead.
    assert_eq!((leased[0].id, leased[0].attempts), (a, 1));
    assert!(
        !s.retry(a, now()).await.unwrap(),
        "in_flight is not retried"
    );

    assert_eq!(s.replay_dead("r", now()).await.unwrap(), 1);
    assert_eq!(s.replay_dead("r", now()).await.unwrap(), 0);
    assert!(s.delete(b).await.unwrap());
    assert!(!s.delete(b).await.unwrap());
    assert_eq!(s.get(b).await.unwrap(), None);
    assert!(
        lease_within(s, "r", 1, std::time::Duration::from_millis(300))
            .await
            .is_empty()
    );
    // The deleted job's key is free again.
    stored(s, job("r", "b", "other body", now())).await;
}

pub(crate) async fn live_pause_and_resume(s: &dyn JobStore) {
    stored(s, job("r", "a", "a", now())).await;
    assert_eq!(s.route_control("r").await.unwrap(), (false, None));
    s.set_paused("r", true).await.unwrap();
    assert_eq!(s.route_control("r").await.unwrap(), (true, None));
    assert!(s.lease_due("r", now(), 10).await.unwrap().is_empty());
    s.set_paused("r", false).await.unwrap();
    let until = now() + 60_000;
    s.pause_until("r", until).await.unwrap();
    assert_eq!(s.route_control("r").await.unwrap(), (false, Some(until)));
    assert!(s.lease_due("r", now(), 10).await.unwrap().is_empty());
    s.pause_until("r", now()).await.unwrap();
    assert_eq!(lease_within(s, "r", 1, SOON).await.len(), 1);
    assert_eq!(s.route_control("other").await.unwrap(), (false, None));
}

pub(crate) async fn live_max_depth_and_listing(s: &dyn JobStore) {
    let a = job("r", "a", "a", now());
    s.enqueue(a.clone(), WINDOW, 2).await.unwrap();
    let b = stored(s, job("r", "b", "b", now())).await;
    let c = job("r", "c", "c", now());
    assert_eq!(
        s.enqueue(c.clone(), WINDOW, 2).await.unwrap(),
        EnqueueOutcome::QueueFull
    );
    assert_eq!(s.get(c.id).await.unwrap(), None);
    let page: Vec<_> = s
        .list(Some("r"), None, 1, None)
        .await
        .unwrap()
        .into_iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(page, vec![b]);
    let rest: Vec<_> = s
        .list(Some("r"), None, 10, Some(b))
        .await
        .unwrap()
        .into_iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(rest, vec![a.id]);
    assert_eq!(s.routes().await.unwrap(), ["r"]);
}

/// The JetStream backend against the NATS server of the machine (`SPILLWAY_TEST_NATS_URL`,
/// default `nats://127.0.0.1:4222`; `.ci/run` starts one). Each test has its own stream,
/// removed when it ends.
#[cfg(feature = "nats")]
mod nats_live {
    use super::*;
    use crate::config::NatsConfig;

    pub(crate) fn url() -> String {
        std::env::var("SPILLWAY_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
    }

    /// Deletes the test's streams and buckets when the test ends.
    pub(crate) struct Streams(pub String);

    impl Drop for Streams {
        fn drop(&mut self) {
            let name = self.0.clone();
            // Its own thread and runtime: the test's runtime is shutting down.
            let _ = std::thread::spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap()
                    .block_on(NatsStore::remove_streams(&url(), &name))
            })
            .join();
        }
    }

    pub(crate) async fn open(name: &str, routes: &[&str]) -> NatsStore {
        let cfg = NatsConfig {
            url: url(),
            stream: name.to_owned(),
            replicas: 1,
            credentials_file: None,
            ack_wait: std::time::Duration::from_secs(5),
        };
        let opts = NatsOptions {
            routes: routes.iter().map(|r| r.to_string()).collect(),
            dedupe_window: std::time::Duration::from_millis(WINDOW),
        };
        NatsStore::open(&cfg, opts).await.unwrap_or_else(|e| {
            panic!(
                "{e}: these tests need NATS with JetStream at {} (start it with `nats-server -js`)",
                url()
            )
        })
    }

    pub(crate) fn name() -> String {
        format!("T{}", uuid::Uuid::new_v4().simple())
    }

    async fn fresh() -> (Streams, NatsStore) {
        let name = name();
        let store = open(&name, &["r", "r2"]).await;
        (Streams(name), store)
    }

    live_conformance!(fresh().await);

    conformance!(fresh().await;
        quota_fixed_windows,
    );

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stream_with_other_settings_is_refused_by_name() {
        let name = name();
        let _guard = Streams(name.clone());
        let js = async_nats::jetstream::new(async_nats::connect(url()).await.unwrap());
        js.create_stream(async_nats::jetstream::stream::Config {
            name: name.clone(),
            subjects: vec![format!("{name}.jobs.>")],
            ..Default::default()
        })
        .await
        .unwrap();
        let cfg = NatsConfig {
            url: url(),
            stream: name.clone(),
            replicas: 1,
            credentials_file: None,
            ack_wait: std::time::Duration::from_secs(5),
        };
        let opts = NatsOptions {
            routes: vec!["r".into()],
            dedupe_window: std::time::Duration::from_secs(60),
        };
        let err = match NatsStore::open(&cfg, opts).await {
            Ok(_) => panic!("a limits-retention stream was accepted"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains(&format!("stream {name} has retention")),
            "{err}"
        );
        assert!(err.contains("WorkQueue"), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ack_wait_and_the_duplicate_window_follow_the_config() {
        let name = name();
        let _guard = Streams(name.clone());
        let mut cfg = NatsConfig {
            url: url(),
            stream: name.clone(),
            replicas: 1,
            credentials_file: None,
            ack_wait: std::time::Duration::from_secs(5),
        };
        let mut opts = NatsOptions {
            routes: vec!["r".into()],
            dedupe_window: std::time::Duration::from_secs(60),
        };
        let s = NatsStore::open(&cfg, opts.clone()).await.unwrap();
        let id = stored(&s, job("r", "k", "b", now())).await;
        drop(s);
        cfg.ack_wait = std::time::Duration::from_secs(7);
        opts.dedupe_window = std::time::Duration::from_secs(90);
        let s = NatsStore::open(&cfg, opts).await.unwrap();
        let js = async_nats::jetstream::new(async_nats::connect(url()).await.unwrap());
        let mut stream = js.get_stream(&name).await.unwrap();
        let info = stream.info().await.unwrap();
        assert_eq!(
            info.config.duplicate_window,
            std::time::Duration::from_secs(90)
        );
        let consumer = stream.consumer_info("r").await.unwrap();
        assert_eq!(consumer.config.ack_wait, std::time::Duration::from_secs(7));
        // The job accepted before the change is still there, and still deduped.
        assert_eq!(s.get(id).await.unwrap().unwrap().state, JobState::Queued);
        assert_eq!(
            s.enqueue(job("r", "k", "b", now()), WINDOW, DEEP)
                .await
                .unwrap(),
            EnqueueOutcome::Duplicate(Durable::after_commit(id))
        );
    }
}

// === redb backend ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_jobs_are_queued_again_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("queue.redb");
    let (a, b);
    {
        let s = RedbStore::open(&path, 1 << 20).unwrap();
        a = stored(&s, job("r", "a", "a", 100)).await;
        b = stored(&s, job("r", "b", "b", 100)).await;
        assert_eq!(s.lease_due("r", 100, 1).await.unwrap().len(), 1);
        s.set_paused("r2", true).await.unwrap();
    }
    let s = RedbStore::open(&path, 1 << 20).unwrap();
    let got = s.get(a).await.unwrap().unwrap();
    assert_eq!(got.state, JobState::Queued);
    assert_eq!(got.attempts, 1, "the interrupted attempt still counts");
    assert!(got.next_attempt_at_ms >= 100);
    assert_eq!(s.get(b).await.unwrap().unwrap().state, JobState::Queued);
    let st = s.stats("r").await.unwrap();
    assert_eq!((st.queued, st.in_flight), (2, 0));
    assert_eq!(s.route_control("r2").await.unwrap(), (true, None));
    let leased = s.lease_due("r", u64::MAX - 1, 10).await.unwrap();
    assert_eq!(leased.len(), 2);
}

fn ids_of(jobs: &[Job]) -> Vec<JobId> {
    jobs.iter().map(|j| j.id).collect()
}

/// Puts a store file of schema 2 back into schema 1's layout: the per-route table without
/// values, as the first release wrote it, and its version record.
fn downgrade_to_v1(path: &std::path::Path) {
    use self::redb::schema::{v1, BY_ROUTE, META, SCHEMA_VERSION_KEY};
    let db = ::redb::Database::create(path).unwrap();
    let tx = db.begin_write().unwrap();
    {
        let by_route = tx.open_table(BY_ROUTE).unwrap();
        let mut old = tx.open_table(v1::BY_ROUTE).unwrap();
        for e in ::redb::ReadableTable::iter(&by_route).unwrap() {
            let (k, v) = e.unwrap();
            assert_eq!(v.value(), 0, "schema 1 has no generated-key windows");
            old.insert(k.value(), ()).unwrap();
        }
        tx.open_table(META)
            .unwrap()
            .insert(SCHEMA_VERSION_KEY, 1)
            .unwrap();
    }
    tx.delete_table(BY_ROUTE).unwrap();
    tx.commit().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_1_file_is_migrated_on_open_with_every_job_in_its_place() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("queue.redb");
    let (a, b, c, d, e);
    {
        let s = RedbStore::open(&path, 1 << 20).unwrap();
        a = stored(&s, job("r", "a", "a", 100)).await;
        b = stored(&s, job("r", "b", "b", 101)).await;
        c = stored(&s, job("r", "c", "c", 102)).await;
        d = stored(&s, job("r", "d", "d", 103)).await;
        e = stored(&s, job("r", "e", "e", 104)).await;
        stored(&s, job("r2", "a", "a", 100)).await;
        // a stays queued; b, c, d, e are leased, then: b left in flight (a crash),
        // c rescheduled, d delivered, e dead.
        let leased = s.lease_due("r", 104, 5).await.unwrap();
        assert_eq!(leased.len(), 5);
        s.reschedule(c, 5_000, outcome(503, 200)).await.unwrap();
        s.ack(d, 300).await.unwrap();
        s.dead_letter(e, "400".into(), Some(outcome(400, 300)))
            .await
            .unwrap();
        s.reschedule(a, 100, outcome(503, 200)).await.unwrap();
        s.retry(a, 100).await.unwrap();
    }
    downgrade_to_v1(&path);

    let s = RedbStore::open(&path, 1 << 20).unwrap();
    let st = s.stats("r").await.unwrap();
    assert_eq!(
        (
            st.queued,
            st.in_flight,
            st.retrying,
            st.delivered_kept,
            st.dead
        ),
        (1, 0, 2, 1, 1),
        "{st:?}"
    );
    assert_eq!(st.oldest_queued_created_at_ms, Some(100));
    assert_eq!(s.next_due("r").await.unwrap(), Some(100));
    assert_eq!(s.routes().await.unwrap(), ["r", "r2"]);
    let listed = s.list(Some("r"), None, 10, None).await.unwrap();
    assert_eq!(ids_of(&listed), [e, d, c, b, a]);
    // Keys of schema 1 still dedupe; due order and times survived.
    assert!(matches!(
        s.enqueue(job("r", "d", "d", 400), WINDOW, DEEP).await.unwrap(),
        EnqueueOutcome::Duplicate(x) if *x.get() == d
    ));
    let leased = s.lease_due("r", 4_999, 10).await.unwrap();
    assert_eq!(ids_of(&leased), [a]);
    assert_eq!(s.lease_due("r", 5_000, 10).await.unwrap()[0].id, c);
    // b was in flight: requeued at the open, due at the open's wall-clock time.
    assert_eq!(s.lease_due("r", u64::MAX - 1, 10).await.unwrap()[0].id, b);
    assert_eq!(s.replay_dead("r", 6_000).await.unwrap(), 1);
    drop(s);

    // The file says the current schema and has only its tables.
    let db = ::redb::Database::create(&path).unwrap();
    let tx = ::redb::ReadableDatabase::begin_read(&db).unwrap();
    let meta = tx.open_table(redb::schema::META).unwrap();
    let version = ::redb::ReadableTable::get(&meta, redb::schema::SCHEMA_VERSION_KEY)
        .unwrap()
        .map(|v| v.value());
    assert_eq!(version, Some(redb::schema::SCHEMA_VERSION));
    assert!(matches!(
        tx.open_table(redb::schema::v1::BY_ROUTE),
        Err(::redb::TableError::TableDoesNotExist(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generated_key_writes_no_key_row_and_keeps_its_window_with_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("queue.redb");
    let (with_generated_key, client);
    {
        let s = RedbStore::open(&path, 1 << 20).unwrap();
        with_generated_key = stored(&s, generated("r", "g", 100)).await;
        client = stored(&s, job("r", "client-key", "c", 100)).await;
    }
    let db = ::redb::Database::create(&path).unwrap();
    let tx = ::redb::ReadableDatabase::begin_read(&db).unwrap();
    let idem = tx.open_table(redb::schema::IDEM).unwrap();
    let keys: Vec<(String, String)> = ::redb::ReadableTable::iter(&idem)
        .unwrap()
        .map(|e| {
            let (k, _) = e.unwrap();
            let (r, key) = k.value();
            (r.to_owned(), key.to_owned())
        })
        .collect();
    assert_eq!(keys, [("r".to_owned(), "client-key".to_owned())]);
    let by_route = tx.open_table(redb::schema::BY_ROUTE).unwrap();
    let window = |id: JobId| {
        ::redb::ReadableTable::get(&by_route, ("r", id.as_u128()))
            .unwrap()
            .map(|v| v.value())
    };
    assert_eq!(window(with_generated_key), Some(WINDOW));
    assert_eq!(window(client), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newer_schema_is_refused_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("queue.redb");
    drop(RedbStore::open(&path, 1 << 20).unwrap());
    {
        let db = ::redb::Database::create(&path).unwrap();
        let tx = db.begin_write().unwrap();
        tx.open_table(redb::schema::META)
            .unwrap()
            .insert(
                redb::schema::SCHEMA_VERSION_KEY,
                redb::schema::SCHEMA_VERSION + 1,
            )
            .unwrap();
        tx.commit().unwrap();
    }
    let before = std::fs::read(&path).unwrap();
    match RedbStore::open(&path, 1 << 20) {
        Err(StoreError::NewerSchema {
            path: p,
            found,
            supported,
        }) => {
            assert_eq!(p, path);
            assert_eq!(
                (found, supported),
                (
                    redb::schema::SCHEMA_VERSION + 1,
                    redb::schema::SCHEMA_VERSION
                )
            );
        }
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("a newer schema must be refused"),
    }
    assert_eq!(std::fs::read(&path).unwrap(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_file_is_corrupt_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("queue.redb");
    let garbage: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&path, &garbage).unwrap();
    match RedbStore::open(&path, 1 << 20) {
        Err(e @ StoreError::Corrupt { .. }) => {
            assert!(e.to_string().contains(&path.display().to_string()), "{e}");
        }
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("garbage must be refused"),
    }
    assert_eq!(std::fs::read(&path).unwrap(), garbage);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_open_is_already_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("queue.redb");
    let _s = RedbStore::open(&path, 1 << 20).unwrap();
    assert!(matches!(
        RedbStore::open(&path, 1 << 20),
        Err(StoreError::AlreadyOpen { path: p }) if p == path
    ));
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_file_and_directory_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data/queue.redb");
    let _s = RedbStore::open(&path, 1 << 20).unwrap();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&path), 0o600);
    assert_eq!(mode(path.parent().unwrap()), 0o700);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_enqueues_share_commits() {
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(RedbStore::open(dir.path().join("queue.redb"), 4 << 20).unwrap());
    let mut tasks = Vec::new();
    for i in 0..200 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            s.enqueue(job("r", &format!("k{i}"), "b", i), WINDOW, DEEP)
                .await
        }));
    }
    for t in tasks {
        assert!(matches!(
            t.await.unwrap().unwrap(),
            EnqueueOutcome::Stored(_)
        ));
    }
    assert_eq!(s.stats("r").await.unwrap().queued, 200);
    let commits = s.commits();
    assert!(commits < 200, "{commits} commits for 200 enqueues");
    assert!(commits >= 1);
}

#[test]
fn job_id_round_trips_and_orders() {
    let a = JobId::new();
    let b = JobId::new();
    assert!(a < b);
    assert_eq!(a.to_string().parse::<JobId>().unwrap(), a);
    assert!("nope".parse::<JobId>().is_err());
    for s in JobState::ALL {
        assert_eq!(s.as_str().parse::<JobState>().unwrap(), s);
    }
    assert_eq!(JobState::InFlight.as_str(), "in_flight");
}

// === fault injection ===

/// A file backend whose writes and syncs fail while `fail` is set.
#[derive(Debug)]
struct FlakyBackend {
    inner: ::redb::backends::FileBackend,
    fail: Arc<std::sync::atomic::AtomicBool>,
    /// Makes every sync slow, to hold the writer inside a commit.
    stall: Arc<std::sync::atomic::AtomicBool>,
}

impl FlakyBackend {
    fn check(&self) -> std::io::Result<()> {
        if self.stall.load(std::sync::atomic::Ordering::SeqCst) {
            std::thread::sleep(std::time::Duration::from_millis(300));
        }
        if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
            Err(std::io::Error::other("injected I/O failure"))
        } else {
            Ok(())
        }
    }
}

type Bound = std::ops::Bound<u64>;

impl ::redb::StorageBackend for FlakyBackend {
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        self.inner.read(offset, out)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.check()?;
        self.inner.set_len(len)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.check()?;
        self.inner.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.check()?;
        self.inner.write(offset, data)
    }
    fn close(&self) -> std::io::Result<()> {
        self.inner.close()
    }
    fn try_lock_range(&self, s: Bound, e: Bound) -> Result<bool, ::redb::BackendError> {
        self.inner.try_lock_range(s, e)
    }
    fn try_lock_shared_range(&self, s: Bound, e: Bound) -> Result<bool, ::redb::BackendError> {
        self.inner.try_lock_shared_range(s, e)
    }
    fn lock_range(&self, s: Bound, e: Bound) -> Result<(), ::redb::BackendError> {
        self.inner.lock_range(s, e)
    }
    fn lock_shared_range(&self, s: Bound, e: Bound) -> Result<(), ::redb::BackendError> {
        self.inner.lock_shared_range(s, e)
    }
    fn unlock_range(&self, s: Bound, e: Bound) -> Result<(), ::redb::BackendError> {
        self.inner.unlock_range(s, e)
    }
    fn query_lock_range(&self, s: Bound, e: Bound) -> Result<bool, ::redb::BackendError> {
        self.inner.query_lock_range(s, e)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_commit_answers_unavailable_then_store_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("queue.redb");
    let fail = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (opener, _) = flaky_opener(fail.clone());
    let s = RedbStore::open_with(&path, 1 << 20, opener, 1024).unwrap();
    let kept = stored(&s, job("r", "kept", "b", 1)).await;
    assert!(s.healthy());
    fail.store(true, std::sync::atomic::Ordering::SeqCst);
    let lost = job("r", "lost", "b", 2);
    match s.enqueue(lost.clone(), WINDOW, DEEP).await {
        Err(StoreError::Unavailable(_)) => {}
        other => panic!("a failed commit must not be Stored: {other:?}"),
    }
    assert!(!s.healthy());
    fail.store(false, std::sync::atomic::Ordering::SeqCst);

    // The store reopens at most once per REOPEN_EVERY; it recovers soon after the disk does.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    let id = loop {
        match s.enqueue(lost.clone(), WINDOW, DEEP).await {
            Ok(EnqueueOutcome::Stored(id)) => break id.into_inner(),
            Err(StoreError::Unavailable(_)) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            other => panic!("store did not recover: {other:?}"),
        }
    };
    assert_eq!(id, lost.id);
    assert!(s.healthy());
    assert_eq!(s.get(kept).await.unwrap().unwrap().state, JobState::Queued);
    assert_eq!(s.stats("r").await.unwrap().queued, 2);
}

/// An opener over [`FlakyBackend`]: failing while `fail` is set; the returned flag stalls syncs.
fn flaky_opener(
    fail: Arc<std::sync::atomic::AtomicBool>,
) -> (redb::Opener, Arc<std::sync::atomic::AtomicBool>) {
    let flag = fail;
    let stall = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stall2 = stall.clone();
    let opener: redb::Opener = Arc::new(move |path, builder| {
        let file = redb::open_file(path)?;
        builder.create_with_backend(FlakyBackend {
            inner: ::redb::backends::FileBackend::new(file)?,
            fail: flag.clone(),
            stall: stall.clone(),
        })
    });
    (opener, stall2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_channel_answers_busy_without_queueing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("queue.redb");
    let (opener, stall) = flaky_opener(Arc::new(std::sync::atomic::AtomicBool::new(false)));
    let s = Arc::new(RedbStore::open_with(&path, 1 << 20, opener, 1).unwrap());
    stall.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut tasks = Vec::new();
    for i in 0..20 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            s.enqueue(job("r", &format!("k{i}"), "b", i), WINDOW, DEEP)
                .await
        }));
    }
    let (mut busy, mut ok) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Err(StoreError::Busy) => busy += 1,
            Ok(EnqueueOutcome::Stored(_)) => ok += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    stall.store(false, std::sync::atomic::Ordering::SeqCst);
    assert!(busy > 0, "a full channel must answer Busy");
    assert_eq!(s.stats("r").await.unwrap().queued, ok);
}

// === encryption at rest ===

mod sealed_conformance {
    use super::*;

    fn fresh() -> (tempfile::TempDir, RedbStore) {
        let dir = tempfile::tempdir().unwrap();
        let sealer = super::sealer(&[("k1", 1)], "k1");
        let store =
            RedbStore::open_sealed(dir.path().join("q/queue.redb"), 4 << 20, Some(sealer)).unwrap();
        (dir, store)
    }

    // The whole suite again with every job record sealed.
    conformance!(fresh();
        enqueue_lease_ack,
        lease_order_and_limit,
        reschedule_then_lease_again,
        dead_retry_replay_delete,
        dedupe_and_key_conflict,
        generated_key_dedupes_like_a_client_key,
        max_depth_rejects_and_stores_nothing,
        ordering_key_serialises_a_route,
        pause_and_resume,
        quota_fixed_windows,
        list_newest_first_with_cursor,
        stats_follow_every_transition,
        routes_lists_routes_with_stored_jobs,
    );
}

fn sealer(keys: &[(&str, u8)], primary: &str) -> Arc<crypt::Sealer> {
    let keys = keys
        .iter()
        .map(|(id, b)| {
            let key = crypt::parse_key(&hex::encode([*b; 32])).unwrap();
            (id.to_string(), key)
        })
        .collect();
    Arc::new(crypt::Sealer::from_keys(keys, primary).unwrap())
}

fn file_contains(path: &std::path::Path, needle: &[u8]) -> bool {
    let bytes = std::fs::read(path).unwrap();
    bytes.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_store_keeps_bodies_off_disk_and_rotates_keys() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("queue.redb");
    let mut a = job("r", "a", "MARKER-BODY-OF-A", 100);
    a.headers
        .push(("x-api-key".into(), b"MARKER-HEADER-OF-A".to_vec()));
    let (a_id, b_id);
    {
        let s = RedbStore::open_sealed(&path, 1 << 20, Some(sealer(&[("k1", 1)], "k1"))).unwrap();
        a_id = stored(&s, a.clone()).await;
        assert_eq!(s.get(a_id).await.unwrap().unwrap().body, a.body);
    }
    assert!(!file_contains(&path, b"MARKER-BODY-OF-A"));
    assert!(!file_contains(&path, b"MARKER-HEADER-OF-A"));
    {
        // Rotation: k2 is primary now; k1 stays listed for the records it sealed.
        let s = RedbStore::open_sealed(&path, 1 << 20, Some(sealer(&[("k2", 2), ("k1", 1)], "k2")))
            .unwrap();
        b_id = stored(&s, job("r", "b", "MARKER-BODY-OF-B", 200)).await;
        let got = s.get(a_id).await.unwrap().unwrap();
        assert_eq!((got.body, got.headers), (a.body.clone(), a.headers.clone()));
        // A state change rewrites the record under the primary key.
        s.reschedule(a_id, 150, outcome(503, 120)).await.unwrap();
    }
    assert!(!file_contains(&path, b"MARKER-BODY-OF-B"));
    // k1 retired: every job was rewritten under k2, so nothing is lost.
    let s = RedbStore::open_sealed(&path, 1 << 20, Some(sealer(&[("k2", 2)], "k2"))).unwrap();
    let leased = s.lease_due("r", 1_000, 10).await.unwrap();
    let mut bodies: Vec<_> = leased.iter().map(|j| j.body.clone()).collect();
    bodies.sort();
    assert_eq!(
        bodies,
        vec![a.body.clone(), Bytes::from("MARKER-BODY-OF-B")]
    );
    assert!(leased.iter().any(|j| j.id == b_id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_sealed_with_a_missing_key_fail_clearly_and_recover_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("queue.redb");
    let (a, b, c);
    {
        let s = RedbStore::open_sealed(&path, 1 << 20, Some(sealer(&[("k1", 1)], "k1"))).unwrap();
        a = stored(&s, job("r", "a", "body-a", 100)).await;
        b = stored(&s, job("r", "b", "body-b", 100)).await;
        c = stored(&s, job("r", "c", "body-c", 100)).await;
        // One in flight at the "crash", one delivered (kept for the dedupe window).
        assert_eq!(s.lease_due("r", 100, 2).await.unwrap().len(), 2);
        s.ack(b, 110).await.unwrap();
    }
    // Opened without keys: the open succeeds (in_flight jobs are requeued from their clear
    // fields), new jobs are stored unsealed and delivered, old ones fail naming their key.
    let s = RedbStore::open(&path, 1 << 20).unwrap();
    let d = stored(&s, job("r", "d", "body-d", 300)).await;
    match s.get(a).await {
        Err(StoreError::Sealed(m)) => {
            assert!(
                m.contains(&a.to_string()) && m.contains("\"k1\"") && m.contains("not configured"),
                "{m}"
            )
        }
        other => panic!("expected a sealed error, got {other:?}"),
    }
    // The key is held by the unreadable job: a repeat of it is still a duplicate.
    assert!(matches!(
        s.enqueue(job("r", "c", "body-c", 310), WINDOW, DEEP)
            .await
            .unwrap(),
        EnqueueOutcome::Duplicate(_)
    ));
    // The requeued job is due at the reopen's wall-clock time.
    let leased = s.lease_due("r", u64::MAX - 1, 10).await.unwrap();
    assert_eq!(leased.iter().map(|j| j.id).collect::<Vec<_>>(), vec![d]);
    assert_eq!(leased[0].body, Bytes::from("body-d"));
    let listed = s
        .list(Some("r"), Some(JobState::Dead), 10, None)
        .await
        .unwrap();
    let mut dead: Vec<_> = listed.iter().map(|j| j.id).collect();
    dead.sort();
    let mut want = vec![a, c];
    want.sort();
    assert_eq!(
        dead, want,
        "the unreadable jobs are dead-lettered, not retried forever"
    );
    for j in &listed {
        let why = j.dead_reason.as_deref().unwrap();
        assert!(
            why.contains("\"k1\"") && why.contains("storage.encryption"),
            "{why}"
        );
    }
    assert_eq!(s.stats("r").await.unwrap().dead, 2);
    // The delivered one is purged without its key.
    assert_eq!(s.purge_expired(u64::MAX - 1, 10).await.unwrap(), 1);
    drop(s);

    // With the key back, a retry delivers the full request.
    let s = RedbStore::open_sealed(&path, 1 << 20, Some(sealer(&[("k1", 1)], "k1"))).unwrap();
    assert!(s.retry(a, 2_000).await.unwrap());
    let leased = s.lease_due("r", 2_000, 10).await.unwrap();
    assert_eq!(leased.len(), 1);
    assert_eq!(leased[0].body, Bytes::from("body-a"));
    // A job that cannot be read can still be deleted without its key.
    drop(s);
    let s = RedbStore::open(&path, 1 << 20).unwrap();
    assert!(s.delete(c).await.unwrap());
    assert!(s.get(c).await.unwrap().is_none());
}

// === accept log ===

/// Copies the store's files into `to` as a crash would leave them when the database file has
/// lost everything since `db_image` was taken (its last durable commit) but the accept log is
/// as it is now: the worst case the log must cover.
fn crash_image(
    path: &std::path::Path,
    db_image: &[u8],
    to: &std::path::Path,
) -> std::path::PathBuf {
    let copy = to.join("queue.redb");
    std::fs::write(&copy, db_image).unwrap();
    std::fs::copy(redb::wal::log_path(path), redb::wal::log_path(&copy)).unwrap();
    copy
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepts_made_durable_by_the_log_survive_losing_the_database_pages() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("queue.redb");
    let s = RedbStore::open(&path, 1 << 20).unwrap();
    let before = std::fs::read(&path).unwrap();
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(stored(&s, job("r", &format!("k{i}"), &format!("b{i}"), 100 + i)).await);
    }
    ids.push(stored(&s, generated("r", "g", 200)).await);
    assert!(s.logged_commits() >= 6, "enqueue batches go to the log");
    let crashed = tempfile::tempdir().unwrap();
    let copy = crash_image(&path, &before, crashed.path());
    drop(s);

    let s = RedbStore::open(&copy, 1 << 20).unwrap();
    for id in &ids {
        let j = s.get(*id).await.unwrap().expect("replayed from the log");
        assert_eq!(j.state, JobState::Queued);
    }
    assert_eq!(
        s.get(ids[2]).await.unwrap().unwrap().body,
        Bytes::from("b2")
    );
    let st = s.stats("r").await.unwrap();
    assert_eq!(st.queued, 6, "{st:?}");
    assert_eq!(st.oldest_queued_created_at_ms, Some(100));
    // Keys, client and generated, dedupe as before the crash.
    assert_eq!(
        s.enqueue(job("r", "k0", "other", 300), WINDOW, DEEP)
            .await
            .unwrap(),
        EnqueueOutcome::KeyConflict(ids[0])
    );
    assert!(matches!(
        s.enqueue(job("r", "k1", "b1", 300), WINDOW, DEEP).await.unwrap(),
        EnqueueOutcome::Duplicate(x) if *x.get() == ids[1]
    ));
    let mut again = generated("r", "g", 300);
    again.idempotency_key = ids[5].to_string();
    assert!(matches!(
        s.enqueue(again, WINDOW, DEEP).await.unwrap(),
        EnqueueOutcome::Duplicate(x) if *x.get() == ids[5]
    ));
    assert_eq!(s.lease_due("r", 1_000, 10).await.unwrap().len(), 6);
    drop(s);
    // Applied once: a second open finds nothing more to apply.
    let s = RedbStore::open(&copy, 1 << 20).unwrap();
    assert_eq!(s.stats("r").await.unwrap().queued, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_deleted_after_it_was_logged_is_not_brought_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("queue.redb");
    let s = RedbStore::open(&path, 1 << 20).unwrap();
    let a = stored(&s, job("r", "a", "a", 100)).await;
    let b = stored(&s, job("r", "b", "b", 101)).await;
    // A durable commit: it holds both logged batches and the deletion.
    assert!(s.delete(a).await.unwrap());
    let durable = std::fs::read(&path).unwrap();
    let c = stored(&s, job("r", "c", "c", 102)).await;
    let crashed = tempfile::tempdir().unwrap();
    let copy = crash_image(&path, &durable, crashed.path());
    drop(s);

    let s = RedbStore::open(&copy, 1 << 20).unwrap();
    assert!(s.get(a).await.unwrap().is_none(), "deleted stays deleted");
    assert!(s.get(b).await.unwrap().is_some());
    assert!(s.get(c).await.unwrap().is_some(), "logged after the commit");
    assert_eq!(s.stats("r").await.unwrap().queued, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_log_append_answers_unavailable_and_keeps_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("queue.redb");
    let s = RedbStore::open(&path, 1 << 20).unwrap();
    let kept = stored(&s, job("r", "kept", "k", 100)).await;
    let log = redb::wal::log_path(&path);
    redb::wal::faults::set_failing(&log, true);
    let lost = job("r", "lost", "l", 101);
    let res = s.enqueue(lost.clone(), WINDOW, DEEP).await;
    redb::wal::faults::set_failing(&log, false);
    assert!(
        matches!(res, Err(StoreError::Unavailable(ref m)) if m.contains("accept log")),
        "{res:?}"
    );
    assert!(s.get(lost.id).await.unwrap().is_none(), "taken back out");
    assert_eq!(s.stats("r").await.unwrap().queued, 1);
    // The key is free: the refused request may be sent again and is stored.
    assert_eq!(stored(&s, lost.clone()).await, lost.id);
    drop(s);
    let s = RedbStore::open(&path, 1 << 20).unwrap();
    assert!(s.get(kept).await.unwrap().is_some());
    assert_eq!(s.stats("r").await.unwrap().queued, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accept_log_entry_that_does_not_decode_is_corrupt_naming_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("queue.redb");
    drop(RedbStore::open(&path, 1 << 20).unwrap());
    {
        let mut log = redb::wal::AcceptLog::open(&path).unwrap();
        log.make_ready().unwrap();
        let mut payload = Vec::new();
        redb::wal::push_entry(&mut payload, 0, b"not a job record");
        log.append(1_000, &payload).unwrap();
    }
    match RedbStore::open(&path, 1 << 20) {
        Err(StoreError::Corrupt { path: p, message }) => {
            assert_eq!(p, redb::wal::log_path(&path), "{message}");
        }
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("an undecodable log must be refused"),
    }
}
