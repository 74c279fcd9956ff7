//! The invariants of ARCHITECTURE.md that a reading of the source can check:
//! the module graph (every `crate::`, `super::` and `self::` path of `src/`,
//! in `use` trees and inline) has no cycle beyond the allow-list below, the
//! code map lists the modules in an order every arrow respects, and the
//! grep-style rules (who may touch sled, Redis, protocol JSON, metric
//! names, ...). Comments, string contents and `#[cfg(test)]` items are left
//! out before anything is looked at. No server needed:
//! `cargo test --test architecture`.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    fs,
    path::{Path, PathBuf},
};

/// Cycles in the module graph that are tolerated, as the sets of modules of
/// each strongly connected component, with why they are still there. Every
/// other cycle fails the test, and so does an entry that no longer matches a
/// component exactly. Empty: every arrow points one way (the actors hold
/// `Recipient`s of the messages they send to higher layers).
const ALLOWED_CYCLES: &[(&[&str], &str)] = &[];

/// Modules allowed to break a grep rule today, by rule, each with why.
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

/// One source file of `src/`, read for these checks.
struct Source {
    /// Its module path (`counter`, `rooms::shard`); `""` for `lib.rs`, `"main"` for `main.rs`.
    module: String,
    /// Path relative to the crate root, for messages.
    path: String,
    /// The code without comments, string contents and `#[cfg(test)]` items,
    /// one entry per character of the file (so offsets give line numbers).
    code: Vec<char>,
    /// The string literals outside test code: (line, contents).
    literals: Vec<(usize, String)>,
    /// The file as written, one entry per character.
    raw: Vec<char>,
}

impl Source {
    fn line_of(&self, offset: usize) -> usize {
        1 + self.code[..offset.min(self.code.len())]
            .iter()
            .filter(|&&c| c == '\n')
            .count()
    }

    /// Every identifier with its offset.
    fn idents(&self) -> Vec<(usize, String)> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < self.code.len() {
            let c = self.code[i];
            if is_ident_start(c) && (i == 0 || !is_ident_char(self.code[i - 1])) {
                let start = i;
                while i < self.code.len() && is_ident_char(self.code[i]) {
                    i += 1;
                }
                out.push((start, self.code[start..i].iter().collect()));
            } else {
                i += 1;
            }
        }
        out
    }

    /// The first non-space character at or after `at`.
    fn next_non_space(&self, at: usize) -> Option<(usize, char)> {
        (at..self.code.len())
            .map(|i| (i, self.code[i]))
            .find(|(_, c)| !c.is_whitespace())
    }

    /// True when the identifier ending at `end` is followed by `s` (spaces skipped).
    fn followed_by(&self, end: usize, s: &str) -> bool {
        let Some((at, _)) = self.next_non_space(end) else {
            return false;
        };
        let want: Vec<char> = s.chars().collect();
        self.code.get(at..at + want.len()) == Some(&want[..])
    }

    /// Lines where identifier `name` is used as a path segment (`name::`).
    fn path_uses(&self, name: &str) -> Vec<usize> {
        self.idents()
            .into_iter()
            .filter(|(at, id)| id == name && self.followed_by(at + id.len(), "::"))
            .map(|(at, _)| self.line_of(at))
            .collect()
    }

    /// Lines where identifier `name` appears at all.
    fn mentions(&self, name: &str) -> Vec<usize> {
        self.idents()
            .into_iter()
            .filter(|(_, id)| id == name)
            .map(|(at, _)| self.line_of(at))
            .collect()
    }

    /// The attributes written right before the item starting at `at`
    /// (`pub` and doc comments skipped), as written.
    fn attributes_before(&self, at: usize) -> String {
        let mut i = at;
        let skip_space = |mut i: usize| {
            while i > 0 && self.code[i - 1].is_whitespace() {
                i -= 1;
            }
            i
        };
        i = skip_space(i);
        if i >= 3 && self.code[i - 3..i] == ['p', 'u', 'b'] {
            i = skip_space(i - 3);
        }
        let end = i;
        while i > 0 && self.code[i - 1] == ']' {
            // Back to the matching `#[`.
            let mut depth = 0;
            let mut j = i;
            while j > 0 {
                j -= 1;
                match self.code[j] {
                    ']' => depth += 1,
                    '[' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    _ => {}
                }
            }
            if j == 0 || self.code[j - 1] != '#' {
                break;
            }
            i = skip_space(j - 1);
        }
        self.raw[i..end].iter().collect()
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

fn is_ident_start(c: char) -> bool {
    c.is_alphabetic() || c == '_'
}

fn is_ident_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
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
            let (mut code, literals) = lex(&text);
            let tests = test_items(&code);
            for r in &tests {
                for c in &mut code[r.clone()] {
                    if *c != '\n' {
                        *c = ' ';
                    }
                }
            }
            let mut src = Source {
                module: module_of(rel),
                path: format!("src/{}", rel.display()),
                code,
                literals: Vec::new(),
                raw: text.chars().collect(),
            };
            src.literals = literals
                .into_iter()
                .filter(|(at, _)| !tests.iter().any(|r| r.contains(at)))
                .map(|(at, s)| (src.line_of(at), s))
                .collect();
            src
        })
        .collect()
}

