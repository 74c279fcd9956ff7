//! The invariants of ARCHITECTURE.md that a reading of the source can check:
//! the module graph (every `crate::`, `super::` and `self::` path of `src/`,
//! in `use` trees, inline and inside macro calls) has no cycle beyond the
//! allow-list below, the code map lists the modules in an order every arrow
//! respects, and the rules about who may touch sled, Redis, protocol JSON,
//! metric names, ... Each file is read with `syn`: its syntax tree for the
//! items (use trees, attributes, functions), its tokens for the rest (so
//! comments, doc comments and string contents are never mistaken for code).
//! `#[cfg(test)]` items are left out before anything is looked at. No server
//! needed: `cargo test --test architecture`.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    fs,
    ops::RangeInclusive,
    path::{Path, PathBuf},
    str::FromStr,
};

use proc_macro2::{Delimiter, TokenStream, TokenTree};
use syn::{spanned::Spanned, visit::Visit, Attribute, ImplItem, Item, UseTree};

/// Cycles in the module graph that are tolerated, as the sets of modules of
/// each strongly connected component, with why they are still there. Every
/// other cycle fails the test, and so does an entry that no longer matches a
/// component exactly. Empty: every arrow points one way (the actors hold
/// `Recipient`s of the messages they send to higher layers).
const ALLOWED_CYCLES: &[(&[&str], &str)] = &[];

/// Modules allowed to break a rule today, by rule, each with why.
/// Shrink it as the exceptions are removed.
const ALLOWED_EXCEPTIONS: &[(&str, &str, &str)] = &[
    (
        "redis",
        "config",
        "validates cluster.redis_url with redis's URL parser (no connection)",
    ),
    (
        "metric-label",
        "metrics",
        "labels of connections_closed_total share the spelling of an error code (rate_limited)",
    ),
];

// ---------------------------------------------------------------- reading the source

/// One token of a file, groups flattened into their delimiters.
#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Punct(char),
    Open(char),
    Close(char),
    /// A literal: its value when it is a string literal, else `None`.
    Lit(Option<String>),
}

/// One source file of `src/`, read for these checks.
struct Source {
    /// Its module path (`counter`, `counter::state`); `""` for `lib.rs`, `"main"` for `main.rs`.
    module: String,
    /// Path relative to the crate root, for messages.
    path: String,
    /// The syntax tree, `#[cfg(test)]` items removed.
    ast: syn::File,
    /// The tokens outside test items and doc comments, each with its line.
    tokens: Vec<(Tok, usize)>,
}

impl Source {
    /// Reads `text` (the file `path` of module `module`).
    fn read(module: &str, path: &str, text: &str) -> Source {
        let mut ast = syn::parse_file(text).unwrap_or_else(|e| panic!("parse {path}: {e}"));
        let tests = test_items(&mut ast);
        let stream = TokenStream::from_str(text).unwrap_or_else(|e| panic!("tokenize {path}: {e}"));
        let mut tokens = Vec::new();
        flatten(stream, &mut tokens);
        tokens.retain(|(_, line)| !tests.iter().any(|r| r.contains(line)));
        Source {
            module: module.to_owned(),
            path: path.to_owned(),
            ast,
            tokens,
        }
    }

    /// True when the token at `i` is followed by `toks`.
    fn followed_by(&self, i: usize, toks: &[Tok]) -> bool {
        self.tokens
            .get(i + 1..i + 1 + toks.len())
            .is_some_and(|next| next.iter().map(|(t, _)| t).eq(toks.iter()))
    }

    /// Lines where identifier `name` is used as a path segment (`name::`).
    fn path_uses(&self, name: &str) -> Vec<usize> {
        let colons = [Tok::Punct(':'), Tok::Punct(':')];
        self.idents()
            .filter(|(i, id, _)| *id == name && self.followed_by(*i, &colons))
            .map(|(_, _, line)| line)
            .collect()
    }

    /// Lines where identifier `name` appears at all.
    fn mentions(&self, name: &str) -> Vec<usize> {
        self.idents()
            .filter(|(_, id, _)| *id == name)
            .map(|(_, _, line)| line)
            .collect()
    }

    /// Lines where macro `name!` is called (by any path).
    fn macro_calls(&self, name: &str) -> Vec<usize> {
        self.idents()
            .filter(|(i, id, _)| *id == name && self.followed_by(*i, &[Tok::Punct('!')]))
            .map(|(_, _, line)| line)
            .collect()
    }

    /// Every identifier: (token index, name, line).
    fn idents(&self) -> impl Iterator<Item = (usize, &str, usize)> {
        self.tokens
            .iter()
            .enumerate()
            .filter_map(|(i, (t, line))| match t {
                Tok::Ident(id) => Some((i, id.as_str(), *line)),
                _ => None,
            })
    }

    /// The string literals: (line, value).
    fn literals(&self) -> impl Iterator<Item = (usize, &str)> {
        self.tokens.iter().filter_map(|(t, line)| match t {
            Tok::Lit(Some(s)) => Some((*line, s.as_str())),
            _ => None,
        })
    }

    /// True when this file belongs to `module` or one of its submodules.
    fn is_in(&self, module: &str) -> bool {
        self.module == module || self.module.starts_with(&format!("{module}::"))
    }

    /// The top-level module this file belongs to.
    fn top(&self) -> &str {
        self.module.split("::").next().unwrap_or("")
    }
}

/// The line (1-based) where a span starts.
fn line(span: proc_macro2::Span) -> usize {
    span.start().line
}

/// Appends the tokens of `stream` to `out`, groups as their delimiters, and
/// leaves out doc comments (`#[doc = "…"]`, `#![doc = "…"]`).
fn flatten(stream: TokenStream, out: &mut Vec<(Tok, usize)>) {
    let trees: Vec<TokenTree> = stream.into_iter().collect();
    let mut i = 0;
    while i < trees.len() {
        if let Some(skip) = doc_attribute(&trees[i..]) {
            i += skip;
            continue;
        }
        match &trees[i] {
            TokenTree::Ident(id) => out.push((Tok::Ident(id.to_string()), line(id.span()))),
            TokenTree::Punct(p) => out.push((Tok::Punct(p.as_char()), line(p.span()))),
            TokenTree::Literal(lit) => {
                let value = syn::parse_str::<syn::LitStr>(&lit.to_string())
                    .ok()
                    .map(|s| s.value());
                out.push((Tok::Lit(value), line(lit.span())));
            }
            TokenTree::Group(g) => {
                let (open, close) = match g.delimiter() {
                    Delimiter::Parenthesis => ('(', ')'),
                    Delimiter::Brace => ('{', '}'),
                    Delimiter::Bracket => ('[', ']'),
                    Delimiter::None => (' ', ' '),
                };
                out.push((Tok::Open(open), line(g.span_open())));
                flatten(g.stream(), out);
                out.push((Tok::Close(close), line(g.span_close())));
            }
        }
        i += 1;
    }
}

