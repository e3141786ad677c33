//! The floor under spillway's accept path, for benches/peers.sh: a bare HTTP-to-redb
//! server with the same group commit (one writer thread, every waiting request in one
//! write transaction, `Durability::Immediate`, then the answers) but none of the
//! bookkeeping: one table keyed by a UUIDv7, the body as the value, no dedupe, due or
//! route index, no counters, no metrics. It answers `202` after the commit returned.
//! It stores through the same storage backend as spillway (zeros written ahead of the
//! file's growth). What spillway reaches as a share of this, in the same run, is what its
//! bookkeeping costs on that machine.
//!
//! Usage: bare_accept ADDR FILE

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use redb::{Database, Durability, TableDefinition};
// The same bound spillway's writer uses.
use spillway::queue::redb::MAX_BATCH;
use tokio::sync::{mpsc, oneshot};

const JOBS: TableDefinition<'_, u128, &[u8]> = TableDefinition::new("jobs");

type Work = (u128, Bytes, oneshot::Sender<bool>);

fn writer(db: Database, mut rx: mpsc::Receiver<Work>) {
    let mut batch: Vec<Work> = Vec::with_capacity(MAX_BATCH);
    while rx.blocking_recv_many(&mut batch, MAX_BATCH) > 0 {
        let ok = (|| -> Result<(), redb::Error> {
            let mut tx = db.begin_write()?;
            tx.set_durability(Durability::Immediate)?;
            {
                let mut t = tx.open_table(JOBS)?;
                for (id, body, _) in &batch {
                    t.insert(id, body.as_ref())?;
                }
            }
            tx.commit()?;
            Ok(())
        })()
        .is_ok();
        for (_, _, reply) in batch.drain(..) {
            let _ = reply.send(ok);
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(addr), Some(file)) = (args.next(), args.next()) else {
        return Err("usage: bare_accept ADDR FILE".into());
    };
    // spillway's default cache cap, so both hold the same memory budget.
    let path = std::path::Path::new(&file);
    let backend =
        spillway::queue::redb::PreallocFile::new(spillway::queue::redb::open_file(path)?, path)?;
    let db = redb::Builder::new()
        .set_cache_size(16 << 20)
        .create_with_backend(backend)?;
    let (tx, rx) = mpsc::channel::<Work>(4096);
    std::thread::spawn(move || writer(db, rx));
    let tx = Arc::new(tx);
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on {}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let tx = tx.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let tx = tx.clone();
                async move {
                    let body = req.into_body().collect().await.map(|b| b.to_bytes());
                    let stored = match body {
                        Ok(body) => {
                            let (reply, done) = oneshot::channel();
                            let id = uuid::Uuid::now_v7().as_u128();
                            tx.try_send((id, body, reply)).is_ok() && done.await.unwrap_or(false)
                        }
                        Err(_) => false,
                    };
                    let mut rsp =
                        Response::new(Full::new(Bytes::from_static(b"{\"status\":\"queued\"}")));
                    *rsp.status_mut() = if stored {
                        StatusCode::ACCEPTED
                    } else {
                        StatusCode::SERVICE_UNAVAILABLE
                    };
                    Ok::<_, Infallible>(rsp)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
