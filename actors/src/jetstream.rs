//! JetStream helpers shared by the `nats_kv` session engine, the login throttle and the NATS
//! task broker: every stream and bucket Switchyard creates goes through [`ensure_stream`], so
//! each gets `nats.replicas` replicas (docs/cluster.md).

use std::time::Duration;

use async_nats::jetstream::context::CreateStreamError;
use async_nats::jetstream::{self, stream};

/// Creates stream `config.name` when missing. An existing stream keeps its configuration,
/// except that its replica count is brought to `config.num_replicas` (how a deployment that
/// moved to a NATS cluster raises `nats.replicas`); a server that refuses that is logged, not
/// an error, so a node still starts on a stream an operator sized by hand.
pub async fn ensure_stream(
    js: &jetstream::Context,
    config: stream::Config,
) -> Result<(), CreateStreamError> {
    let name = config.name.clone();
    if let Ok(stream) = js.get_stream(&name).await {
        match_replicas(js, stream.cached_info(), config.num_replicas).await;
        return Ok(());
    }
    match js.create_stream(config).await {
        Ok(_) => Ok(()),
        // Another node created it meanwhile.
        Err(e) => match js.get_stream(&name).await {
            Ok(_) => Ok(()),
            Err(_) => Err(e),
        },
    }
}

/// Updates an existing stream to `want` replicas when it has another count.
async fn match_replicas(js: &jetstream::Context, info: &stream::Info, want: usize) {
    let have = info.config.num_replicas.max(1);
    if have == want.max(1) {
        return;
    }
    let name = &info.config.name;
    let config = stream::Config {
        num_replicas: want.max(1),
        ..info.config.clone()
    };
    match js.update_stream(config).await {
        Ok(_) => tracing::info!(stream = %name, from = have, to = want, "stream replicas changed"),
        Err(e) => tracing::warn!(
            stream = %name,
            "stream keeps {have} replica(s): cannot change to nats.replicas = {want}: {e}"
        ),
    }
}

/// Creates a key-value bucket's backing stream (`KV_<bucket>`) when missing, in the form
/// NATS 2.9 understands (async-nats' `create_key_value` fails against 2.9.10), so the bucket
/// can then be opened with `get_key_value`. `max_age` zero keeps entries forever.
pub async fn ensure_kv_stream(
    js: &jetstream::Context,
    bucket: &str,
    max_age: Duration,
    deny_delete: bool,
    replicas: usize,
) -> Result<(), String> {
    let name = format!("KV_{bucket}");
    let config = stream::Config {
        name: name.clone(),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        max_age,
        allow_rollup: true,
        deny_delete,
        deny_purge: false,
        allow_direct: true,
        discard: stream::DiscardPolicy::New,
        storage: stream::StorageType::File,
        num_replicas: replicas.max(1),
        ..Default::default()
    };
    ensure_stream(js, config)
        .await
        .map_err(|e| format!("cannot create stream {name}: {e}"))
}
