//! The NATS broker's standing pull ([`TaskQueue::feed`](super::TaskQueue::feed)): one inbox
//! per worker and queue, and pull requests on the queue's durable consumer that ask for
//! exactly the worker's free slots. A request stays standing at the server (up to
//! [`EXPIRES`], with idle heartbeats), so a task published to an idle worker is pushed to it
//! the moment it is stored, instead of at its next fetch.
//!
//! Flow control is credit-based: `asked` counts the messages the live requests may still
//! deliver. The worker's free slots bound it (`running + asked <= concurrency` whenever the
//! feed asks), each delivery takes one, and an expired or cancelled request gives back what
//! it did not deliver (the server's `Nats-Pending-Messages` header on its 408/409 status). A
//! worker therefore never holds more deliveries than it has slots, and no delivery waits in
//! its hands for a slot (where it could sit past `ack_wait`). When the count cannot be known
//! (a status without the header, heartbeats lost after a reconnect), it is reset and asked
//! again; a delivery that then arrives beyond the credit is put back at once (a nak without
//! delay), never kept.
//!
//! Dropping the feed unsubscribes its inbox; the server skips a waiting request whose reply
//! subject has no interest, so a stopped worker's requests deliver nothing.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull::BatchConfig, AckKind};
use async_nats::{HeaderMap, StatusCode, Subscriber};
use async_trait::async_trait;
use futures_util::{FutureExt, StreamExt};
use tokio::time::Instant;

use super::broker::{BrokerError, Delivery, Feed};

/// How long a pull request stands at the server before it expires (and is asked again).
pub(super) const EXPIRES: Duration = Duration::from_secs(10);
/// The server's idle heartbeat on a standing request.
pub(super) const HEARTBEAT: Duration = Duration::from_secs(1);
/// Silence after which the standing requests are taken as lost (a NATS restart, a
/// reconnect): the credit is reset and asked again.
const LOST_AFTER: Duration = Duration::from_secs(3);

/// A standing pull on one queue's consumer for one worker.
pub(super) struct PullFeed {
    js: jetstream::Context,
    queue: String,
    /// `$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>`.
    subject: String,
    inbox: String,
    sub: Subscriber,
    /// Messages the live requests may still deliver.
    asked: usize,
    /// The last message or heartbeat from the server.
    heard: Instant,
    /// Top up the standing requests once at least this many slots are not asked for.
    top_up: usize,
}