/// The file's characters with comments and the contents of string and
/// character literals blanked (newlines kept), and the string literals with
/// their offsets.
fn lex(text: &str) -> (Vec<char>, Vec<(usize, String)>) {
    let src: Vec<char> = text.chars().collect();
    let mut code = src.clone();
    let mut literals = Vec::new();
    let blank = |code: &mut Vec<char>, from: usize, to: usize| {
        for c in &mut code[from..to.min(src.len())] {
            if *c != '\n' {
                *c = ' ';
            }
        }
    };
    let mut i = 0;
    while i < src.len() {
        let c = src[i];
        let next = src.get(i + 1).copied();
        let prev_ident = i > 0 && is_ident_char(src[i - 1]);
        if c == '/' && next == Some('/') {
            let end = (i..src.len())
                .find(|&j| src[j] == '\n')
                .unwrap_or(src.len());
            blank(&mut code, i, end);
            i = end;
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            let mut j = i;
            while j < src.len() {
                if src[j] == '/' && src.get(j + 1) == Some(&'*') {
                    depth += 1;
                    j += 2;
                } else if src[j] == '*' && src.get(j + 1) == Some(&'/') {
                    depth -= 1;
                    j += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    j += 1;
                }
            }
            blank(&mut code, i, j);
            i = j;
        } else if !prev_ident && (c == 'r' || (c == 'b' && next == Some('r'))) && {
            let k = if c == 'b' { i + 2 } else { i + 1 };
            let hashes = src[k.min(src.len())..]
                .iter()
                .take_while(|&&h| h == '#')
                .count();
            src.get(k + hashes) == Some(&'"')
        } {
            // Raw string: r#"..."#.
            let k = if c == 'b' { i + 2 } else { i + 1 };
            let hashes = src[k..].iter().take_while(|&&h| h == '#').count();
            let open = k + hashes + 1;
            let mut j = open;
            let end = loop {
                if j >= src.len() {
                    break src.len();
                }
                if src[j] == '"'
                    && src[j + 1..]
                        .iter()
                        .take(hashes)
                        .filter(|&&h| h == '#')
                        .count()
                        == hashes
                {
                    break j;
                }
                j += 1;
            };
            literals.push((i, src[open..end].iter().collect()));
            blank(&mut code, open, end);
            i = end + 1 + hashes;
        } else if c == '"' {
            let mut j = i + 1;
            let mut s = String::new();
            while j < src.len() && src[j] != '"' {
                if src[j] == '\\' {
                    s.push(src[j]);
                    j += 1;
                }
                if j < src.len() {
                    s.push(src[j]);
                }
                j += 1;
            }
            literals.push((i, s));
            blank(&mut code, i + 1, j);
            i = j + 1;
        } else if c == '\'' {
            // A character literal ('x', '\n', '\u{..}') or a lifetime ('a).
            if next == Some('\\') {
                let end = (i + 2..src.len())
                    .find(|&j| src[j] == '\'')
                    .unwrap_or(src.len());
                blank(&mut code, i + 1, end);
                i = end + 1;
            } else if src.get(i + 2) == Some(&'\'') {
                blank(&mut code, i + 1, i + 2);
                i += 3;
            } else {
                i += 1;
            }
        } else {
            i += 1;
        }
    }
    (code, literals)
}

