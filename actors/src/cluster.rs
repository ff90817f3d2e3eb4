//! Cluster membership from NATS alone: every node (serve, worker, beat) publishes a heartbeat
//! on `<prefix>.events.node-heartbeat` every `cluster.heartbeat_interval`, and `cluster status`
//! gathers them into a [`ClusterView`] (SPEC.md "Schedules, canvas and the cluster").
//!
//! A [`Heartbeat`] is the reusable piece: a node builds one with its role, its queues and a
//! reader of its in-flight count, and [`Heartbeat::start`]s it; the beat role starts one with
//! [`Role::Beat`]. Heartbeats arrive on an events subject anyone may publish to, so the view
//! takes them as hostile input: malformed or implausible ones are ignored, and the view holds
//! at most [`MAX_NODES`] nodes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, SubsecRound, Utc};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

/// The event kind of heartbeats (`<prefix>.events.node-heartbeat`).
pub const HEARTBEAT_KIND: &str = "node-heartbeat";
/// Intervals without a heartbeat after which a node is gone.
pub const GONE_AFTER_INTERVALS: u32 = 3;
/// Most nodes a view holds (heartbeats of further nodes are ignored).
pub const MAX_NODES: usize = 10_000;
/// Longest node id, version or metrics URL a heartbeat may carry (bytes).
const MAX_FIELD: usize = 512;
/// Most queues a heartbeat may list.
const MAX_QUEUES: usize = 1_000;
/// Largest heartbeat payload read (bytes).
const MAX_PAYLOAD: usize = 64 * 1024;

/// What a node does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Serve,
    Worker,
    Beat,
}

impl Role {
    /// The spelling of SPEC.md (`serve`, `worker`, `beat`).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Serve => "serve",
            Role::Worker => "worker",
            Role::Beat => "beat",
        }
    }
}

/// One node as a heartbeat carries it and `cluster status --json` prints it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node: String,
    pub role: Role,
    pub queues: Vec<String>,
    pub in_flight: u64,
    pub version: String,
    /// When the heartbeat was sent (RFC 3339 UTC).
    pub last_seen: DateTime<Utc>,
    /// The node's metrics URL, if it serves one.
    pub metrics: Option<String>,
}

impl NodeStatus {
    /// Reads a heartbeat; `None` for anything malformed or implausible (too large, empty or
    /// overlong names, control characters that would garble a terminal).
    pub fn parse(payload: &[u8]) -> Option<Self> {
        if payload.len() > MAX_PAYLOAD {
            return None;
        }
        let status: NodeStatus = serde_json::from_slice(payload).ok()?;
        let text_ok = |s: &str| s.len() <= MAX_FIELD && !s.chars().any(char::is_control);
        let ok = !status.node.is_empty()
            && text_ok(&status.node)
            && text_ok(&status.version)
            && status.metrics.as_deref().is_none_or(text_ok)
            && status.queues.len() <= MAX_QUEUES
            && status.queues.iter().all(|q| !q.is_empty() && text_ok(q));
        ok.then_some(status)
    }
}

/// Reads a node's tasks in flight when a heartbeat is sent.
pub type InFlight = Arc<dyn Fn() -> u64 + Send + Sync>;

/// A node's heartbeat: what it says about the node, and where and how often it says it.
#[derive(Clone)]
pub struct Heartbeat {
    client: async_nats::Client,
    subject: String,
    interval: Duration,
    node: String,
    role: Role,
    queues: Vec<String>,
    in_flight: Option<InFlight>,
    metrics: Option<String>,
}

impl Heartbeat {
    /// The heartbeat of node `node` in role `role`, published under `prefix` every `interval`
    /// (no queues, nothing in flight and no metrics URL until set).
    pub fn new(
        client: async_nats::Client,
        prefix: &str,
        interval: Duration,
        node: impl Into<String>,
        role: Role,
    ) -> Self {
        Self {
            client,
            subject: heartbeat_subject(prefix),
            interval: interval.max(Duration::from_millis(100)),
            node: node.into(),
            role,
            queues: Vec::new(),
            in_flight: None,
            metrics: None,
        }
    }

