//! Which top-level variables a template can reference, from its parsed handlebars AST, so that
//! only the context processors providing them run (`context.lazy = true`).
//!
//! The analysis over-approximates and never under-approximates: a path inside `#each`/`#with`
//! counts by its first segment as if it were top-level, `@root.x` and `../x` count as `x`, and
//! partials (with their arguments), partial blocks, inline partials, subexpressions, helper
//! parameters and hash arguments are all followed. Anything it cannot resolve — a dynamic
//! partial `{{> (expr)}}`, an unknown element kind, a decorator other than `inline`, or a
//! helper that does not declare the variables it reads — makes the template need everything.

use std::collections::{BTreeSet, HashMap, HashSet};

use handlebars::template::{
    DecoratorTemplate, HelperTemplate, Parameter, Template, TemplateElement,
};
use handlebars::Path;

/// What a template needs from the context processors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Needs {
    /// These top-level variables (processors providing none of them are skipped).
    Vars(BTreeSet<String>),
    /// Everything: the analysis could not bound what the template reads.
    All,
}

impl Needs {
    /// Whether a processor providing `provides` must run.
    pub fn wants_any(&self, provides: &[&str]) -> bool {
        match self {
            Needs::All => true,
            Needs::Vars(v) => provides.iter().any(|p| v.contains(*p)),
        }
    }
}

/// Helpers handlebars ships, none of which reads a variable by itself.
pub const BUILTIN_HELPERS: &[&str] = &[
    "if", "unless", "each", "with", "lookup", "log", "eq", "ne", "gt", "gte", "lt", "lte", "and",
    "or", "not", "len", "raw",
];

/// The analysis' inputs: every template, and the variables each known helper reads.
pub struct Analyzer<'a> {
    templates: &'a HashMap<String, Template>,
    /// Helper name → the top-level variables it reads.
    helpers: &'a HashMap<String, Vec<String>>,
}

struct Walk<'a> {
    vars: BTreeSet<String>,
    all: bool,
    /// Partials already followed (cycles and repeats).
    visited: HashSet<&'a str>,
}

impl<'a> Analyzer<'a> {
    /// An analyzer over `templates` with `helpers`' declared variables.
    pub fn new(
        templates: &'a HashMap<String, Template>,
        helpers: &'a HashMap<String, Vec<String>>,
    ) -> Self {
        Self { templates, helpers }
    }

    /// What the template `name` (with its layout and partials) needs.
    pub fn needs(&self, name: &str) -> Needs {
        let Some(t) = self.templates.get(name) else {
            return Needs::All;
        };
        let mut w = Walk {
            vars: BTreeSet::new(),
            all: false,
            visited: HashSet::new(),
        };
        if let Some((k, _)) = self.templates.get_key_value(name) {
            w.visited.insert(k.as_str());
        }
        self.template(t, &mut w);
        if w.all {
            Needs::All
        } else {
            Needs::Vars(w.vars)
        }
    }

    fn template(&self, t: &'a Template, w: &mut Walk<'a>) {
        for e in &t.elements {
            if w.all {
                return;
            }
            self.element(e, w);
        }
    }

    fn element(&self, e: &'a TemplateElement, w: &mut Walk<'a>) {
        match e {
            TemplateElement::RawString(_) | TemplateElement::Comment(_) => {}
            TemplateElement::Expression(h)
            | TemplateElement::HtmlExpression(h)
            | TemplateElement::HelperBlock(h) => self.helper(h, w),
            TemplateElement::DecoratorExpression(d) | TemplateElement::DecoratorBlock(d) => {
                self.decorator(d, w)
            }
            TemplateElement::PartialExpression(p) | TemplateElement::PartialBlock(p) => {
                self.partial(p, w)
            }
            #[allow(unreachable_patterns)]
            _ => w.all = true,
        }
    }

    fn helper(&self, h: &'a HelperTemplate, w: &mut Walk<'a>) {
        let simple = h.params.is_empty() && h.hash.is_empty();
        match &h.name {
            Parameter::Name(n) => self.named(n, simple, w),
            Parameter::Path(p) => self.named(path_raw(p), simple, w),
            Parameter::Subexpression(s) => self.element(s.as_element(), w),
            Parameter::Literal(_) => {}
            _ => w.all = true,
        }
        for p in h.params.iter().chain(h.hash.values()) {
            self.param(p, w);
        }
        for t in [&h.template, &h.inverse].into_iter().flatten() {
            self.template(t, w);
        }
    }