/// The character ranges of `#[cfg(test)]` items (attributes included).
fn test_items(code: &[char]) -> Vec<std::ops::Range<usize>> {
    let text: String = code.iter().collect();
    // Char offsets of the byte offsets found in `text`.
    let char_at = |byte: usize| text[..byte].chars().count();
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(found) = text[from..].find("#[cfg(test)]") {
        let start_byte = from + found;
        let start = char_at(start_byte);
        let mut i = start + "#[cfg(test)]".len();
        // Further attributes.
        loop {
            while i < code.len() && code[i].is_whitespace() {
                i += 1;
            }
            if code.get(i) == Some(&'#') {
                i = skip_balanced(code, i + 1, '[', ']');
            } else {
                break;
            }
        }
        // The item: up to its `;`, or its `{ ... }` block.
        let mut depth = 0i32;
        let end = loop {
            match code.get(i) {
                None => break code.len(),
                Some('(' | '[') => depth += 1,
                Some(')' | ']') => depth -= 1,
                Some(';') if depth == 0 => break i + 1,
                Some('{') if depth == 0 => break skip_balanced(code, i, '{', '}'),
                _ => {}
            }
            i += 1;
        };
        out.push(start..end);
        from = text
            .char_indices()
            .nth(end)
            .map_or(text.len(), |(b, _)| b)
            .max(start_byte + 1);
    }
    out
}

/// From an opening `open` at or after `at`, the offset just past its matching `close`.
fn skip_balanced(code: &[char], at: usize, open: char, close: char) -> usize {
    let mut i = at;
    while i < code.len() && code[i] != open {
        i += 1;
    }
    let mut depth = 0;
    while i < code.len() {
        if code[i] == open {
            depth += 1;
        } else if code[i] == close {
            depth -= 1;
            if depth == 0 {
                return i + 1;
            }
        }
        i += 1;
    }
    code.len()
}

// ---------------------------------------------------------------- the module graph

/// A dependency of one module on another, where it was first seen.
type Edges = BTreeMap<(String, String), String>;

/// The paths a `use` tree names, each as its segments (`crate::a::{b, c::D}`
/// gives `crate::a::b` and `crate::a::c::D`).
fn use_paths(tree: &str) -> Vec<Vec<String>> {
    let mut tokens = Vec::new();
    let chars: Vec<char> = tree.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if is_ident_start(c) {
            let start = i;
            while i < chars.len() && is_ident_char(chars[i]) {
                i += 1;
            }
            tokens.push(chars[start..i].iter().collect::<String>());
        } else if c == ':' && chars.get(i + 1) == Some(&':') {
            tokens.push("::".into());
            i += 2;
        } else {
            tokens.push(c.to_string());
            i += 1;
        }
    }
    let mut out = Vec::new();
    let mut pos = 0;
    parse_tree(&tokens, &mut pos, &[], &mut out);
    out
}