/// How many trees a doc attribute at the start of `trees` takes, if it is one.
fn doc_attribute(trees: &[TokenTree]) -> Option<usize> {
    let TokenTree::Punct(pound) = trees.first()? else {
        return None;
    };
    if pound.as_char() != '#' {
        return None;
    }
    let bang = matches!(trees.get(1)?, TokenTree::Punct(p) if p.as_char() == '!');
    let at = 1 + usize::from(bang);
    let TokenTree::Group(g) = trees.get(at)? else {
        return None;
    };
    let first = g.stream().into_iter().next();
    let is_doc = g.delimiter() == Delimiter::Bracket
        && matches!(first, Some(TokenTree::Ident(id)) if id == "doc");
    is_doc.then_some(at + 1)
}

/// `#[cfg(test)]` among `attrs`.
fn is_test(attrs: &[Attribute]) -> bool {
    attrs.iter().any(|a| {
        a.path().is_ident("cfg")
            && a.meta
                .require_list()
                .is_ok_and(|l| l.tokens.to_string() == "test")
    })
}

/// The attributes of an item.
fn item_attrs(item: &Item) -> &[Attribute] {
    match item {
        Item::Const(i) => &i.attrs,
        Item::Enum(i) => &i.attrs,
        Item::ExternCrate(i) => &i.attrs,
        Item::Fn(i) => &i.attrs,
        Item::ForeignMod(i) => &i.attrs,
        Item::Impl(i) => &i.attrs,
        Item::Macro(i) => &i.attrs,
        Item::Mod(i) => &i.attrs,
        Item::Static(i) => &i.attrs,
        Item::Struct(i) => &i.attrs,
        Item::Trait(i) => &i.attrs,
        Item::TraitAlias(i) => &i.attrs,
        Item::Type(i) => &i.attrs,
        Item::Union(i) => &i.attrs,
        Item::Use(i) => &i.attrs,
        _ => &[],
    }
}

/// The attributes of an item of an `impl`.
fn impl_item_attrs(item: &ImplItem) -> &[Attribute] {
    match item {
        ImplItem::Const(i) => &i.attrs,
        ImplItem::Fn(i) => &i.attrs,
        ImplItem::Type(i) => &i.attrs,
        ImplItem::Macro(i) => &i.attrs,
        _ => &[],
    }
}

