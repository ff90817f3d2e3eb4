//! The demo's outgoing mail: `mail.backend = "file"` writes `<mail.dir>/<task id>.eml`
//! atomically (a redelivered task overwrites the same file, so it never sends two mails);
//! `"console"` prints the message to stderr.

use std::path::PathBuf;

use crate::config::{MailBackend, MailConfig};

/// A plain-text e-mail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Email {
    pub to: String,
    pub subject: String,
    pub body: String,
}

impl Email {
    /// An e-mail to `to` (the `From` is `mail.from`).
    pub fn new(to: &str, subject: impl Into<String>, body: impl Into<String>) -> Self {
        Self {
            to: to.to_owned(),
            subject: subject.into(),
            body: body.into(),
        }
    }
}

/// Why a mail was not sent.
#[derive(Debug, thiserror::Error)]
pub enum MailError {
    /// The key is not usable as a file name.
    #[error("mail key {0:?} is not a safe file name (letters, digits, '-' and '_' only)")]
    BadKey(String),
    /// Writing the file failed.
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Sends mail the way `[mail]` says.
#[derive(Clone, Debug)]
pub struct Mailer {
    backend: MailBackend,
    dir: PathBuf,
    from: String,
}

impl Mailer {
    /// A mailer for `[mail]`.
    pub fn new(config: &MailConfig) -> Self {
        Self {
            backend: config.backend,
            dir: config.dir.clone(),
            from: config.from.clone(),
        }
    }

    /// The file a mail sent under `key` is written to.
    pub fn path_of(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.eml"))
    }

    /// The message as RFC 5322 text.
    pub fn render(&self, key: &str, email: &Email) -> String {
        format!(
            "From: {}\r\nTo: {}\r\nSubject: {}\r\nDate: {}\r\nMessage-ID: <{key}@switchyard>\r\n\
             Content-Type: text/plain; charset=utf-8\r\n\r\n{}\r\n",
            self.from,
            email.to,
            email.subject,
            chrono::Utc::now().to_rfc2822(),
            email.body.replace('\n', "\r\n"),
        )
    }

    /// Sends `email` under `key` (the task id): the same key always lands in the same file.
    pub async fn send(&self, key: &str, email: &Email) -> Result<(), MailError> {
        if key.is_empty()
            || !key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(MailError::BadKey(key.to_owned()));
        }
        let text = self.render(key, email);
        match self.backend {
            MailBackend::Console => {
                eprintln!("---- mail {key} ----\n{text}---- end of mail {key} ----");
                Ok(())
            }
            MailBackend::File => {
                let io = |path: &PathBuf| {
                    let path = path.clone();
                    move |source| MailError::Io { path, source }
                };
                tokio::fs::create_dir_all(&self.dir)
                    .await
                    .map_err(io(&self.dir))?;
                let tmp = self.dir.join(format!(".{key}.eml.tmp"));
                let path = self.path_of(key);
                tokio::fs::write(&tmp, text.as_bytes())
                    .await
                    .map_err(io(&tmp))?;
                tokio::fs::rename(&tmp, &path).await.map_err(io(&path))?;
                Ok(())
            }
        }
    }
}

/// A mail failure inside a task: a bad key fails the task, an I/O error retries it.
impl From<MailError> for switchyard_actors::tasks::TaskError {
    fn from(e: MailError) -> Self {
        use switchyard_actors::tasks::TaskError;
        match e {
            MailError::BadKey(_) => TaskError::fail("bad_task_id", e),
            MailError::Io { .. } => TaskError::retry("mail", e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn file_backend_writes_and_overwrites_one_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mailer = Mailer::new(&MailConfig {
            backend: MailBackend::File,
            dir: dir.path().join("outbox"),
            from: "shop@example.com".into(),
        });
        let mail = |s: &str| Email {
            to: "alice".into(),
            subject: s.into(),
            body: "hi".into(),
        };
        mailer.send("k-1", &mail("one")).await.expect("send");
        mailer.send("k-1", &mail("two")).await.expect("send again");
        let files: Vec<_> = std::fs::read_dir(dir.path().join("outbox"))
            .expect("dir")
            .collect();
        assert_eq!(files.len(), 1);
        let text = std::fs::read_to_string(mailer.path_of("k-1")).expect("read");
        assert!(text.contains("Subject: two\r\n"), "{text}");
        assert!(matches!(
            mailer.send("../evil", &mail("x")).await,
            Err(MailError::BadKey(_))
        ));
    }
}