impl PullFeed {
    pub(super) async fn open(
        js: jetstream::Context,
        queue: &str,
        stream: &str,
        consumer: &str,
        concurrency: usize,
    ) -> Result<Self, BrokerError> {
        let client = js.client();
        let inbox = client.new_inbox();
        let sub = client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| BrokerError::unavailable(format!("subscribe for queue {queue}"), e))?;
        Ok(Self {
            js,
            queue: queue.to_owned(),
            subject: format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"),
            inbox,
            sub,
            asked: 0,
            heard: Instant::now(),
            top_up: (concurrency / 4).max(1),
        })
    }

    /// Asks for the free slots not asked for yet: at once when nothing is standing, otherwise
    /// once enough are missing to be worth a request.
    async fn ask(&mut self, free: usize) -> Result<(), BrokerError> {
        let want = free.saturating_sub(self.asked);
        if want == 0 || (self.asked > 0 && want < self.top_up) {
            return Ok(());
        }
        let request = BatchConfig {
            batch: want,
            expires: Some(EXPIRES),
            idle_heartbeat: HEARTBEAT,
            ..Default::default()
        };
        let body = serde_json::to_vec(&request)
            .map_err(|e| BrokerError::data(format!("pull request of queue {}", self.queue), e))?;
        self.js
            .client()
            .publish_with_reply(self.subject.clone(), self.inbox.clone(), body.into())
            .await
            .map_err(|e| BrokerError::unavailable(format!("pull from queue {}", self.queue), e))?;
        // Counted in the same poll as the send completes: a future dropped here either sent
        // the request and counted it, or did neither.
        if self.asked == 0 {
            self.heard = Instant::now();
        }
        self.asked += want;
        Ok(())
    }

    /// What a status message gives back of the credit; `None`: unknown (reset).
    fn pending(headers: Option<&HeaderMap>) -> Option<usize> {
        headers?.get("Nats-Pending-Messages")?.as_str().parse().ok()
    }

    /// Handles one message from the inbox: a delivery to keep, or `None` (a status, or a
    /// surplus delivery put back). Never awaits, so [`Feed::next`] stays cancel-safe.
    fn take(&mut self, msg: async_nats::Message) -> Result<Option<Delivery>, BrokerError> {
        self.heard = Instant::now();
        match msg.status {
            None | Some(StatusCode::OK) => {
                let msg = jetstream::Message {
                    message: msg,
                    context: self.js.clone(),
                };
                if msg.info().is_err() {
                    // Not a delivery of the consumer (no JetStream ack subject): someone
                    // published to this inbox. Never run, never counted.
                    tracing::warn!(queue = %self.queue, "a message on the pull inbox that JetStream did not deliver: dropped");
                    return Ok(None);
                }
                if self.asked == 0 {
                    // Beyond the credit (a request thought lost was not): not kept.
                    tracing::debug!(queue = %self.queue, "a delivery beyond the free slots: put back");
                    tokio::spawn(async move {
                        if let Err(e) = msg.ack_with(AckKind::Nak(None)).await {
                            tracing::debug!("cannot put back a surplus delivery: {e}");
                        }
                    });
                    return Ok(None);
                }
                self.asked -= 1;
                Ok(Some(super::nats::delivery(&self.queue, msg)))
            }
            Some(StatusCode::IDLE_HEARTBEAT) => Ok(None),
            Some(StatusCode::TIMEOUT) | Some(StatusCode::REQUEST_TERMINATED) => {
                let left = Self::pending(msg.headers.as_ref());
                let why = msg.description.unwrap_or_default();
                if why.eq_ignore_ascii_case("consumer deleted") {
                    return Err(BrokerError::unavailable_because(format!(
                        "pull from queue {}: consumer deleted",
                        self.queue
                    )));
                }
                match left {
                    Some(n) => self.asked = self.asked.saturating_sub(n),
                    None => {
                        if msg.status == Some(StatusCode::REQUEST_TERMINATED) {
                            tracing::debug!(queue = %self.queue, "pull request ended: {why}");
                        }
                        self.asked = 0;
                    }
                }
                Ok(None)
            }
            Some(StatusCode::NOT_FOUND) => Ok(None),
            Some(status) => Err(BrokerError::unavailable_because(format!(
                "pull from queue {}: status {status} {}",
                self.queue,
                msg.description.unwrap_or_default()
            ))),
        }
    }
}

#[async_trait]
impl Feed for PullFeed {
    async fn next(&mut self, free: usize) -> Result<Vec<Delivery>, BrokerError> {
        let free = free.max(1);
        let mut out = Vec::new();
        loop {
            self.ask(free).await?;
            let silent_for = self.heard.elapsed();
            let msg = if self.asked > 0 {
                match tokio::time::timeout(LOST_AFTER.saturating_sub(silent_for), self.sub.next())
                    .await
                {
                    Ok(msg) => msg,
                    Err(_) => {
                        tracing::debug!(queue = %self.queue, "no heartbeat: asking again");
                        self.asked = 0;
                        continue;
                    }
                }
            } else {
                self.sub.next().await
            };
            let Some(msg) = msg else {
                return Err(BrokerError::unavailable_because(format!(
                    "pull from queue {}: subscription closed",
                    self.queue
                )));
            };
            if let Some(d) = self.take(msg)? {
                out.push(d);
                // Whatever else already arrived, up to the free slots.
                while out.len() < free {
                    match self.sub.next().now_or_never() {
                        Some(Some(msg)) => {
                            if let Some(d) = self.take(msg)? {
                                out.push(d);
                            }
                        }
                        _ => break,
                    }
                }
                return Ok(out);
            }
        }
    }
}