    /// The queues the node consumes.
    pub fn queues(mut self, queues: Vec<String>) -> Self {
        self.queues = queues;
        self
    }

    /// How the node counts its tasks in flight.
    pub fn in_flight(mut self, in_flight: InFlight) -> Self {
        self.in_flight = Some(in_flight);
        self
    }

    /// The node's metrics URL.
    pub fn metrics(mut self, url: Option<String>) -> Self {
        self.metrics = url;
        self
    }

    /// What the node's heartbeat says now.
    pub fn status(&self) -> NodeStatus {
        NodeStatus {
            node: self.node.clone(),
            role: self.role,
            queues: self.queues.clone(),
            in_flight: self.in_flight.as_ref().map_or(0, |f| f()),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            last_seen: Utc::now().trunc_subsecs(3),
            metrics: self.metrics.clone(),
        }
    }

    /// Publishes one heartbeat now.
    pub async fn beat(&self) -> Result<(), async_nats::PublishError> {
        let payload = serde_json::to_vec(&self.status()).unwrap_or_default();
        self.client
            .publish(self.subject.clone(), Bytes::from(payload))
            .await
    }

    /// Publishes a heartbeat now and then every interval (on the current tokio runtime) until
    /// the returned handle is dropped. A failed publish is logged; the next one is tried on
    /// time (the client reconnects by itself).
    pub fn start(self) -> HeartbeatHandle {
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(self.interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Err(e) = self.beat().await {
                    tracing::debug!(node = %self.node, "cannot publish heartbeat: {e}");
                }
            }
        });
        HeartbeatHandle(task)
    }
}

/// Stops its heartbeat when dropped.
pub struct HeartbeatHandle(tokio::task::JoinHandle<()>);

impl Drop for HeartbeatHandle {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `<prefix>.events.node-heartbeat`.
pub fn heartbeat_subject(prefix: &str) -> String {
    format!("{prefix}.events.{HEARTBEAT_KIND}")
}

/// The live nodes as heartbeats show them: the latest heartbeat of each node, gone after
/// [`GONE_AFTER_INTERVALS`] intervals without one (counted by this view's clock, not the
/// sender's).
pub struct ClusterView {
    gone_after: Duration,
    nodes: HashMap<String, (NodeStatus, Instant)>,
    /// When a full view last looked for gone nodes to make room.
    pruned: Option<Instant>,
}

/// How often a full view looks for gone nodes to make room for a new one.
const PRUNE_EVERY: Duration = Duration::from_secs(1);

impl ClusterView {
    /// An empty view for heartbeats every `interval`.
    pub fn new(interval: Duration) -> Self {
        Self {
            gone_after: interval * GONE_AFTER_INTERVALS,
            nodes: HashMap::new(),
            pruned: None,
        }
    }

    /// Takes in one heartbeat received at `now`; whether it was one (malformed ones, and new
    /// nodes past [`MAX_NODES`] live ones, are ignored).
    pub fn observe(&mut self, payload: &[u8], now: Instant) -> bool {
        let Some(status) = NodeStatus::parse(payload) else {
            return false;
        };
        if self.nodes.len() >= MAX_NODES && !self.nodes.contains_key(&status.node) {
            // Full: make room from gone nodes, at most once a second (a flood of invented
            // node ids must not make every message scan the whole view).
            let due = self
                .pruned
                .is_none_or(|t| now.saturating_duration_since(t) >= PRUNE_EVERY);
            if due {
                self.forget_gone(now);
                self.pruned = Some(now);
            }
            if self.nodes.len() >= MAX_NODES {
                return false;
            }
        }
        self.nodes.insert(status.node.clone(), (status, now));
        true
    }

    fn forget_gone(&mut self, now: Instant) {
        let gone_after = self.gone_after;
        self.nodes
            .retain(|_, (_, seen)| now.saturating_duration_since(*seen) < gone_after);
    }