    /// A name in helper position: a known helper adds its declared variables; an unknown name
    /// without arguments is a variable (or a block over one); with arguments it is a helper
    /// that declared nothing, so everything is needed.
    fn named(&self, name: &str, simple: bool, w: &mut Walk<'a>) {
        if let Some(vars) = self.helpers.get(name) {
            w.vars.extend(vars.iter().cloned());
        } else if simple {
            if let Some(root) = raw_root(name) {
                w.vars.insert(root);
            }
        } else {
            w.all = true;
        }
    }

    fn param(&self, p: &'a Parameter, w: &mut Walk<'a>) {
        match p {
            Parameter::Name(n) => {
                if let Some(root) = raw_root(n) {
                    w.vars.insert(root);
                }
            }
            Parameter::Path(path) => {
                if let Some(root) = path_root(path) {
                    w.vars.insert(root);
                }
            }
            Parameter::Subexpression(s) => self.element(s.as_element(), w),
            Parameter::Literal(_) => {}
            _ => w.all = true,
        }
    }

    fn decorator(&self, d: &'a DecoratorTemplate, w: &mut Walk<'a>) {
        let is_inline = matches!(&d.name, Parameter::Name(n) if n == "inline")
            || matches!(&d.name, Parameter::Path(p) if path_raw(p) == "inline");
        if !is_inline {
            w.all = true;
            return;
        }
        if let Some(t) = &d.template {
            self.template(t, w);
        }
    }

    fn partial(&self, p: &'a DecoratorTemplate, w: &mut Walk<'a>) {
        let name = match &p.name {
            Parameter::Name(n) => n.as_str(),
            Parameter::Path(path) => path_raw(path),
            // `{{> (expr)}}`: which partial is known only at render time.
            Parameter::Subexpression(_) => {
                w.all = true;
                return;
            }
            Parameter::Literal(v) => match v.as_str() {
                Some(s) => s,
                None => {
                    w.all = true;
                    return;
                }
            },
            _ => {
                w.all = true;
                return;
            }
        };
        for a in p.params.iter().chain(p.hash.values()) {
            self.param(a, w);
        }
        if let Some(t) = &p.template {
            self.template(t, w);
        }
        if name.starts_with('@') {
            // `{{> @partial-block}}`: its content is walked where it is written.
            return;
        }
        if let Some((key, t)) = self.templates.get_key_value(name) {
            if w.visited.insert(key.as_str()) {
                self.template(t, w);
            }
        }
        // A name that is no registered template is an inline partial, walked where defined.
    }
}

fn path_raw(p: &Path) -> &str {
    match p {
        Path::Relative((_, raw)) => raw,
        Path::Local((_, _, raw)) => raw,
    }
}

/// The top-level variable a path reads, if any (`@index`, `this` and the like read none).
fn path_root(p: &Path) -> Option<String> {
    match p {
        Path::Local(_) => None,
        Path::Relative((_, raw)) => raw_root(raw),
    }
}

