//! The handlebars registry: every `*.hbs` under `server.templates`, reloaded on change in debug.
//!
//! A template is named by its path below the directory without the extension, with `/`
//! separators (`index`, `layouts/base`, `partials/product`). Every template is also a partial
//! under the same name, so `{{> layouts/base}}` and `{{> partials/product}}` work.
//!
//! A template that fails to parse does not stop the server: its error is kept and rendering it
//! fails with that error (a 500 whose page shows the detail only in debug).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use handlebars::{Context, Handlebars, Helper, HelperResult, Output, RenderContext};
use serde_json::Value;

use super::template_vars::{Analyzer, Needs, BUILTIN_HELPERS};

/// How often, at most, a debug server looks at the template files for changes.
const RELOAD_CHECK_INTERVAL: Duration = Duration::from_millis(250);

/// Why a template could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("template `{name}` does not exist")]
    Missing { name: String },
    #[error("template `{name}` failed to parse: {message}")]
    Parse { name: String, message: String },
    #[error("template `{name}` failed to render: {message}")]
    Render { name: String, message: String },
    #[error("cannot read template directory {dir}: {source}")]
    Io {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What one scan of the directory found.
/// Templates built into the library, used when the application's `server.templates` has none
/// of that name (an application's `error.hbs` replaces the plain error page).
const BUILTIN_TEMPLATES: &[(&str, &str)] = &[("error", include_str!("builtin/error.hbs"))];

struct Loaded {
    registry: Handlebars<'static>,
    /// Templates that failed to parse: name → message.
    broken: BTreeMap<String, String>,
    /// Every file seen with its modification time, to notice edits.
    stamps: BTreeMap<PathBuf, Option<SystemTime>>,
    /// What each template needs from the context processors.
    needs: HashMap<String, Arc<Needs>>,
}

/// `{{csrf_input}}`: the hidden form field carrying the request's CSRF token. It reads the
/// top-level `csrf_token` (the `csrf` processor provides it).
fn csrf_input_helper(
    _h: &Helper<'_>,
    _r: &Handlebars<'_>,
    ctx: &Context,
    _rc: &mut RenderContext<'_, '_>,
    out: &mut dyn Output,
) -> HelperResult {
    // As Django's {% csrf_token %}: without a token (no `csrf` processor, or no session),
    // write nothing; the form's POST will then fail the CSRF check with a clear 403.
    let Some(token) = ctx.data().get("csrf_token").and_then(Value::as_str) else {
        tracing::warn!("{{{{csrf_input}}}} used without `csrf_token` in the context");
        return Ok(());
    };
    out.write("<input type=\"hidden\" name=\"csrfmiddlewaretoken\" value=\"")?;
    out.write(&handlebars::html_escape(token))?;
    out.write("\">")?;
    Ok(())
}

/// Helpers Switchyard registers, with the top-level variables each reads.
const SWITCHYARD_HELPERS: &[(&str, &[&str])] = &[("csrf_input", &["csrf_token"])];

/// The template registry shared by every HTTP worker.
pub struct Templates {
    dir: PathBuf,
    reload: bool,
    loaded: RwLock<Loaded>,
    last_check: Mutex<Instant>,
}

impl Templates {
    /// Loads every template below `dir`; with `reload`, edits are picked up while running.
    pub fn load(dir: impl Into<PathBuf>, reload: bool) -> Result<Self, TemplateError> {
        let dir = dir.into();
        let loaded = scan(&dir)?;
        for (name, message) in &loaded.broken {
            tracing::error!(template = %name, "template failed to parse: {message}");
        }
        Ok(Self {
            dir,
            reload,
            loaded: RwLock::new(loaded),
            last_check: Mutex::new(Instant::now()),
        })
    }

    /// Renders `name` with `context`.
    pub fn render(&self, name: &str, context: &Value) -> Result<String, TemplateError> {
        self.render_owned(name, context.clone())
    }

    /// Renders `name` with `context`, taking it by value (no copy of the data is made).
    pub fn render_owned(&self, name: &str, context: Value) -> Result<String, TemplateError> {
        if self.reload {
            self.reload_if_changed();
        }
        let loaded = self.loaded.read().unwrap_or_else(|e| e.into_inner());
        if let Some(message) = loaded.broken.get(name) {
            return Err(TemplateError::Parse {
                name: name.to_owned(),
                message: message.clone(),
            });
        }
        if !loaded.registry.has_template(name) {
            return Err(TemplateError::Missing {
                name: name.to_owned(),
            });
        }
        loaded
            .registry
            .render_with_context(name, &Context::from(context))
            .map_err(|e| TemplateError::Render {
                name: name.to_owned(),
                message: render_error_message(&e),
            })
    }

    /// What template `name` needs from the context processors (`All` when unknown).
    pub fn needs(&self, name: &str) -> Arc<Needs> {
        if self.reload {
            self.reload_if_changed();
        }
        let loaded = self.loaded.read().unwrap_or_else(|e| e.into_inner());
        loaded
            .needs
            .get(name)
            .cloned()
            .unwrap_or_else(|| Arc::new(Needs::All))
    }

    /// The names of the templates that parsed.
    pub fn names(&self) -> Vec<String> {
        let loaded = self.loaded.read().unwrap_or_else(|e| e.into_inner());
        loaded.registry.get_templates().keys().cloned().collect()
    }

    fn reload_if_changed(&self) {
        {
            let mut last = self.last_check.lock().unwrap_or_else(|e| e.into_inner());
            if last.elapsed() < RELOAD_CHECK_INTERVAL {
                return;
            }
            *last = Instant::now();
        }
        let current = match stamps(&self.dir) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("template reload check failed: {e}");
                return;
            }
        };
        let changed = {
            let loaded = self.loaded.read().unwrap_or_else(|e| e.into_inner());
            loaded.stamps != current
        };
        if !changed {
            return;
        }
        match scan(&self.dir) {
            Ok(fresh) => {
                tracing::info!(dir = %self.dir.display(), "templates reloaded");
                for (name, message) in &fresh.broken {
                    tracing::error!(template = %name, "template failed to parse: {message}");
                }
                *self.loaded.write().unwrap_or_else(|e| e.into_inner()) = fresh;
            }
            Err(e) => tracing::warn!("template reload failed: {e}"),
        }
    }
}