    /// The nodes seen within the last three intervals at `now`, by role, then node id.
    pub fn live(&mut self, now: Instant) -> Vec<NodeStatus> {
        self.forget_gone(now);
        let mut nodes: Vec<NodeStatus> = self.nodes.values().map(|(s, _)| s.clone()).collect();
        nodes.sort_by(|a, b| (a.role, &a.node).cmp(&(b.role, &b.node)));
        nodes
    }
}

/// Listens to the heartbeats under `prefix` for `listen` (at least one interval, so that every
/// live node is heard once) and returns the live nodes.
pub async fn gather(
    client: &async_nats::Client,
    prefix: &str,
    interval: Duration,
    listen: Duration,
) -> Result<Vec<NodeStatus>, async_nats::SubscribeError> {
    let mut sub = client.subscribe(heartbeat_subject(prefix)).await?;
    let mut view = ClusterView::new(interval);
    let deadline = tokio::time::Instant::now() + listen;
    while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, sub.next()).await {
        if !view.observe(&msg.payload, Instant::now()) {
            tracing::debug!(subject = %msg.subject, "ignored a malformed heartbeat");
        }
    }
    let _ = sub.unsubscribe().await;
    Ok(view.live(Instant::now()))
}

/// How long `cluster status` listens for heartbeats every `interval`: one interval and a
/// margin (half an interval, at least 500 ms) for delivery and timer jitter.
pub fn listen_time(interval: Duration) -> Duration {
    interval + (interval / 2).max(Duration::from_millis(500))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn heartbeat(node: &str) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "node": node, "role": "worker", "queues": ["default"], "in_flight": 2,
            "version": "0.1.0", "last_seen": "2026-12-01T00:00:00Z", "metrics": null
        }))
        .unwrap_or_default()
    }

    #[test]
    fn hostile_heartbeats_are_ignored() {
        let mut view = ClusterView::new(Duration::from_secs(1));
        let now = Instant::now();
        assert!(view.observe(&heartbeat("w1"), now));
        for bad in [
            b"not json".to_vec(),
            b"{}".to_vec(),
            heartbeat(""),
            heartbeat("evil\u{1b}[2J"),
            heartbeat(&"x".repeat(MAX_FIELD + 1)),
            br#"{"node":"n","role":"king","queues":[],"in_flight":0,"version":"","last_seen":"2026-12-01T00:00:00Z","metrics":null}"#.to_vec(),
            br#"{"node":"n","role":"beat","queues":[],"in_flight":-1,"version":"","last_seen":"2026-12-01T00:00:00Z","metrics":null}"#.to_vec(),
            br#"{"node":"n","role":"beat","queues":[],"in_flight":0,"version":"","last_seen":"yesterday","metrics":null}"#.to_vec(),
        ] {
            assert!(!view.observe(&bad, now), "{}", String::from_utf8_lossy(&bad));
        }
        let live = view.live(now);
        assert_eq!(live.len(), 1);
        assert_eq!(live[0].node, "w1");
        assert_eq!(live[0].queues, ["default"]);
    }

    #[test]
    fn a_node_unseen_for_three_intervals_is_gone() {
        let mut view = ClusterView::new(Duration::from_secs(2));
        let t0 = Instant::now();
        view.observe(&heartbeat("w1"), t0);
        view.observe(&heartbeat("w2"), t0 + Duration::from_secs(4));
        let names = |v: Vec<NodeStatus>| v.into_iter().map(|s| s.node).collect::<Vec<_>>();
        assert_eq!(
            names(view.live(t0 + Duration::from_millis(5_900))),
            ["w1", "w2"]
        );
        assert_eq!(names(view.live(t0 + Duration::from_secs(6))), ["w2"]);
    }

    #[test]
    fn the_view_is_bounded() {
        let mut view = ClusterView::new(Duration::from_secs(60));
        let now = Instant::now();
        for i in 0..MAX_NODES {
            assert!(view.observe(&heartbeat(&format!("n{i}")), now));
        }
        assert!(!view.observe(&heartbeat("one-too-many"), now));
        // A known node still refreshes.
        assert!(view.observe(&heartbeat("n0"), now));
        assert_eq!(view.live(now).len(), MAX_NODES);
        // Once the others are gone, a new node finds room.
        let later = now + Duration::from_secs(180);
        assert!(view.observe(&heartbeat("n0"), later - Duration::from_secs(1)));
        assert!(view.observe(&heartbeat("newcomer"), later));
        assert_eq!(view.live(later).len(), 2);
    }
}