/// `@root.cart.count` → `cart`, `../../user.name` → `user`, `this.x` → `x`, `this` → none.
fn raw_root(raw: &str) -> Option<String> {
    let mut s = raw.trim();
    loop {
        let before = s;
        for prefix in ["@root.", "@root/", "../", "./", "this.", "this/"] {
            if let Some(rest) = s.strip_prefix(prefix) {
                s = rest;
            }
        }
        if s == before {
            break;
        }
    }
    if s.is_empty() || s == "this" || s == "." || s == "@root" || s.starts_with('@') {
        return None;
    }
    let end = s.find(['.', '/', '[']).unwrap_or(s.len());
    let first = s[..end].trim_matches(['[', ']']);
    (!first.is_empty()).then(|| first.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn needs_of(sources: &[(&str, &str)], name: &str) -> Needs {
        let templates: HashMap<String, Template> = sources
            .iter()
            .map(|(n, s)| {
                (
                    n.to_string(),
                    Template::compile_with_name(s, n.to_string()).expect("compiles"),
                )
            })
            .collect();
        let mut helpers: HashMap<String, Vec<String>> = BUILTIN_HELPERS
            .iter()
            .map(|h| (h.to_string(), vec![]))
            .collect();
        helpers.insert("csrf_input".into(), vec!["csrf_token".into()]);
        Analyzer::new(&templates, &helpers).needs(name)
    }

    fn vars(list: &[&str]) -> Needs {
        Needs::Vars(list.iter().map(|s| s.to_string()).collect())
    }

    fn one(src: &str) -> Needs {
        needs_of(&[("t", src)], "t")
    }

    #[test]
    fn plain_and_nested_paths() {
        assert_eq!(
            one("{{a}} {{{b}}} {{c.d.e}} {{f/g}}"),
            vars(&["a", "b", "c", "f"])
        );
        assert_eq!(one("plain text"), vars(&[]));
    }

    #[test]
    fn each_and_with_count_by_first_segment() {
        assert_eq!(
            one("{{#each items}}{{name}} {{price.amount}} {{@index}} {{this}}{{/each}}"),
            vars(&["items", "name", "price"])
        );
        assert_eq!(
            one("{{#with user}}{{username}}{{/with}}"),
            vars(&["user", "username"])
        );
        assert_eq!(
            one("{{#each items as |item|}}{{item.name}}{{/each}}"),
            vars(&["item", "items"])
        );
    }

    #[test]
    fn root_and_parent_paths_resolve() {
        assert_eq!(
            one("{{#each items}}{{@root.cart_count}} {{../user.name}} {{../../x}}{{/each}}"),
            vars(&["cart_count", "items", "user", "x"])
        );
    }

    #[test]
    fn if_else_chains_and_unless() {
        assert_eq!(
            one(
                "{{#if a}}{{b}}{{else if c}}{{d}}{{else}}{{e}}{{/if}}{{#unless f}}{{g}}{{/unless}}"
            ),
            vars(&["a", "b", "c", "d", "e", "f", "g"])
        );
    }

    #[test]
    fn subexpressions_helper_params_and_hash_arguments() {
        assert_eq!(
            one("{{#if (eq a (lookup b c))}}x{{/if}} {{log d level=e}}"),
            vars(&["a", "b", "c", "d", "e"])
        );
    }

    #[test]
    fn declared_helpers_add_their_variables() {
        assert_eq!(one("<form>{{csrf_input}}</form>"), vars(&["csrf_token"]));
    }

    #[test]
    fn undeclared_helpers_need_everything() {
        assert_eq!(one("{{mystery a}}"), Needs::All);
        assert_eq!(one("{{#mystery a}}x{{/mystery}}"), Needs::All);
    }

    #[test]
    fn partials_with_arguments_are_followed() {
        let srcs = [
            ("page", "{{> part}} {{> other ctx key=val}}"),
            ("part", "{{from_part}}"),
            ("other", "{{from_other}}"),
        ];
        assert_eq!(
            needs_of(&srcs, "page"),
            vars(&["ctx", "from_other", "from_part", "val"])
        );
    }

    #[test]
    fn partial_blocks_and_inline_partials() {
        let srcs = [
            (
                "page",
                "{{#> layout}}{{#*inline \"content\"}}{{inner}}{{/inline}}{{/layout}}",
            ),
            (
                "layout",
                "<h>{{header}}</h>{{> content}}{{> @partial-block}}",
            ),
        ];
        assert_eq!(needs_of(&srcs, "page"), vars(&["header", "inner"]));
    }

    #[test]
    fn recursive_partials_terminate() {
        let srcs = [("a", "{{x}}{{> b}}"), ("b", "{{y}}{{> a}}")];
        assert_eq!(needs_of(&srcs, "a"), vars(&["x", "y"]));
    }

    #[test]
    fn dynamic_partials_need_everything() {
        assert_eq!(one("{{> (whichPartial) }}"), Needs::All);
    }

    #[test]
    fn unknown_decorators_need_everything() {
        assert_eq!(one("{{*mydecorator}}"), Needs::All);
    }

    #[test]
    fn a_substring_is_not_a_reference() {
        // The word appears in the text, not as a variable.
        assert_eq!(one("cart_count is not used here {{a}}"), vars(&["a"]));
    }
}