/// Removes the `#[cfg(test)]` items (at any depth: modules, impls,
/// function bodies) from `ast`; returns the lines they took.
fn test_items(ast: &mut syn::File) -> Vec<RangeInclusive<usize>> {
    struct Strip(Vec<RangeInclusive<usize>>);
    impl Strip {
        fn lines(&mut self, span: proc_macro2::Span) {
            self.0.push(span.start().line..=span.end().line);
        }
        fn items(&mut self, items: &mut Vec<Item>) {
            for item in items.iter().filter(|i| is_test(item_attrs(i))) {
                self.lines(item.span());
            }
            items.retain(|i| !is_test(item_attrs(i)));
        }
    }
    impl syn::visit_mut::VisitMut for Strip {
        fn visit_file_mut(&mut self, f: &mut syn::File) {
            self.items(&mut f.items);
            syn::visit_mut::visit_file_mut(self, f);
        }
        fn visit_item_mod_mut(&mut self, m: &mut syn::ItemMod) {
            if let Some((_, items)) = &mut m.content {
                self.items(items);
            }
            syn::visit_mut::visit_item_mod_mut(self, m);
        }
        fn visit_item_impl_mut(&mut self, i: &mut syn::ItemImpl) {
            for item in i.items.iter().filter(|i| is_test(impl_item_attrs(i))) {
                self.lines(item.span());
            }
            i.items.retain(|i| !is_test(impl_item_attrs(i)));
            syn::visit_mut::visit_item_impl_mut(self, i);
        }
        fn visit_block_mut(&mut self, b: &mut syn::Block) {
            let test = |s: &syn::Stmt| matches!(s, syn::Stmt::Item(i) if is_test(item_attrs(i)));
            for s in b.stmts.iter().filter(|s| test(s)) {
                self.lines(s.span());
            }
            b.stmts.retain(|s| !test(s));
            syn::visit_mut::visit_block_mut(self, b);
        }
    }
    let mut strip = Strip(Vec::new());
    syn::visit_mut::VisitMut::visit_file_mut(&mut strip, ast);
    strip.0
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every `.rs` file under `src/`, sorted.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// `src/a/b.rs` → `a::b`, `src/a/mod.rs` → `a`, `src/lib.rs` → ``.
fn module_of(rel: &Path) -> String {
    let mut parts: Vec<String> = rel
        .iter()
        .map(|s| s.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().unwrap_or_default();
    let stem = last.trim_end_matches(".rs").to_owned();
    if !(parts.is_empty() && stem == "lib") && stem != "mod" {
        parts.push(stem);
    }
    parts.join("::")
}

fn sources() -> Vec<Source> {
    let src = root().join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files
        .iter()
        .map(|p| {
            let text =
                fs::read_to_string(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
            let rel = p.strip_prefix(&src).expect("under src/");
            Source::read(&module_of(rel), &format!("src/{}", rel.display()), &text)
        })
        .collect()
}

/// Collects every identifier a syntax node names.
#[derive(Default)]
struct Idents(Vec<String>);

impl<'ast> Visit<'ast> for Idents {
    fn visit_ident(&mut self, i: &'ast proc_macro2::Ident) {
        self.0.push(i.to_string());
    }
}

/// Collects every string literal a syntax node holds.
#[derive(Default)]
struct Strings(Vec<String>);

impl<'ast> Visit<'ast> for Strings {
    fn visit_lit_str(&mut self, s: &'ast syn::LitStr) {
        self.0.push(s.value());
    }
}

// ---------------------------------------------------------------- the module graph

/// A dependency of one module on another, where it was first seen.
type Edges = BTreeMap<(String, String), String>;

/// The paths a `use` tree names, each as its segments (`crate::a::{b, c::D}`
/// gives `crate::a::b` and `crate::a::c::D`).
fn use_paths(tree: &UseTree, prefix: &[String], out: &mut Vec<Vec<String>>) {
    let with = |name: &proc_macro2::Ident| {
        let mut p = prefix.to_vec();
        p.push(name.to_string());
        p
    };
    match tree {
        UseTree::Path(p) => use_paths(&p.tree, &with(&p.ident), out),
        UseTree::Name(n) => out.push(with(&n.ident)),
        UseTree::Rename(r) => out.push(with(&r.ident)),
        UseTree::Glob(_) => out.push(prefix.to_vec()),
        UseTree::Group(g) => {
            for t in &g.items {
                use_paths(t, prefix, out);
            }
        }
    }
}

/// Every path of every `use` declaration of a file (at any depth), with its line.
fn use_declarations(ast: &syn::File) -> Vec<(Vec<String>, usize)> {
    #[derive(Default)]
    struct Uses(Vec<(Vec<String>, usize)>);
    impl<'ast> Visit<'ast> for Uses {
        fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
            let mut paths = Vec::new();
            use_paths(&u.tree, &[], &mut paths);
            let at = line(u.use_token.span);
            self.0.extend(paths.into_iter().map(|p| (p, at)));
        }
    }
    let mut uses = Uses::default();
    uses.visit_file(ast);
    uses.0
}

/// Paths written inline, in code and inside macro calls: `crate::a::b`,
/// `super::x`, `self::y`.
fn inline_paths(s: &Source) -> Vec<(Vec<String>, usize)> {
    let mut out = Vec::new();
    let colons = [Tok::Punct(':'), Tok::Punct(':')];
    for (i, id, at) in s.idents() {
        if !matches!(id, "crate" | "super" | "self") {
            continue;
        }
        // Part of a longer path (`a::self`).
        if i >= 2 && s.tokens[i - 2..i].iter().map(|(t, _)| t).eq(colons.iter()) {
            continue;
        }
        let mut path = vec![id.to_owned()];
        let mut k = i;
        while s.followed_by(k, &colons) {
            match s.tokens.get(k + 3) {
                Some((Tok::Ident(next), _)) => path.push(next.clone()),
                _ => break,
            }
            k += 3;
        }
        out.push((path, at));
    }
    out
}

/// The absolute module path (`crate` dropped) a path starting with
/// `crate`, `super` or `self` names, seen from `module`.
fn absolute(module: &str, path: &[String]) -> Option<Vec<String>> {
    let mut base: Vec<String> = module
        .split("::")
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    let mut rest = path;
    match rest.first().map(String::as_str) {
        Some("crate") => {
            base.clear();
            rest = &rest[1..];
        }
        Some("super") => {
            while rest.first().map(String::as_str) == Some("super") {
                base.pop();
                rest = &rest[1..];
            }
        }
        Some("self") => rest = &rest[1..],
        _ => return None,
    }
    base.extend(rest.iter().cloned());
    Some(base)
}

/// The module a path resolves to: its longest prefix that is a module, or
/// the module a crate-root re-export comes from.
fn resolve(
    path: &[String],
    modules: &BTreeSet<String>,
    reexports: &BTreeMap<String, String>,
) -> Option<String> {
    for n in (1..=path.len()).rev() {
        let candidate = path[..n].join("::");
        if modules.contains(&candidate) {
            return Some(candidate);
        }
    }
    path.first().and_then(|name| reexports.get(name).cloned())
}

/// True when one module is the other or contains it.
fn related(a: &str, b: &str) -> bool {
    a == b || a.starts_with(&format!("{b}::")) || b.starts_with(&format!("{a}::"))
}

/// The module graph of the library: who uses whom, with the first place seen.
fn module_graph(srcs: &[Source]) -> Edges {
    let modules: BTreeSet<String> = srcs
        .iter()
        .filter(|s| !s.module.is_empty() && s.module != "main")
        .map(|s| s.module.clone())
        .collect();
    // `pub use a::B;` in lib.rs: `crate::B` means module `a`.
    let mut reexports = BTreeMap::new();
    if let Some(lib) = srcs.iter().find(|s| s.module.is_empty()) {
        for (p, _) in use_declarations(&lib.ast) {
            if let (Some(first), Some(last)) = (p.first(), p.last()) {
                if modules.contains(first) {
                    reexports.insert(last.clone(), first.clone());
                }
            }
        }
    }
    let mut edges = Edges::new();
    for s in srcs {
        if s.module.is_empty() || s.module == "main" {
            continue;
        }
        let mut paths = use_declarations(&s.ast);
        paths.extend(inline_paths(s));
        for (path, line) in paths {
            let Some(abs) = absolute(&s.module, &path) else {
                continue;
            };
            let Some(to) = resolve(&abs, &modules, &reexports) else {
                continue;
            };
            if related(&s.module, &to) {
                continue;
            }
            edges
                .entry((s.module.clone(), to))
                .or_insert_with(|| format!("{}:{line}", s.path));
        }
    }
    edges
}

/// The strongly connected components of more than one module (Tarjan).
fn cycles(edges: &Edges) -> Vec<BTreeSet<String>> {
    let mut next: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (from, to) in edges.keys() {
        next.entry(from).or_default().push(to);
        next.entry(to).or_default();
    }
    struct Tarjan<'a> {
        next: &'a BTreeMap<&'a str, Vec<&'a str>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        out: Vec<BTreeSet<String>>,
    }
    impl<'a> Tarjan<'a> {
        fn visit(&mut self, v: &'a str) {
            let i = self.index.len();
            self.index.insert(v, i);
            self.low.insert(v, i);
            self.stack.push(v);
            self.on_stack.insert(v);
            for &w in &self.next[v] {
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let lw = self.low[w];
                    let lv = self.low.get_mut(v).expect("visited");
                    *lv = (*lv).min(lw);
                } else if self.on_stack.contains(w) {
                    let iw = self.index[w];
                    let lv = self.low.get_mut(v).expect("visited");
                    *lv = (*lv).min(iw);
                }
            }
            if self.low[v] == self.index[v] {
                let mut scc = BTreeSet::new();
                while let Some(w) = self.stack.pop() {
                    self.on_stack.remove(w);
                    scc.insert(w.to_owned());
                    if w == v {
                        break;
                    }
                }
                if scc.len() > 1 {
                    self.out.push(scc);
                }
            }
        }
    }
    let mut t = Tarjan {
        next: &next,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        out: Vec::new(),
    };
    for &v in next.keys() {
        if !t.index.contains_key(v) {
            t.visit(v);
        }
    }
    t.out
}

