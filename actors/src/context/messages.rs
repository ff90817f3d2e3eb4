//! Flash messages (Django's `messages` framework): stored in the session, shown once.

use serde::{Deserialize, Serialize};

use crate::session::{Session, SessionError};

/// The session key holding pending messages.
pub const MESSAGES_KEY: &str = "_messages";

/// A message's level; its lowercase name is the `<li>` class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Debug,
    Info,
    Success,
    Warning,
    Error,
}

/// One flash message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub level: Level,
    pub text: String,
}

/// Queues a message for the next page this session renders.
pub fn add(session: &Session, level: Level, text: impl Into<String>) -> Result<(), SessionError> {
    let msg = Message {
        level,
        text: text.into(),
    };
    session.update(MESSAGES_KEY, move |list: Option<Vec<Message>>| {
        let mut list = list.unwrap_or_default();
        list.push(msg.clone());
        list
    })?;
    Ok(())
}

/// Queues a `success` message (Django's `messages.success`).
pub fn success(session: &Session, text: impl Into<String>) -> Result<(), SessionError> {
    add(session, Level::Success, text)
}

/// Queues an `info` message.
pub fn info(session: &Session, text: impl Into<String>) -> Result<(), SessionError> {
    add(session, Level::Info, text)
}

/// Queues a `warning` message.
pub fn warning(session: &Session, text: impl Into<String>) -> Result<(), SessionError> {
    add(session, Level::Warning, text)
}

/// Queues an `error` message.
pub fn error(session: &Session, text: impl Into<String>) -> Result<(), SessionError> {
    add(session, Level::Error, text)
}

/// Takes (consumes) every pending message.
pub fn take(session: &Session) -> Vec<Message> {
    if !session.contains(MESSAGES_KEY) {
        return Vec::new();
    }
    session
        .pop::<Vec<Message>>(MESSAGES_KEY)
        .ok()
        .flatten()
        .unwrap_or_default()
}