fn parse_tree(tokens: &[String], pos: &mut usize, prefix: &[String], out: &mut Vec<Vec<String>>) {
    let mut path = prefix.to_vec();
    loop {
        match tokens.get(*pos).map(String::as_str) {
            Some("{") => {
                *pos += 1;
                loop {
                    if tokens.get(*pos).map(String::as_str) == Some("}") {
                        *pos += 1;
                        break;
                    }
                    parse_tree(tokens, pos, &path, out);
                    match tokens.get(*pos).map(String::as_str) {
                        Some(",") => *pos += 1,
                        Some("}") => {
                            *pos += 1;
                            break;
                        }
                        _ => break,
                    }
                }
                return;
            }
            Some("*") => {
                *pos += 1;
                out.push(path);
                return;
            }
            Some("::") => *pos += 1,
            Some(t) if is_ident_start(t.chars().next().unwrap_or(' ')) => {
                path.push(t.to_owned());
                *pos += 1;
                if tokens.get(*pos).map(String::as_str) == Some("as") {
                    *pos += 2;
                }
                if tokens.get(*pos).map(String::as_str) != Some("::") {
                    out.push(path);
                    return;
                }
            }
            _ => {
                out.push(path);
                return;
            }
        }
    }
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
        for (tree, _) in use_trees(lib) {
            for p in use_paths(&tree) {
                if let (Some(first), Some(last)) = (p.first(), p.last()) {
                    if modules.contains(first) {
                        reexports.insert(last.clone(), first.clone());
                    }
                }
            }
        }
    }
    let mut edges = Edges::new();
    for s in srcs {
        if s.module.is_empty() || s.module == "main" {
            continue;
        }
        let mut paths: Vec<(Vec<String>, usize)> = Vec::new();
        for (tree, line) in use_trees(s) {
            paths.extend(use_paths(&tree).into_iter().map(|p| (p, line)));
        }
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

/// The text of every `use` declaration (after `use`, up to its `;`) and its line.
fn use_trees(s: &Source) -> Vec<(String, usize)> {
    let mut out = Vec::new();
    for (at, id) in s.idents() {
        if id != "use" {
            continue;
        }
        let start = at + 3;
        let end = (start..s.code.len())
            .find(|&i| s.code[i] == ';')
            .unwrap_or(s.code.len());
        out.push((s.code[start..end].iter().collect(), s.line_of(at)));
    }
    out
}

/// Paths written inline: `crate::a::b`, `super::x`, `self::y` (no braces).
fn inline_paths(s: &Source) -> Vec<(Vec<String>, usize)> {
    let mut out = Vec::new();
    let idents = s.idents();
    for (k, (at, id)) in idents.iter().enumerate() {
        if !matches!(id.as_str(), "crate" | "super" | "self") {
            continue;
        }
        // Part of a longer path (`a::self`), or a `use` tree (handled there).
        if *at >= 2 && s.code[at - 2..*at] == [':', ':'] {
            continue;
        }
        let mut path = vec![id.clone()];
        let mut end = at + id.len();
        for (next_at, next) in &idents[k + 1..] {
            let between: String = s.code[end..*next_at].iter().collect();
            if between.trim() != "::" {
                break;
            }
            path.push(next.clone());
            end = next_at + next.len();
        }
        out.push((path, s.line_of(*at)));
    }
    out
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

// ---------------------------------------------------------------- grep rules

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
        s.literals
            .iter()
            .filter(|(_, l)| l.starts_with("link_counter_"))
            .map(|(line, _)| *line)
            .collect()
    });
}

/// The error codes, as `protocol::code` spells them.
fn error_codes(srcs: &[Source]) -> Vec<String> {
    let protocol = srcs
        .iter()
        .find(|s| s.module == "protocol")
        .expect("src/protocol.rs");
    let code: String = protocol.code.iter().collect();
    let start = code.find("pub mod code").expect("protocol::code");
    let start = code[..start].chars().count();
    let end = skip_balanced(&protocol.code, start, '{', '}');
    let (first, last) = (protocol.line_of(start), protocol.line_of(end));
    let codes: Vec<String> = protocol
        .literals
        .iter()
        .filter(|(line, _)| (first..=last).contains(line))
        .map(|(_, l)| l.clone())
        .collect();
    assert!(codes.len() >= 6, "protocol::code spells {codes:?}");
    codes
}

/// Protocol JSON (a `"type"` key) is written only in `protocol`.
#[test]
fn protocol_json_is_built_only_in_protocol() {
    only_in("protocol-json", &["protocol"], |s| {
        s.literals
            .iter()
            .filter(|(_, l)| l == "type" || l.contains("\\\"type\\\"") || l.contains("\"type\""))
            .map(|(line, _)| *line)
            .collect()
    });
}

