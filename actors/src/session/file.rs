//! The `file` engine: one JSON file per session under `[file] dir`, written atomically
//! (temporary file, fsync, rename), so sessions survive a restart with nothing else installed.

use std::path::{Path, PathBuf};

use async_trait::async_trait;

use super::{now_unix, Record, RecordCodec, SaveOutcome, SessionId, SessionStore, StoreError};

const ENGINE: &str = "file";
const SUFFIX: &str = ".session";

/// Sessions as files in one directory.
pub struct FileStore {
    dir: PathBuf,
    codec: RecordCodec,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable {
        engine: ENGINE,
        message: e.to_string(),
    }
}

impl FileStore {
    /// A store in `dir`, created when missing.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir)
            .map_err(|e| unavailable(format!("cannot create {}: {e}", dir.display())))?;
        Ok(Self {
            dir,
            codec: RecordCodec::plain(),
        })
    }

    /// Encodes files with `codec` (`sessions.encrypt`).
    pub fn with_codec(mut self, codec: RecordCodec) -> Self {
        self.codec = codec;
        self
    }

    /// The directory sessions live in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, id: &SessionId) -> PathBuf {
        self.dir.join(format!("{}{SUFFIX}", id.as_str()))
    }

    async fn read(&self, id: &SessionId, path: &Path) -> Result<Option<Record>, StoreError> {
        match tokio::fs::read(path).await {
            Ok(bytes) => self
                .codec
                .decode(id, &bytes)
                .map(Some)
                .map_err(|e| StoreError::Corrupt {
                    engine: ENGINE,
                    message: format!("{}: {e}", path.display()),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(unavailable(format!("cannot read {}: {e}", path.display()))),
        }
    }

    /// Every session file with its id.
    async fn all(&self) -> Result<Vec<(SessionId, PathBuf)>, StoreError> {
        let mut out = Vec::new();
        let mut rd = tokio::fs::read_dir(&self.dir)
            .await
            .map_err(|e| unavailable(format!("cannot list {}: {e}", self.dir.display())))?;
        while let Some(entry) = rd.next_entry().await.map_err(unavailable)? {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let Some(id) = name.strip_suffix(SUFFIX).and_then(SessionId::parse) else {
                continue;
            };
            out.push((id, entry.path()));
        }
        Ok(out)
    }
}

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, fsync, rename.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile_in(dir)?;
    tmp.1.write_all(bytes)?;
    tmp.1.sync_all()?;
    std::fs::rename(&tmp.0, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp.0);
    })
}

fn tempfile_in(dir: &Path) -> std::io::Result<(PathBuf, std::fs::File)> {
    for _ in 0..8 {
        let name = format!(".tmp-{}", SessionId::generate().as_str());
        let path = dir.join(name);
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(f) => return Ok((path, f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other("cannot create a temporary file"))
}

#[async_trait]
impl SessionStore for FileStore {
    fn engine(&self) -> &'static str {
        ENGINE
    }

    async fn load(&self, id: &SessionId) -> Result<Option<Record>, StoreError> {
        let path = self.path(id);
        match self.read(id, &path).await {
            Ok(Some(r)) if r.is_expired() => {
                let _ = tokio::fs::remove_file(&path).await;
                Ok(None)
            }
            Ok(r) => Ok(r),
            Err(StoreError::Corrupt { message, .. }) => {
                tracing::warn!("dropping corrupt session file: {message}");
                let _ = tokio::fs::remove_file(&path).await;
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    async fn save(
        &self,
        id: &SessionId,
        record: &Record,
        expected: Option<u64>,
    ) -> Result<SaveOutcome, StoreError> {
        // The shard actor serialises writes to one id, so read-compare-write is atomic here.
        let path = self.path(id);
        let current = match self.read(id, &path).await {
            Ok(Some(r)) if !r.is_expired() => Some(r.version),
            Ok(_) | Err(StoreError::Corrupt { .. }) => None,
            Err(e) => return Err(e),
        };
        if current != expected {
            return Ok(SaveOutcome::Conflict);
        }
        let bytes = self.codec.encode(id, record)?;
        tokio::task::spawn_blocking(move || write_atomically(&path, &bytes))
            .await
            .map_err(unavailable)?
            .map_err(unavailable)?;
        Ok(SaveOutcome::Saved)
    }

    async fn delete(&self, id: &SessionId) -> Result<(), StoreError> {
        match tokio::fs::remove_file(self.path(id)).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn purge_expired(&self) -> Result<u64, StoreError> {
        let now = now_unix();
        let mut n = 0;
        for (id, path) in self.all().await? {
            let expired = match self.read(&id, &path).await {
                Ok(Some(r)) => r.is_expired_at(now),
                Ok(None) => false,
                Err(StoreError::Corrupt { .. }) => true,
                Err(e) => return Err(e),
            };
            if expired && tokio::fs::remove_file(&path).await.is_ok() {
                n += 1;
            }
        }
        Ok(n)
    }

    async fn sessions_of(&self, user: &str) -> Result<Vec<SessionId>, StoreError> {
        let now = now_unix();
        let mut out = Vec::new();
        for (id, path) in self.all().await? {
            if let Ok(Some(r)) = self.read(&id, &path).await {
                if !r.is_expired_at(now) && r.user() == Some(user) {
                    out.push(id);
                }
            }
        }
        Ok(out)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        tokio::fs::metadata(&self.dir)
            .await
            .map(|_| ())
            .map_err(|e| unavailable(format!("{}: {e}", self.dir.display())))
    }
}