/// One shortest cycle through `start` inside `scc`, each arrow with where
/// it comes from.
fn describe_cycle(scc: &BTreeSet<String>, start: &str, edges: &Edges) -> String {
    let start = start.to_owned();
    let mut came_from: BTreeMap<String, String> = BTreeMap::new();
    let mut queue = VecDeque::from([start.clone()]);
    let mut found = None;
    'bfs: while let Some(v) = queue.pop_front() {
        for ((from, to), _) in edges.range((v.clone(), String::new())..) {
            if *from != v {
                break;
            }
            if !scc.contains(to) {
                continue;
            }
            if *to == start {
                found = Some(v.clone());
                break 'bfs;
            }
            if !came_from.contains_key(to) {
                came_from.insert(to.clone(), v.clone());
                queue.push_back(to.clone());
            }
        }
    }
    let mut path = vec![start.clone()];
    let mut v = found.expect("a component has a cycle through each of its modules");
    while v != start {
        path.push(v.clone());
        v = came_from[&v].clone();
    }
    path.push(start);
    path.reverse();
    path.windows(2)
        .map(|w| {
            let at = &edges[&(w[0].clone(), w[1].clone())];
            format!("{} -> {} ({at})", w[0], w[1])
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The same graph between top-level modules only.
fn top_level(edges: &Edges) -> Edges {
    let mut out = Edges::new();
    for ((from, to), at) in edges {
        let (f, t) = (top_of(from), top_of(to));
        if f != t {
            out.entry((f.to_owned(), t.to_owned()))
                .or_insert_with(|| at.clone());
        }
    }
    out
}

fn top_of(module: &str) -> &str {
    module.split("::").next().unwrap_or(module)
}

/// Every `use crate::` arrow points one way: the module graph (between
/// modules, and between top-level modules) has no cycle except the
/// allow-listed ones, and every allow-listed cycle still exists as listed.
#[test]
fn module_dependencies_have_no_cycle_beyond_the_allow_list() {
    let srcs = sources();
    let edges = module_graph(&srcs);
    assert!(
        edges.contains_key(&("session".to_owned(), "delivery".to_owned())),
        "the graph reader finds session's use of delivery: {edges:?}"
    );
    let top = top_level(&edges);
    let mut found: Vec<(BTreeSet<String>, String)> = Vec::new();
    for (graph, scc) in cycles(&edges)
        .into_iter()
        .map(|c| (&edges, c))
        .chain(cycles(&top).into_iter().map(|c| (&top, c)))
    {
        if !found.iter().any(|(c, _)| *c == scc) {
            // Through a module no allow-listed cycle has, when there is one:
            // that is where the new arrow is.
            let start = scc
                .iter()
                .find(|m| !ALLOWED_CYCLES.iter().any(|(c, _)| c.contains(&m.as_str())))
                .or_else(|| scc.iter().next())
                .expect("non-empty");
            let how = describe_cycle(&scc, start, graph);
            found.push((scc, how));
        }
    }
    let allowed: Vec<BTreeSet<String>> = ALLOWED_CYCLES
        .iter()
        .map(|(m, _)| m.iter().map(|s| (*s).to_owned()).collect())
        .collect();
    let mut problems = Vec::new();
    for (scc, how) in &found {
        if !allowed.contains(scc) {
            problems.push(format!("module cycle {scc:?}: {how}"));
        }
    }
    for (a, (_, why)) in allowed.iter().zip(ALLOWED_CYCLES) {
        if !found.iter().any(|(c, _)| c == a) {
            problems.push(format!(
                "allow-listed cycle {a:?} ({why}) is gone or changed: update ALLOWED_CYCLES \
                 to the cycles found: {:?}",
                found.iter().map(|(c, _)| c).collect::<Vec<_>>()
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// ARCHITECTURE.md's code map lists every top-level module, in an order
/// that every arrow between them respects (a module uses only modules
/// listed before it, except inside an allow-listed cycle), with a heading
/// for each.
#[test]
fn the_code_map_lists_every_module_in_dependency_order() {
    let doc = fs::read_to_string(root().join("ARCHITECTURE.md")).expect("ARCHITECTURE.md");
    let line = doc
        .lines()
        .skip_while(|l| !l.starts_with("## Code map"))
        .skip_while(|l| !l.contains(" · "))
        .take_while(|l| !l.trim().is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    let order: Vec<String> = line
        .split('·')
        .map(|s| s.trim().trim_matches('`').to_owned())
        .collect();
    let srcs = sources();
    let modules: BTreeSet<String> = srcs
        .iter()
        .filter(|s| !s.module.is_empty() && s.module != "main")
        .map(|s| s.top().to_owned())
        .collect();
    let listed: BTreeSet<String> = order.iter().cloned().collect();
    assert_eq!(
        listed, modules,
        "the module line of ARCHITECTURE.md's code map against src/"
    );
    let mut problems = Vec::new();
    for m in &modules {
        if !doc.contains(&format!("### `{m}`")) {
            problems.push(format!("no \"### `{m}`\" paragraph in the code map"));
        }
    }
    let in_cycle = |a: &str, b: &str| {
        ALLOWED_CYCLES
            .iter()
            .any(|(c, _)| c.contains(&a) && c.contains(&b))
    };
    let pos = |m: &str| order.iter().position(|o| o == m).expect("listed");
    for ((from, to), at) in top_level(&module_graph(&srcs)) {
        if pos(&to) > pos(&from) && !in_cycle(&from, &to) {
            problems.push(format!(
                "{from} uses {to} ({at}), listed after it in the code map"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// ---------------------------------------------------------------- rules

/// The modules a rule allows besides its owner.
fn excepted(rule: &str) -> Vec<&'static str> {
    ALLOWED_EXCEPTIONS
        .iter()
        .filter(|(r, _, _)| *r == rule)
        .map(|(_, m, _)| *m)
        .collect()
}

/// Fails with every file and line where `found` finds something outside
/// the modules `owners` (and the rule's exceptions).
fn only_in(rule: &str, owners: &[&str], found: impl Fn(&Source) -> Vec<usize>) {
    let allowed: Vec<&str> = owners.iter().copied().chain(excepted(rule)).collect();
    let srcs = sources();
    let mut problems = Vec::new();
    let mut seen_in_owner = false;
    for s in &srcs {
        let lines = found(s);
        if allowed.iter().any(|m| s.is_in(m)) {
            seen_in_owner |= !lines.is_empty();
            continue;
        }
        for line in lines {
            problems.push(format!("{}:{line}", s.path));
        }
    }
    assert!(
        seen_in_owner,
        "rule {rule}: the check finds nothing in {owners:?} either"
    );
    assert!(
        problems.is_empty(),
        "rule {rule} (only {allowed:?}) broken at:\n{}",
        problems.join("\n")
    );
}

/// Only `storage` names sled.
#[test]
fn only_storage_touches_sled() {
    only_in("sled", &["storage"], |s| s.path_uses("sled"));
}

/// Only `cluster` names the redis crate (and `config`, to parse the URL).
#[test]
fn only_cluster_talks_to_redis() {
    only_in("redis", &["cluster"], |s| s.path_uses("redis"));
}

/// No string outside `metrics` spells a metric name.
#[test]
fn metric_names_are_spelled_only_in_metrics() {
    only_in("metric-name", &["metrics"], |s| {
        s.literals()
            .filter(|(_, l)| l.starts_with("link_counter_"))
            .map(|(line, _)| line)
            .collect()
    });
}

/// The error codes, as `protocol::ErrorCode::as_str` spells them.
fn error_codes(srcs: &[Source]) -> Vec<String> {
    let protocol = srcs
        .iter()
        .find(|s| s.module == "protocol")
        .expect("src/protocol.rs");
    let mut codes = Strings::default();
    for item in &protocol.ast.items {
        let Item::Impl(imp) = item else { continue };
        let mut self_ty = Idents::default();
        self_ty.visit_type(&imp.self_ty);
        if imp.trait_.is_some() || self_ty.0 != ["ErrorCode"] {
            continue;
        }
        for f in &imp.items {
            if let ImplItem::Fn(f) = f {
                if f.sig.ident == "as_str" {
                    codes.visit_block(&f.block);
                }
            }
        }
    }
    assert!(codes.0.len() >= 6, "ErrorCode::as_str spells {:?}", codes.0);
    codes.0
}

/// Protocol JSON and API bodies are built only in `protocol`: no `"type"`
/// key and no `json!` elsewhere (other modules serialize its typed structs).
#[test]
fn protocol_json_is_built_only_in_protocol() {
    only_in("protocol-json", &["protocol"], |s| {
        s.literals()
            .filter(|(_, l)| *l == "type" || l.contains("\"type\""))
            .map(|(line, _)| line)
            .chain(s.macro_calls("json"))
            .collect()
    });
    let probe = Source::read(
        "http",
        "probe.rs",
        "fn f() -> String {\n    serde_json::json!({\"a\": 1}).to_string()\n}\n\
         fn g(json: u8) -> u8 { json }\n",
    );
    assert_eq!(
        probe.macro_calls("json"),
        [2],
        "the check sees json! calls only"
    );
}

/// Error codes are spelled only in `protocol`.
#[test]
fn error_codes_are_spelled_only_in_protocol() {
    let codes = error_codes(&sources());
    only_in("error-code", &["protocol"], |s| {
        s.literals()
            .filter(|(_, l)| codes.iter().any(|c| c == l))
            .filter(|_| !excepted("metric-label").iter().any(|m| s.is_in(m)))
            .map(|(line, _)| line)
            .collect()
    });
}

/// Only rooms report counts and only the counter takes them: no other
/// module (HTTP routes, admin, sessions) names `RoomCount` or `RoomState`.
#[test]
fn only_rooms_report_counts() {
    only_in("count-writers", &["room", "counter"], |s| {
        let mut lines = s.mentions("RoomCount");
        lines.extend(s.mentions("RoomState"));
        lines
    });
}

/// `anyhow` is only in start-up wiring: `server`, `main`, and the start
/// functions `server` calls (`admin::start`, `cluster::Cluster::start`).
#[test]
fn anyhow_is_only_in_start_up_wiring() {
    let srcs = sources();
    let mut problems = Vec::new();
    let mut seen = 0;
    for s in &srcs {
        let uses = s.mentions("anyhow");
        seen += uses.len();
        if matches!(s.module.as_str(), "server" | "main") {
            continue;
        }
        let starts: Vec<RangeInclusive<usize>> = if matches!(s.module.as_str(), "admin" | "cluster")
        {
            function_lengths(&s.ast)
                .into_iter()
                .filter(|(name, _, _)| name == "start")
                .map(|(_, first, lines)| first..=first + lines - 1)
                .collect()
        } else {
            Vec::new()
        };
        for line in uses {
            if !starts.iter().any(|r| r.contains(&line)) {
                problems.push(format!("{}:{line}", s.path));
            }
        }
    }
    assert!(seen > 0, "the check finds anyhow in server");
    assert!(
        problems.is_empty(),
        "anyhow outside start-up wiring:\n{}",
        problems.join("\n")
    );
}

/// The counter (every file of `src/counter/`) has no `unwrap`, `expect`,
/// `panic!`, `unreachable!`, `todo!`, `unimplemented!` or `assert!` outside
/// its tests.
#[test]
fn the_counter_never_panics() {
    let srcs = sources();
    let counter: Vec<&Source> = srcs.iter().filter(|s| s.is_in("counter")).collect();
    let mut files = Vec::new();
    rust_files(&root().join("src/counter"), &mut files);
    assert!(
        files.len() >= 2 && counter.len() == files.len(),
        "every file of src/counter/ is scanned: {} of {files:?}",
        counter.len()
    );
    let mut problems = Vec::new();
    for s in counter {
        for (i, id, line) in s.idents() {
            let call = matches!(id, "unwrap" | "expect") && s.followed_by(i, &[Tok::Open('(')]);
            let mac = matches!(
                id,
                "panic"
                    | "unreachable"
                    | "todo"
                    | "unimplemented"
                    | "assert"
                    | "assert_eq"
                    | "assert_ne"
            ) && s.followed_by(i, &[Tok::Punct('!')]);
            if call || mac {
                problems.push(format!("{}:{line} {id}", s.path));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The counter's logic (`counter::state`) is a plain state machine: it
/// names no actix, storage or clock; the actor around it does.
#[test]
fn the_counter_state_has_no_actor_or_io() {
    let srcs = sources();
    let state = srcs
        .iter()
        .find(|s| s.module == "counter::state")
        .expect("src/counter/state.rs");
    let mut problems = Vec::new();
    for name in ["actix", "tokio", "Storage", "now_ms"] {
        problems.extend(
            state
                .mentions(name)
                .into_iter()
                .map(|l| format!("{name} at line {l}")),
        );
    }
    let now = [Tok::Punct(':'), Tok::Punct(':'), Tok::Ident("now".into())];
    for (i, id, line) in state.idents() {
        if id == "Instant" && state.followed_by(i, &now) {
            problems.push(format!(
                "Instant::now at line {line}: the time comes in with each input"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Sessions and event streams do not watch the server's shutdown signal:
/// their mailbox tells them.
#[test]
fn sessions_never_read_the_shutdown_signal() {
    let srcs = sources();
    for (module, mailbox) in [("session", "Mailbox"), ("events", "mailbox")] {
        let s = srcs
            .iter()
            .find(|s| s.module == module)
            .unwrap_or_else(|| panic!("src/{module}.rs"));
        assert_eq!(s.mentions("watch"), Vec::<usize>::new(), "{module}");
        assert!(!s.mentions(mailbox).is_empty(), "{module}");
    }
}

/// The text of the lists of the attributes named `name` (`derive`, `serde`, `cfg`).
fn attribute_lists(attrs: &[Attribute], name: &str) -> String {
    attrs
        .iter()
        .filter(|a| a.path().is_ident(name))
        .filter_map(|a| a.meta.require_list().ok())
        .map(|l| l.tokens.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Every settings struct refuses unknown keys (`deny_unknown_fields`, or
/// `transparent` for a newtype).
#[test]
fn every_settings_struct_refuses_unknown_keys() {
    let srcs = sources();
    let config = srcs
        .iter()
        .find(|s| s.module == "config")
        .expect("src/config.rs");
    let mut structs = 0;
    let mut problems = Vec::new();
    for item in &config.ast.items {
        let Item::Struct(st) = item else { continue };
        if !attribute_lists(&st.attrs, "derive").contains("Deserialize") {
            continue;
        }
        structs += 1;
        let serde = attribute_lists(&st.attrs, "serde");
        if !serde.contains("deny_unknown_fields") && !serde.contains("transparent") {
            problems.push(format!(
                "src/config.rs:{} {}",
                line(st.ident.span()),
                st.ident
            ));
        }
    }
    assert!(structs >= 10, "found {structs} settings structs");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// No module reads files except `config` (the config file) and `storage`
/// (the database): assets are compiled in.
#[test]
fn assets_are_compiled_in() {
    only_in("fs", &["config", "storage"], |s| {
        let mut lines = s.path_uses("fs");
        lines.extend(s.mentions("File"));
        lines
    });
    let srcs = sources();
    let web = srcs.iter().find(|s| s.module == "web").expect("src/web.rs");
    assert!(!web.macro_calls("include_str").is_empty());
}

/// Items only tests use: messages (with their handlers) and functions.
const TEST_HOOKS: &[&str] = &[
    "InjectFault",
    "SweepNow",
    "Tracked",
    "RoomOf",
    "idle_pages",
    "for_page",
    "open_sled",
    "SledOnly",
    "history_records",
    "count_records",
];

/// Finds the definitions of test hooks and the `impl`s naming one, and
/// whether each carries `#[cfg(feature = "test-hooks")]`.
#[derive(Default)]
struct Hooks {
    /// (line, name, gated)
    found: Vec<(usize, String, bool)>,
}

impl Hooks {
    fn check(&mut self, attrs: &[Attribute], ident: &proc_macro2::Ident) {
        if TEST_HOOKS.iter().any(|h| ident == h) {
            let gated = attribute_lists(attrs, "cfg").contains("feature = \"test-hooks\"");
            self.found
                .push((line(ident.span()), ident.to_string(), gated));
        }
    }
}

impl<'ast> Visit<'ast> for Hooks {
    fn visit_item_struct(&mut self, i: &'ast syn::ItemStruct) {
        self.check(&i.attrs, &i.ident);
    }
    fn visit_item_enum(&mut self, i: &'ast syn::ItemEnum) {
        self.check(&i.attrs, &i.ident);
    }
    fn visit_item_fn(&mut self, i: &'ast syn::ItemFn) {
        self.check(&i.attrs, &i.sig.ident);
        syn::visit::visit_item_fn(self, i);
    }
    fn visit_impl_item_fn(&mut self, i: &'ast syn::ImplItemFn) {
        self.check(&i.attrs, &i.sig.ident);
        syn::visit::visit_impl_item_fn(self, i);
    }
    fn visit_trait_item_fn(&mut self, i: &'ast syn::TraitItemFn) {
        self.check(&i.attrs, &i.sig.ident);
    }
    fn visit_item_impl(&mut self, i: &'ast syn::ItemImpl) {
        let mut header = Idents::default();
        header.visit_type(&i.self_ty);
        if let Some((_, path, _)) = &i.trait_ {
            header.visit_path(path);
        }
        if let Some(hook) = header.0.iter().find(|n| TEST_HOOKS.contains(&n.as_str())) {
            let gated = attribute_lists(&i.attrs, "cfg").contains("feature = \"test-hooks\"");
            self.found
                .push((line(i.impl_token.span), format!("impl {hook}"), gated));
        }
        syn::visit::visit_item_impl(self, i);
    }
}

/// Test hooks are compiled only with the `test-hooks` feature (which only
/// the crate's dev-dependency on itself turns on): each hook's definition
/// and each `impl` naming it carries `#[cfg(feature = "test-hooks")]`.
#[test]
fn test_hooks_are_compiled_only_with_their_feature() {
    let manifest = fs::read_to_string(root().join("Cargo.toml")).expect("Cargo.toml");
    assert!(
        manifest.contains("features = [\"test-hooks\"]"),
        "the dev-dependency that enables the hooks for tests"
    );
    let exempt = excepted("test-hook");
    let mut problems = Vec::new();
    let mut gated = 0;
    for s in &sources() {
        let mut hooks = Hooks::default();
        hooks.visit_file(&s.ast);
        for (line, name, is_gated) in hooks.found {
            if is_gated {
                gated += 1;
            } else if !exempt.iter().any(|m| s.is_in(m)) {
                problems.push(format!("{}:{line} {name}", s.path));
            }
        }
    }
    assert!(gated >= 3, "found {gated} gated hooks");
    assert!(
        problems.is_empty(),
        "test hooks without #[cfg(feature = \"test-hooks\")]:\n{}",
        problems.join("\n")
    );
}

/// The library forbids `unsafe`; the binary's one `unsafe` block is the
/// `malloc_trim` call.
#[test]
fn only_the_binary_has_unsafe() {
    let srcs = sources();
    let lib = srcs
        .iter()
        .find(|s| s.module.is_empty())
        .expect("src/lib.rs");
    assert!(
        attribute_lists(&lib.ast.attrs, "forbid").contains("unsafe_code"),
        "#![forbid(unsafe_code)] in src/lib.rs"
    );
    let mut found = Vec::new();
    for s in &srcs {
        for line in s.mentions("unsafe") {
            found.push(format!("{}:{line}", s.path));
        }
    }
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].starts_with("src/main.rs:"), "{found:?}");
}

/// The source reader itself: comments, doc comments, strings and test items
/// are left out, macro calls are seen, `use` trees expand, relative paths
/// resolve.
#[test]
fn the_reader_sees_code_only() {
    let s = Source::read(
        "a",
        "probe.rs",
        "/// crate::doc\nfn f() { let a = \"crate::x\"; } // crate::y\n/* crate::z */ \
         fn g() { let c = '\"'; let q = r#\"q\"#; tracing::info!(\"{}\", crate::m::n()); }\n\
         #[cfg(test)]\nmod tests { use crate::t; fn h() { crate::u::v(); } }\nfn k() {}\n",
    );
    assert_eq!(
        s.literals().map(|(_, l)| l).collect::<Vec<_>>(),
        ["crate::x", "q", "{}"]
    );
    let inline: Vec<String> = inline_paths(&s)
        .into_iter()
        .map(|(p, _)| p.join("::"))
        .collect();
    assert_eq!(
        inline,
        ["crate::m::n"],
        "no doc, comment, string or test path"
    );
    assert!(s.mentions("k") == [6] && s.mentions("h").is_empty());
    assert!(
        use_declarations(&s.ast).is_empty(),
        "the test module's use is gone"
    );
    let file = syn::parse_file("use crate::{a::B, c::{d::E, f as g}, h::*};").expect("parse");
    let joined: Vec<String> = use_declarations(&file)
        .iter()
        .map(|(p, _)| p.join("::"))
        .collect();
    assert_eq!(
        joined,
        ["crate::a::B", "crate::c::d::E", "crate::c::f", "crate::h"]
    );
    assert_eq!(
        absolute("rooms::room", &["super".into(), "shard".into(), "X".into()]),
        Some(vec!["rooms".into(), "shard".into(), "X".into()])
    );
    let edges = Edges::from([
        (("a".into(), "b".into()), "x:1".into()),
        (("b".into(), "c".into()), "x:2".into()),
        (("c".into(), "a".into()), "x:3".into()),
        (("c".into(), "d".into()), "x:4".into()),
    ]);
    let found = cycles(&edges);
    assert_eq!(found.len(), 1);
    assert_eq!(
        describe_cycle(&found[0], "a", &edges),
        "a -> b (x:1), b -> c (x:2), c -> a (x:3)"
    );
}

// ---------------------------------------------------------------- function length

/// The most lines a function on the connection path may take, from `fn` to
/// its closing brace.
const MAX_FN_LINES: usize = 60;

/// The files of the connection path, held to [`MAX_FN_LINES`].
const SHORT_FN_FILES: &[&str] = &[
    "src/session.rs",
    "src/events.rs",
    "src/http.rs",
    "src/server.rs",
    "src/room.rs",
    "src/shard.rs",
    "src/delivery.rs",
];

/// Functions of those files allowed to be longer today: (file, function,
/// why). An entry that no longer names a long function fails the test.
const LONG_FNS_ALLOWED: &[(&str, &str, &str)] = &[];

/// Files off the connection path held to a looser ceiling: (file, most lines).
const CEILINGS: &[(&str, usize)] = &[
    ("src/config.rs", 80),
    ("src/protocol.rs", 80),
    ("src/main.rs", 80),
];

/// Every function with a body in a file (free functions, methods, trait
/// defaults, functions inside functions), as (name, line of its `fn`, lines
/// from `fn` to its closing brace).
fn function_lengths(ast: &syn::File) -> Vec<(String, usize, usize)> {
    #[derive(Default)]
    struct Fns(Vec<(String, usize, usize)>);
    impl Fns {
        fn add(&mut self, sig: &syn::Signature, block: &syn::Block) {
            let first = line(sig.fn_token.span);
            let last = line(block.brace_token.span.close());
            self.0
                .push((sig.ident.to_string(), first, last - first + 1));
        }
    }
    impl<'ast> Visit<'ast> for Fns {
        fn visit_item_fn(&mut self, f: &'ast syn::ItemFn) {
            self.add(&f.sig, &f.block);
            syn::visit::visit_item_fn(self, f);
        }
        fn visit_impl_item_fn(&mut self, f: &'ast syn::ImplItemFn) {
            self.add(&f.sig, &f.block);
            syn::visit::visit_impl_item_fn(self, f);
        }
        fn visit_trait_item_fn(&mut self, f: &'ast syn::TraitItemFn) {
            if let Some(block) = &f.default {
                self.add(&f.sig, block);
            }
            syn::visit::visit_trait_item_fn(self, f);
        }
    }
    let mut fns = Fns::default();
    fns.visit_file(ast);
    fns.0
}

/// No function in the files of the connection path is longer than
/// [`MAX_FN_LINES`] lines (test modules left out), beyond the allow-list,
/// nor one in [`CEILINGS`] over its ceiling: each step is a named function
/// short enough to read at once.
#[test]
fn connection_path_functions_are_short() {
    let probe = syn::parse_file(concat!(
        "fn a() {\n    let s = \"}\";\n}\n",
        "pub(crate) async fn b(x: [u8; 2]) -> impl Fn(u8) -> u8 { move |y| x[0] + y }\n",
        "trait T { fn c(&self); }\nfn d<const N: usize>()\nwhere\n    [u8; N]: Sized,\n{\n}\n",
        "const F: fn(u8) -> u8 = g;\n",
    ))
    .expect("parse");
    assert_eq!(
        function_lengths(&probe),
        [("a".into(), 1, 3), ("b".into(), 4, 1), ("d".into(), 6, 5)]
    );
    let srcs = sources();
    let mut long = Vec::new();
    let mut seen_allowed = BTreeSet::new();
    for &file in SHORT_FN_FILES {
        let s = srcs
            .iter()
            .find(|s| s.path == file)
            .unwrap_or_else(|| panic!("{file} is gone: update SHORT_FN_FILES"));
        for (name, line, lines) in function_lengths(&s.ast) {
            if lines <= MAX_FN_LINES {
                continue;
            }
            if LONG_FNS_ALLOWED
                .iter()
                .any(|&(f, n, _)| f == file && n == name)
            {
                seen_allowed.insert((file, name));
            } else {
                long.push(format!("{file}:{line} `{name}` is {lines} lines"));
            }
        }
    }
    for &(file, most) in CEILINGS {
        let s = srcs
            .iter()
            .find(|s| s.path == file)
            .unwrap_or_else(|| panic!("{file} is gone: update CEILINGS"));
        for (name, line, lines) in function_lengths(&s.ast) {
            if lines > most {
                long.push(format!(
                    "{file}:{line} `{name}` is {lines} lines (at most {most})"
                ));
            }
        }
    }
    for &(file, name, _) in LONG_FNS_ALLOWED {
        if !seen_allowed.contains(&(file, name.to_owned())) {
            long.push(format!(
                "{file} `{name}` is allow-listed but no longer over {MAX_FN_LINES} lines: remove it"
            ));
        }
    }
    assert!(
        long.is_empty(),
        "split these into named steps of at most {MAX_FN_LINES} lines:\n{}",
        long.join("\n")
    );
}

/// Metric label values are spelled only in `metrics`: elsewhere a metrics
/// helper is called with a typed label (`RoomEviction`, `Evicted`,
/// `RedisOp`, `CloseKind`, `Refused`), never a string.
#[test]
fn metric_label_values_are_spelled_only_in_metrics() {
    only_in("metric-label-value", &["metrics"], |s| {
        let mut lines = Vec::new();
        // A helper called with a string: `metrics::x("…"` or `m::x("…"`.
        for (i, id, line) in s.idents() {
            let called_with_text = matches!(id, "metrics" | "m")
                && matches!(
                    s.tokens.get(i + 1..i + 6),
                    Some([
                        (Tok::Punct(':'), _),
                        (Tok::Punct(':'), _),
                        (Tok::Ident(_), _),
                        (Tok::Open('('), _),
                        (Tok::Lit(Some(_)), _)
                    ])
                );
            if called_with_text {
                lines.push(line);
            }
        }
        // Inside `metrics`: the label enums' match arms spell the values.
        if s.is_in("metrics") {
            #[derive(Default)]
            struct TextArms(Vec<usize>);
            impl<'ast> Visit<'ast> for TextArms {
                fn visit_arm(&mut self, arm: &'ast syn::Arm) {
                    if let syn::Expr::Lit(syn::ExprLit {
                        lit: syn::Lit::Str(s),
                        ..
                    }) = &*arm.body
                    {
                        self.0.push(line(s.span()));
                    }
                    syn::visit::visit_arm(self, arm);
                }
            }
            let mut arms = TextArms::default();
            arms.visit_file(&s.ast);
            lines.extend(arms.0);
        }
        lines
    });
}

/// The calls (function paths' and methods' last names) inside a body.
#[derive(Default)]
struct Calls(BTreeSet<String>);

impl<'a> Visit<'a> for Calls {
    fn visit_expr_call(&mut self, e: &'a syn::ExprCall) {
        if let syn::Expr::Path(p) = &*e.func {
            if let Some(last) = p.path.segments.last() {
                self.0.insert(last.ident.to_string());
            }
        }
        syn::visit::visit_expr_call(self, e);
    }
    fn visit_expr_method_call(&mut self, e: &'a syn::ExprMethodCall) {
        self.0.insert(e.method.to_string());
        syn::visit::visit_expr_method_call(self, e);
    }
}

/// Invariant 12: actix does not supervise panics, so every handler of the
/// supervised actors runs its body through `supervise::contain` (directly
/// or through the actor's wrapper: `guard`, `contained`, `feed_contained`).
/// Test hooks and a handler that only stops its actor are exempt.
#[test]
fn every_actor_handler_is_contained() {
    const ACTORS: [&str; 4] = ["Counter", "PageRoom", "Shard", "Cluster"];
    const WRAPPERS: [&str; 4] = ["contain", "guard", "contained", "feed_contained"];
    let mut problems = Vec::new();
    let mut checked = 0;
    for s in &sources() {
        for item in &s.ast.items {
            let Item::Impl(imp) = item else { continue };
            let is_handler = imp
                .trait_
                .as_ref()
                .and_then(|(_, path, _)| path.segments.last())
                .is_some_and(|seg| seg.ident == "Handler");
            let actor = match &*imp.self_ty {
                syn::Type::Path(p) => p.path.segments.last().map(|seg| seg.ident.to_string()),
                _ => None,
            };
            let Some(actor) = actor.filter(|a| is_handler && ACTORS.contains(&a.as_str())) else {
                continue;
            };
            if attribute_lists(&imp.attrs, "cfg").contains("test-hooks") {
                continue;
            }
            for f in &imp.items {
                let ImplItem::Fn(f) = f else { continue };
                if f.sig.ident != "handle" {
                    continue;
                }
                let mut calls = Calls::default();
                calls.visit_block(&f.block);
                let only_stops = f.block.stmts.len() == 1 && calls.0.iter().eq(["stop"].iter());
                if only_stops {
                    continue;
                }
                checked += 1;
                if !WRAPPERS.iter().any(|w| calls.0.contains(*w)) {
                    problems.push(format!(
                        "{}:{} impl Handler for {actor}: its body is not contained",
                        s.path,
                        line(f.sig.ident.span())
                    ));
                }
            }
        }
    }
    assert!(
        checked >= 30,
        "found only {checked} handlers of the supervised actors"
    );
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