/// Error codes are spelled only in `protocol`.
#[test]
fn error_codes_are_spelled_only_in_protocol() {
    let codes = error_codes(&sources());
    only_in("error-code", &["protocol"], |s| {
        s.literals
            .iter()
            .filter(|(_, l)| codes.contains(l))
            .filter(|_| !excepted("metric-label").iter().any(|m| s.is_in(m)))
            .map(|(line, _)| *line)
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
        for (at, id) in s.idents() {
            let end = at + id.len();
            let call = matches!(id.as_str(), "unwrap" | "expect") && s.followed_by(end, "(");
            let mac = matches!(
                id.as_str(),
                "panic"
                    | "unreachable"
                    | "todo"
                    | "unimplemented"
                    | "assert"
                    | "assert_eq"
                    | "assert_ne"
            ) && s.followed_by(end, "!");
            if call || mac {
                problems.push(format!("{}:{} {id}", s.path, s.line_of(at)));
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
    let code: String = state.code.iter().collect();
    if code.contains("Instant::now") {
        problems.push("Instant::now: the time comes in with each input".into());
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
    for (at, id) in config.idents() {
        if id != "struct" {
            continue;
        }
        // The attributes right before the item (`pub` skipped).
        let head: String = config.code[..at].iter().collect();
        let head = head.trim_end().trim_end_matches("pub").trim_end();
        let mut attrs = String::new();
        let mut rest = head;
        while rest.ends_with(']') {
            let Some(open) = rest.rfind("#[") else { break };
            attrs.push_str(&rest[open..]);
            rest = rest[..open].trim_end();
        }
        if !attrs.contains("Deserialize") {
            continue;
        }
        structs += 1;
        if !attrs.contains("deny_unknown_fields") && !attrs.contains("transparent") {
            problems.push(format!("src/config.rs:{}", config.line_of(at)));
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
        lines.extend(s.mentions("File").into_iter().filter(|_| {
            // `config::File` is the config crate's source type.
            s.module != "config"
        }));
        lines
    });
    let srcs = sources();
    let web = srcs.iter().find(|s| s.module == "web").expect("src/web.rs");
    assert!(!web.mentions("include_str").is_empty());
}

/// Items only tests use: messages (with their handlers) and functions.
const TEST_HOOKS: &[&str] = &["InjectFault", "SweepNow", "Tracked", "RoomOf", "idle_pages"];

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
    let srcs = sources();
    let mut problems = Vec::new();
    let mut gated = 0;
    for s in &srcs {
        let idents = s.idents();
        for (k, (at, id)) in idents.iter().enumerate() {
            let names_hook = match id.as_str() {
                "struct" | "enum" | "fn" => idents
                    .get(k + 1)
                    .is_some_and(|(_, n)| TEST_HOOKS.contains(&n.as_str())),
                "impl" => {
                    let header_end = (*at..s.code.len())
                        .find(|&i| s.code[i] == '{' || s.code[i] == ';')
                        .unwrap_or(s.code.len());
                    idents[k + 1..]
                        .iter()
                        .take_while(|(i, _)| *i < header_end)
                        .any(|(_, n)| TEST_HOOKS.contains(&n.as_str()))
                }
                _ => false,
            };
            if !names_hook {
                continue;
            }
            if s.attributes_before(*at)
                .contains("feature = \"test-hooks\"")
            {
                gated += 1;
            } else if !exempt.iter().any(|m| s.is_in(m)) {
                problems.push(format!("{}:{} {id}", s.path, s.line_of(*at)));
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
    let text: String = lib.code.iter().collect();
    assert!(text.contains("#![forbid(unsafe_code)]"));
    let mut found = Vec::new();
    for s in &srcs {
        for line in s.mentions("unsafe") {
            found.push(format!("{}:{line}", s.path));
        }
    }
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].starts_with("src/main.rs:"), "{found:?}");
}

/// The source reader itself: comments, strings and test items are left
/// out, `use` trees expand, relative paths resolve.
#[test]
fn the_reader_sees_code_only() {
    let (code, lits) =
        lex("let a = \"crate::x\"; // crate::y\n/* crate::z */ let c = '\"'; r#\"q\"#");
    let code: String = code.into_iter().collect();
    assert!(!code.contains("crate"), "{code}");
    assert_eq!(
        lits.iter().map(|(_, s)| s.as_str()).collect::<Vec<_>>(),
        ["crate::x", "q"]
    );
    let (code, _) = lex("fn f() {}\n#[cfg(test)]\nmod tests { use crate::x; }\nfn g() {}");
    let ranges = test_items(&code);
    assert_eq!(ranges.len(), 1);
    let kept: String = code
        .iter()
        .enumerate()
        .filter(|(i, _)| !ranges[0].contains(i))
        .map(|(_, c)| *c)
        .collect();
    assert!(
        kept.contains("fn g") && !kept.contains("crate::x"),
        "{kept}"
    );
    let paths = use_paths(" crate::{a::B, c::{d::E, f as g}, h::*}");
    let joined: Vec<String> = paths.iter().map(|p| p.join("::")).collect();
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

/// Every function with a body in `code`, as (name, line of its `fn`, lines
/// from `fn` to its closing brace).
fn function_lengths(code: &[char]) -> Vec<(String, usize, usize)> {
    let line_at = |at: usize| 1 + code[..at].iter().filter(|&&c| c == '\n').count();
    let mut out = Vec::new();
    for at in 0..code.len() {
        let keyword = code[at..].starts_with(&['f', 'n'])
            && (at == 0 || !is_ident_char(code[at - 1]))
            && code.get(at + 2).is_some_and(|c| c.is_whitespace());
        if !keyword {
            continue;
        }
        let mut i = at + 2;
        while i < code.len() && code[i].is_whitespace() {
            i += 1;
        }
        let name: String = code[i..]
            .iter()
            .take_while(|&&c| is_ident_char(c))
            .collect();
        // The body is the first `{` outside parentheses and brackets, unless
        // a `;` ends the declaration first.
        let mut depth = 0i32;
        let body = loop {
            match code.get(i) {
                None | Some(';') if depth == 0 => break None,
                Some('(' | '[') => depth += 1,
                Some(')' | ']') => depth -= 1,
                Some('{') if depth == 0 => break Some(i),
                _ => {}
            }
            i += 1;
        };
        if let (false, Some(open)) = (name.is_empty(), body) {
            let close = skip_balanced(code, open, '{', '}') - 1;
            out.push((name, line_at(at), line_at(close) - line_at(at) + 1));
        }
    }
    out
}

/// No function in the files of the connection path is longer than
/// [`MAX_FN_LINES`] lines (test modules left out), beyond the allow-list:
/// each step is a named function short enough to read at once.
#[test]
fn connection_path_functions_are_short() {
    let (code, _) = lex(concat!(
        "fn a() {\n    let s = \"}\";\n}\n",
        "pub(crate) async fn b(x: [u8; 2]) -> impl Fn(u8) -> u8 { move |y| x[0] + y }\n",
        "trait T { fn c(&self); }\nfn d<const N: usize>()\nwhere\n    [u8; N]: Sized,\n{\n}\n",
        "let f: fn(u8) -> u8 = g;\n",
    ));
    assert_eq!(
        function_lengths(&code),
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
        for (name, line, lines) in function_lengths(&s.code) {
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
        let raw: String = s.raw.iter().collect();
        let mut lines = Vec::new();
        for (i, line) in raw.lines().enumerate() {
            let t = line.trim_start();
            if t.starts_with("//") {
                continue;
            }
            // A helper called with a string: `metrics::x("…"` or `m::x("…"`.
            let called_with_text = ["metrics::", "m::"].iter().any(|p| {
                line.match_indices(p).any(|(at, _)| {
                    let rest = &line[at + p.len()..];
                    let name_len = rest
                        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                        .unwrap_or(rest.len());
                    name_len > 0 && rest[name_len..].trim_start().starts_with("(\"")
                })
            });
            // Inside `metrics`: the label enums' match arms spell the values.
            let label_arm = t.contains("=> \"") && t.ends_with("\",");
            if called_with_text || (s.is_in("metrics") && label_arm) {
                lines.push(i + 1);
            }
        }
        lines
    });
}
