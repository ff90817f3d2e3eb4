//! JetStream helpers shared by the `nats_kv` session engine and the NATS task broker.

use std::time::Duration;

use async_nats::jetstream::{self, stream};

/// Creates a key-value bucket's backing stream (`KV_<bucket>`) when missing, in the form
/// NATS 2.9 understands (async-nats' `create_key_value` fails against 2.9.10), so the bucket
/// can then be opened with `get_key_value`. `max_age` zero keeps entries forever.
pub async fn ensure_kv_stream(
    js: &jetstream::Context,
    bucket: &str,
    max_age: Duration,
    deny_delete: bool,
) -> Result<(), String> {
    let name = format!("KV_{bucket}");
    if js.get_stream(&name).await.is_ok() {
        return Ok(());
    }
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
        num_replicas: 1,
        ..Default::default()
    };
    match js.create_stream(config).await {
        Ok(_) => Ok(()),
        // Another node created it meanwhile.
        Err(e) => match js.get_stream(&name).await {
            Ok(_) => Ok(()),
            Err(_) => Err(format!("cannot create stream {name}: {e}")),
        },
    }
}