fn render_error_message(e: &handlebars::RenderError) -> String {
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

fn template_files(dir: &Path) -> Result<Vec<PathBuf>, TemplateError> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        let entries = std::fs::read_dir(&d).map_err(|source| TemplateError::Io {
            dir: d.clone(),
            source,
        })?;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|e| e == "hbs") {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

fn stamps(dir: &Path) -> Result<BTreeMap<PathBuf, Option<SystemTime>>, TemplateError> {
    Ok(template_files(dir)?
        .into_iter()
        .map(|p| {
            let t = std::fs::metadata(&p).and_then(|m| m.modified()).ok();
            (p, t)
        })
        .collect())
}

fn template_name(dir: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(dir).unwrap_or(file).with_extension("");
    rel.components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join("/")
}

fn scan(dir: &Path) -> Result<Loaded, TemplateError> {
    let mut registry = Handlebars::new();
    registry.register_escape_fn(handlebars::html_escape);
    registry.register_helper("csrf_input", Box::new(csrf_input_helper));
    let mut broken = BTreeMap::new();
    let mut stamps = BTreeMap::new();
    for (name, source) in BUILTIN_TEMPLATES.iter().chain(crate::dashboard::TEMPLATES) {
        if let Err(e) = registry.register_template_string(name, *source) {
            broken.insert((*name).to_owned(), e.to_string());
        }
    }
    for file in template_files(dir)? {
        let name = template_name(dir, &file);
        stamps.insert(
            file.clone(),
            std::fs::metadata(&file).and_then(|m| m.modified()).ok(),
        );
        let source = match std::fs::read_to_string(&file) {
            Ok(s) => s,
            Err(e) => {
                broken.insert(name, format!("cannot read {}: {e}", file.display()));
                continue;
            }
        };
        if let Err(e) = registry.register_template_string(&name, source) {
            broken.insert(name, e.to_string());
        }
    }
    let helpers: HashMap<String, Vec<String>> = BUILTIN_HELPERS
        .iter()
        .map(|h| (h.to_string(), Vec::new()))
        .chain(
            SWITCHYARD_HELPERS
                .iter()
                .map(|(h, vars)| (h.to_string(), vars.iter().map(|v| v.to_string()).collect())),
        )
        .collect();
    let analyzer = Analyzer::new(registry.get_templates(), &helpers);
    let needs = registry
        .get_templates()
        .keys()
        .map(|name| (name.clone(), Arc::new(analyzer.needs(name))))
        .collect();
    Ok(Loaded {
        registry,
        broken,
        stamps,
        needs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn write(dir: &Path, name: &str, body: &str) {
        let path = dir.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("mkdir");
        }
        std::fs::write(path, body).expect("write template");
    }

    #[test]
    fn renders_with_layout_and_partials() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "layouts/base.hbs", "<main>{{> content}}</main>");
        write(dir.path(), "partials/item.hbs", "<i>{{this}}</i>");
        write(
            dir.path(),
            "page.hbs",
            "{{#> layouts/base}}{{#*inline \"content\"}}{{#each items}}{{> partials/item}}{{/each}}{{/inline}}{{/layouts/base}}",
        );
        let t = Templates::load(dir.path(), false).expect("load");
        let html = t
            .render("page", &json!({"items": ["a", "<b>"]}))
            .expect("render");
        assert_eq!(html, "<main><i>a</i><i>&lt;b&gt;</i></main>");
    }

    #[test]
    fn broken_template_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "ok.hbs", "fine");
        write(dir.path(), "bad.hbs", "{{#if x}}never closed");
        let t = Templates::load(dir.path(), false).expect("load");
        assert_eq!(t.render("ok", &json!({})).expect("ok renders"), "fine");
        assert!(matches!(
            t.render("bad", &json!({})),
            Err(TemplateError::Parse { .. })
        ));
        assert!(matches!(
            t.render("nope", &json!({})),
            Err(TemplateError::Missing { .. })
        ));
    }

    #[test]
    fn debug_reload_picks_up_edits() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "page.hbs", "one");
        let t = Templates::load(dir.path(), true).expect("load");
        assert_eq!(t.render("page", &json!({})).expect("render"), "one");
        std::thread::sleep(RELOAD_CHECK_INTERVAL + Duration::from_millis(50));
        write(dir.path(), "page.hbs", "two, longer");
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let out = t.render("page", &json!({})).expect("render");
            if out == "two, longer" {
                break;
            }
            assert!(Instant::now() < deadline, "edit was not picked up");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
