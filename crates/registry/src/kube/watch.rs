//! A collection's watch on the API server: `kube-runtime`'s watcher mapped onto [`RawEvent`]s.
//!
//! `Init` .. `InitApply`* .. `InitDone` is buffered and sent as one `Reset` (a partial list never
//! reaches the consumer, so nothing is removed before a complete list); `Apply` / `Delete` are
//! `Upsert` / `Delete`. The watcher relists by itself after `410 Gone` or a broken watch (with
//! backoff); an error while listing or watching is `Status(Unreachable)` (once), and the next
//! complete list is `Status(Connected)` then `Reset`. Retries wait at most [`MAX_BACKOFF`].

use super::{from_object, revision_of, send};
use crate::{Connectivity, Kind, RawEvent, Revision};
use futures::StreamExt;
use kube::api::{Api, DynamicObject};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{debug, warn};

/// The watchers' retry delays: from 250 ms, doubling to at most [`MAX_BACKOFF`], each a random
/// point in its upper half (so 1000 nodes do not relist in step), back to the start after a
/// success. kube-runtime's default grows to 30 s, which would keep a node on stale data for
/// half a minute after an API server outage.
#[derive(Debug, Clone)]
pub(crate) struct WatchBackoff {
    next: Duration,
}

/// The longest wait between two attempts of a watch.
pub(crate) const MAX_BACKOFF: Duration = Duration::from_secs(4);
const FIRST_BACKOFF: Duration = Duration::from_millis(250);

impl Default for WatchBackoff {
    fn default() -> Self {
        WatchBackoff {
            next: FIRST_BACKOFF,
        }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        use rand::Rng;
        let d = self.next;
        self.next = (d * 2).min(MAX_BACKOFF);
        let ms = d.as_millis().max(2) as u64;
        Some(Duration::from_millis(
            rand::thread_rng().gen_range(ms / 2..=ms),
        ))
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = FIRST_BACKOFF;
    }
}

/// Feeds `tx` until the consumer drops its end.
pub(super) async fn run(api: Api<DynamicObject>, kind: Kind, tx: mpsc::Sender<RawEvent>) {
    let stream = watcher::watcher(api, watcher::Config::default()).backoff(WatchBackoff::default());
    futures::pin_mut!(stream);
    let mut connected = true;
    let mut buffer: Option<BTreeMap<String, Vec<u8>>> = None;
    let mut revision = Revision(0);
    loop {
        let event = tokio::select! {
            e = stream.next() => e,
            () = tx.closed() => return,
        };
        let Some(event) = event else {
            warn!(collection = %kind, "the Kubernetes watch ended");
            return;
        };
        let out = match event {
            Ok(Event::Init) => {
                buffer = Some(BTreeMap::new());
                revision = Revision(0);
                None
            }
            Ok(Event::InitApply(obj)) => {
                revision = revision.max(revision_of(&obj));
                if let (Some(b), Some((name, value))) = (buffer.as_mut(), from_object(kind, &obj)) {
                    // Claims: two blocks of one node (a move in progress) keep the newer.
                    b.insert(name, value);
                }
                None
            }
            Ok(Event::InitDone) => {
                let items: Vec<(String, Vec<u8>)> =
                    buffer.take().unwrap_or_default().into_iter().collect();
                debug!(collection = %kind, objects = items.len(), "complete list");
                if !connected {
                    connected = true;
                    if !send(&tx, RawEvent::Status(Connectivity::Connected)).await {
                        return;
                    }
                }
                Some(RawEvent::Reset { items, revision })
            }
            Ok(Event::Apply(obj)) => {
                from_object(kind, &obj).map(|(name, value)| RawEvent::Upsert {
                    name,
                    value,
                    revision: revision_of(&obj),
                })
            }
            Ok(Event::Delete(obj)) => from_object(kind, &obj).map(|(name, _)| RawEvent::Delete {
                name,
                revision: revision_of(&obj),
            }),
            // 410 Gone: the watch fell behind the API server's history; the watcher lists
            // again at once. A normal resync, not an outage: the list's Reset follows.
            Err(watcher::Error::WatchError(status)) if status.code == 410 => {
                debug!(collection = %kind, message = %status.message, "watch expired (410 Gone); listing again");
                None
            }
            Err(e) => {
                if connected {
                    connected = false;
                    warn!(collection = %kind, error = %e, "the Kubernetes API server cannot be watched");
                    Some(RawEvent::Status(Connectivity::Unreachable(e.to_string())))
                } else {
                    debug!(collection = %kind, error = %e, "watch still failing");
                    None
                }
            }
        };
        if let Some(ev) = out {
            if !send(&tx, ev).await {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::utils::Backoff;

    #[test]
    fn backoff_is_capped_and_resets() {
        let mut b = WatchBackoff::default();
        let waits: Vec<Duration> = b.by_ref().take(10).collect();
        assert!(waits.iter().all(|w| *w <= MAX_BACKOFF), "{waits:?}");
        assert!(waits[9] >= MAX_BACKOFF / 2, "{waits:?}");
        b.reset();
        assert!(b.next().is_some_and(|w| w <= FIRST_BACKOFF));
    }
}
