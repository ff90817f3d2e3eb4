//! Why a node could not start: the one error type of start-up, with its cause kept as a source.

/// A boxed cause (a service's own error type).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The listening socket could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    /// The templates directory could not be read.
    #[error(transparent)]
    Templates(#[from] crate::http::templates::TemplateError),
    /// A service or setting the configuration names is unreachable or unusable; `key` is the
    /// configuration key to look at (`postgres.url`, `nats.url`, ...).
    #[error("{key}: {source}")]
    Service {
        key: &'static str,
        #[source]
        source: BoxError,
    },
}

impl StartError {
    /// A failure of the service configured under `key`.
    pub fn service(key: &'static str, source: impl Into<BoxError>) -> Self {
        StartError::Service {
            key,
            source: source.into(),
        }
    }
}
