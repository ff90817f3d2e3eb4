//! The `file` engine: a [`Storage`] of one file per value under `[file] dir` (named by the
//! keyed hash, framed: version, expiry, sealed bytes), written atomically (temporary file,
//! fsync, rename), behind the generic [`KeyedStore`], so sessions survive a restart with
//! nothing else installed.

use std::path::{Path, PathBuf};

use async_trait::async_trait;

use super::storage::{frame, framed_entry, unframe, version_matches, Entry, Put, Storage};
use super::{now_unix, KeyedStore, RecordCodec, SaveOutcome, SessionId, StoreError};

const ENGINE: &str = "file";
const SUFFIX: &str = ".session";

/// Sessions as files in one directory: the generic store over [`FileStorage`].
pub type FileStore = KeyedStore<FileStorage>;

/// A file per value (`<key>.session`, framed: version, expiry, sealed bytes).
pub struct FileStorage {
    dir: PathBuf,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable {
        engine: ENGINE,
        message: e.to_string(),
    }
}

impl FileStore {
    /// A store in `dir`, created when missing, sealing with [`RecordCodec::plain`] until
    /// [`FileStore::with_codec`].
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir)
            .map_err(|e| unavailable(format!("cannot create {}: {e}", dir.display())))?;
        // Only this user may list or read sessions (0700 directory, 0600 files).
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| unavailable(format!("cannot restrict {}: {e}", dir.display())))?;
        }
        Ok(KeyedStore::new(FileStorage { dir }, RecordCodec::plain()))
    }

    /// Seals files with `codec` (`server.secret_key`, `sessions.encrypt`).
    pub fn with_codec(self, codec: RecordCodec) -> Self {
        KeyedStore::new(self.into_storage(), codec)
    }

    /// The directory sessions live in.
    pub fn dir(&self) -> &Path {
        &self.storage().dir
    }
}

impl FileStorage {
    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}{SUFFIX}"))
    }

    /// The framed value under `path`.
    async fn read(&self, path: &Path) -> Result<Option<Vec<u8>>, StoreError> {
        match tokio::fs::read(path).await {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(unavailable(format!("cannot read {}: {e}", path.display()))),
        }
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
        use std::os::unix::fs::OpenOptionsExt;
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
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
impl Storage for FileStorage {
    fn engine(&self) -> &'static str {
        ENGINE
    }

    async fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        Ok(self
            .read(&self.path(key))
            .await?
            .and_then(|value| framed_entry(&value)))
    }

    async fn put(&self, put: &Put) -> Result<SaveOutcome, StoreError> {
        // The shard actor serialises writes to one key, so read-compare-write is atomic here.
        let path = self.path(&put.key);
        let current = self.read(&path).await?;
        let stored = current.as_deref().and_then(unframe).map(|(v, e, _)| (v, e));
        if !version_matches(stored, put.expected, now_unix()) {
            return Ok(SaveOutcome::Conflict);
        }
        let value = frame(put.version, put.expires_at, &put.bytes);
        tokio::task::spawn_blocking(move || write_atomically(&path, &value))
            .await
            .map_err(unavailable)?
            .map_err(unavailable)?;
        Ok(SaveOutcome::Saved)
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        match tokio::fs::remove_file(self.path(key)).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn purge_expired(&self, now: i64) -> Result<u64, StoreError> {
        let mut n = 0;
        let mut rd = tokio::fs::read_dir(&self.dir)
            .await
            .map_err(|e| unavailable(format!("cannot list {}: {e}", self.dir.display())))?;
        while let Some(entry) = rd.next_entry().await.map_err(unavailable)? {
            let name = entry.file_name();
            if !name.to_str().is_some_and(|n| n.ends_with(SUFFIX)) {
                continue;
            }
            let Some(value) = self.read(&entry.path()).await? else {
                continue;
            };
            let expired = unframe(&value).is_none_or(|(_, expires_at, _)| expires_at <= now);
            if expired && tokio::fs::remove_file(entry.path()).await.is_ok() {
                n += 1;
            }
        }
        Ok(n)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        tokio::fs::metadata(&self.dir)
            .await
            .map(|_| ())
            .map_err(|e| unavailable(format!("{}: {e}", self.dir.display())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_directory_and_files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let sessions = dir.path().join("sessions");
        let store = FileStore::open(&sessions).expect("open");
        let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(store.dir()), 0o700);
        let file = sessions.join("k");
        write_atomically(&file, b"x").expect("write");
        assert_eq!(mode(&file), 0o600);
    }
}
