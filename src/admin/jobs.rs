//! `/jobs`: list (newest first, paginated by cursor), show one job with its headers
//! redacted and its body summarised, retry a dead or retrying job, delete a job.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::redact::Redactor;
use super::{rfc3339, AdminError, AdminState};
use crate::proxy::defer::now_ms;
use crate::queue::{Job, JobId, JobState, LastOutcome};

/// Page size when `limit` is absent.
pub const DEFAULT_LIMIT: usize = 50;
/// Larger `limit`s are cut to this.
pub const MAX_LIMIT: usize = 1000;
/// The most body text shown in `GET /jobs/{id}`; the rest is counted, not shown.
pub const BODY_TEXT_MAX: usize = 64 * 1024;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    route: Option<String>,
    state: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
}

pub async fn list(
    State(st): State<AdminState>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Value>, AdminError> {
    let Query(q) = query.map_err(|e| {
        AdminError::BadQuery(format!(
            "{}; expected route, state, limit and cursor",
            e.body_text()
        ))
    })?;
    let store = st.store()?;
    let state = match q.state.as_deref().filter(|s| !s.is_empty()) {
        Some(s) => Some(
            s.parse::<JobState>()
                .map_err(|e| AdminError::BadQuery(e.to_string()))?,
        ),
        None => None,
    };
    let limit = match q.limit.as_deref() {
        None | Some("") => DEFAULT_LIMIT,
        Some(l) => match l.parse::<usize>() {
            Ok(n) if n > 0 => n.min(MAX_LIMIT),
            _ => {
                return Err(AdminError::BadQuery(format!(
                    "limit must be a whole number from 1 to {MAX_LIMIT}, found {l:?}"
                )))
            }
        },
    };
    let cursor = match q.cursor.as_deref().filter(|c| !c.is_empty()) {
        Some(c) => Some(c.parse::<JobId>().map_err(|_| {
            AdminError::BadQuery(format!(
                "cursor {c:?} is not a job id (use next_cursor of the previous page)"
            ))
        })?),
        None => None,
    };
    let route = q.route.as_deref().filter(|r| !r.is_empty());
    // One more than asked tells whether another page exists without an empty last page.
    let mut jobs = store.list(route, state, limit + 1, cursor).await?;
    let more = jobs.len() > limit;
    jobs.truncate(limit);
    let next_cursor = more
        .then(|| jobs.last().map(|j| j.id.to_string()))
        .flatten();
    Ok(Json(json!({
        "jobs": jobs.iter().map(summary).collect::<Vec<_>>(),
        "limit": limit,
        "next_cursor": next_cursor,
    })))
}

pub async fn show(
    State(st): State<AdminState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, AdminError> {
    let id = parse_id(&id)?;
    let job = st
        .store()?
        .get(id)
        .await?
        .ok_or(AdminError::JobNotFound(id))?;
    let redactor = Redactor::new(&st.config().redact_headers);
    Ok(Json(detail(&job, &redactor)))
}

pub async fn retry(
    State(st): State<AdminState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, AdminError> {
    let id = parse_id(&id)?;
    let store = st.store()?;
    let job = store.get(id).await?.ok_or(AdminError::JobNotFound(id))?;
    if !store.retry(id, now_ms()).await? {
        // The state may have moved since the read; report what it is now.
        let state = store.get(id).await?.map_or(job.state, |j| j.state);
        return Err(AdminError::NotRetryable { id, state });
    }
    st.wake(&job.route).await;
    tracing::info!(job_id = %id, route = %job.route, attempts = job.attempts, "job retried from the admin API");
    let job = store.get(id).await?.ok_or(AdminError::JobNotFound(id))?;
    Ok(Json(summary(&job)))
}

pub async fn delete(
    State(st): State<AdminState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, AdminError> {
    let id = parse_id(&id)?;
    if !st.store()?.delete(id).await? {
        return Err(AdminError::JobNotFound(id));
    }
    tracing::info!(job_id = %id, "job deleted from the admin API");
    Ok(Json(json!({ "id": id.to_string(), "deleted": true })))
}

fn parse_id(id: &str) -> Result<JobId, AdminError> {
    id.parse().map_err(|_| AdminError::BadJobId(id.to_owned()))
}

/// A timestamp as both RFC 3339 and Unix milliseconds: one for people, one for scripts.
fn stamp(out: &mut serde_json::Map<String, Value>, name: &str, ms: Option<u64>) {
    out.insert(name.to_owned(), ms.map(rfc3339).into());
    out.insert(format!("{name}_ms"), ms.into());
}

/// One line of `GET /jobs`: no headers or body.
pub fn summary(job: &Job) -> Value {
    let mut out = serde_json::Map::new();
    out.insert("id".into(), job.id.to_string().into());
    out.insert("route".into(), job.route.clone().into());
    out.insert("state".into(), job.state.as_str().into());
    out.insert("attempts".into(), job.attempts.into());
    out.insert("method".into(), job.method.clone().into());
    out.insert("uri".into(), job.uri.clone().into());
    stamp(&mut out, "created_at", Some(job.created_at_ms));
    stamp(&mut out, "updated_at", Some(job.updated_at_ms));
    let next = job.state.is_due_kind().then_some(job.next_attempt_at_ms);
    stamp(&mut out, "next_attempt_at", next);
    let last = job.last.as_ref();
    out.insert("last_status".into(), last.and_then(|l| l.status).into());
    out.insert(
        "last_error".into(),
        last.and_then(|l| l.error.clone()).into(),
    );
    out.insert("dead_reason".into(), job.dead_reason.clone().into());
    Value::Object(out)
}

/// `GET /jobs/{id}`: the summary plus the request as it will be sent (secrets masked)
/// and what the last attempt saw.
pub fn detail(job: &Job, redactor: &Redactor) -> Value {
    let mut v = summary(job);
    if let Value::Object(out) = &mut v {
        out.insert("idempotency_key".into(), job.idempotency_key.clone().into());
        out.insert("ordering_key".into(), job.ordering_key.clone().into());
        out.insert("traceparent".into(), job.traceparent.clone().into());
        out.insert("headers".into(), redactor.headers(&job.headers));
        out.insert("body".into(), body_view(&job.body, false));
        out.insert(
            "last".into(),
            job.last
                .as_ref()
                .map_or(Value::Null, |l| last_view(l, redactor)),
        );
    }
    v
}

fn last_view(last: &LastOutcome, redactor: &Redactor) -> Value {
    let mut out = serde_json::Map::new();
    out.insert("status".into(), last.status.into());
    out.insert("error".into(), last.error.clone().into());
    stamp(&mut out, "at", Some(last.at_ms));
    out.insert("headers".into(), redactor.headers(&last.headers));
    // The store keeps only a prefix of the response body.
    let cut = last.body_prefix.len() >= crate::queue::BODY_PREFIX_MAX;
    out.insert("body".into(), body_view(&last.body_prefix, cut));
    Value::Object(out)
}

/// Text when the bytes are UTF-8 (up to [`BODY_TEXT_MAX`]), else only size and hash.
/// `cut` says the bytes are already a prefix of something longer.
pub fn body_view(body: &[u8], cut: bool) -> Value {
    let sha = hex::encode(Sha256::digest(body));
    let text = match std::str::from_utf8(body) {
        Ok(s) => Some(s),
        // A prefix may end inside a character; what comes before it is still text.
        Err(e) if cut && e.error_len().is_none() => {
            std::str::from_utf8(&body[..e.valid_up_to()]).ok()
        }
        Err(_) => None,
    };
    match text {
        Some(s) => {
            let mut end = s.len().min(BODY_TEXT_MAX);
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            json!({
                "size": body.len(),
                "sha256": sha,
                "encoding": "utf-8",
                "text": &s[..end],
                "truncated": cut || end < body.len(),
            })
        }
        None => json!({
            "size": body.len(),
            "sha256": sha,
            "encoding": "binary",
            "text": null,
            "truncated": cut,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_body_is_text_and_long_text_is_cut_on_a_char_boundary() {
        let v = body_view(b"{\"a\":1}", false);
        assert_eq!(v["text"], "{\"a\":1}");
        assert_eq!(v["truncated"], false);
        assert_eq!(v["size"], 7);

        let long = "é".repeat(BODY_TEXT_MAX); // two bytes each
        let v = body_view(long.as_bytes(), false);
        assert_eq!(v["truncated"], true);
        assert_eq!(v["text"].as_str().unwrap().len(), BODY_TEXT_MAX);
        assert_eq!(v["size"], 2 * BODY_TEXT_MAX);
    }

    #[test]
    fn binary_body_shows_only_size_and_hash() {
        let v = body_view(&[0xff, 0xfe, 0x00], false);
        assert_eq!(v["encoding"], "binary");
        assert!(v["text"].is_null());
        assert_eq!(v["size"], 3);
        assert_eq!(v["sha256"].as_str().unwrap().len(), 64);
    }

    #[test]
    fn a_prefix_cut_inside_a_character_is_still_text() {
        let mut b = b"abc".to_vec();
        b.push(0xc3); // first byte of "é"
        let v = body_view(&b, true);
        assert_eq!(v["text"], "abc");
        assert_eq!(v["truncated"], true);
    }
}
