//! The line of every key of a configuration file, from `toml_edit`'s spans, so that errors can
//! say `file:line`.

use std::ops::Range;
use std::path::Path;

use toml_edit::{ImDocument, Item, Table, Value};

use super::ConfigError;

/// Where each key of a TOML document is set: dotted paths with array indices
/// (`tasks.queues[1].name`; an `[[tasks.queues]]` header is `tasks.queues[1]`) and 1-based line
/// numbers.
#[derive(Debug, Default)]
pub(super) struct KeyLines {
    entries: Vec<(String, usize)>,
}

impl KeyLines {
    /// Parses `text` (the file at `path`); a syntax error names the file, line and column.
    pub(super) fn parse(path: &Path, text: &str) -> Result<KeyLines, ConfigError> {
        let document = ImDocument::parse(text).map_err(|e| {
            let (line, column) = line_col(text, e.span().map_or(0, |span| span.start));
            let message = e.message().lines().collect::<Vec<_>>().join("; ");
            let path = path.to_path_buf();
            ConfigError::Syntax {
                path,
                line,
                column,
                message,
            }
        })?;
        let mut lines = KeyLines::default();
        lines.table(text, "", document.as_table());
        Ok(lines)
    }

    /// The line where `path` is set, if it is.
    pub(super) fn line_of(&self, path: &str) -> Option<usize> {
        self.entries
            .iter()
            .find(|(p, _)| p == path)
            .map(|&(_, line)| line)
    }

    fn add(&mut self, text: &str, path: String, span: Option<Range<usize>>) {
        if let Some(span) = span {
            self.entries.push((path, line_col(text, span.start).0));
        }
    }

    fn table(&mut self, text: &str, prefix: &str, table: &Table) {
        for (name, item) in table.iter() {
            let path = join(prefix, name);
            let span = table.key(name).and_then(|key| key.span());
            match item {
                Item::Table(inner) => {
                    self.add(text, path.clone(), inner.span().or(span));
                    self.table(text, &path, inner);
                }
                Item::ArrayOfTables(array) => {
                    for (i, inner) in array.iter().enumerate() {
                        let path = format!("{path}[{i}]");
                        self.add(text, path.clone(), inner.span());
                        self.table(text, &path, inner);
                    }
                }
                Item::Value(value) => {
                    self.add(text, path.clone(), span);
                    if let Value::InlineTable(inline) = value {
                        for (name, _) in inline.iter() {
                            let span = inline.key(name).and_then(|key| key.span());
                            self.add(text, join(&path, name), span);
                        }
                    }
                }
                Item::None => {}
            }
        }
    }
}

fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_owned()
    } else {
        format!("{prefix}.{name}")
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = before.matches('\n').count() + 1;
    (line, before[line_start..].chars().count() + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_lines_follow_the_document() -> Result<(), ConfigError> {
        let text = "top = 1\n[server]\nbind = \"\"\"\nmulti\nline\"\"\"\nlist = [\n  \"a\", # c\n  \"]\",\n]\n\
                    \"quoted\".x = 2\n[[tasks.queues]]\nname = 'a'\n[[tasks.queues]]\nname = 'b'\n\
                    [tasks.queues.extra]\nk = { a = 1 }\n";
        let lines = KeyLines::parse(Path::new("t.toml"), text)?;
        assert_eq!(lines.line_of("top"), Some(1));
        assert_eq!(lines.line_of("server"), Some(2));
        assert_eq!(lines.line_of("server.bind"), Some(3));
        assert_eq!(lines.line_of("server.list"), Some(6));
        assert_eq!(lines.line_of("server.quoted.x"), Some(10));
        assert_eq!(lines.line_of("tasks.queues[0].name"), Some(12));
        assert_eq!(lines.line_of("tasks.queues[1].name"), Some(14));
        assert_eq!(lines.line_of("tasks.queues[1].extra.k"), Some(16));
        assert_eq!(lines.line_of("tasks.queues[1].extra.k.a"), Some(16));
        Ok(())
    }
}
