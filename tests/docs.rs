//! The documentation holds together: every relative Markdown link in the
//! README, `docs/*.md`, BENCHMARKS.md and ARCHITECTURE.md points at a file
//! that exists and, with a `#anchor`, at a heading of that file (GitHub's
//! slug rules); the README stays short, keeps its two commands (the one that
//! runs the service and the one CI runs as the test command) and links every
//! document in `docs/`. No server needed: `cargo test --test docs`.

use std::{
    collections::{BTreeSet, HashMap},
    fs,
    path::{Path, PathBuf},
};

/// The README must stay a newcomer's page: the details live in `docs/`.
const README_MAX_BYTES: usize = 22_000;

/// The command that runs the service with the embedded defaults.
const RUN_COMMAND: &str = "cargo run --release";

/// The test command; `.ci/run` runs exactly this.
const TEST_COMMAND: &str = "./test.sh";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// The Markdown files whose links are checked.
fn documents() -> Vec<PathBuf> {
    let root = root();
    let mut files: Vec<PathBuf> = ["README.md", "BENCHMARKS.md", "ARCHITECTURE.md"]
        .iter()
        .map(|f| root.join(f))
        .collect();
    let mut docs: Vec<PathBuf> = fs::read_dir(root.join("docs"))
        .expect("docs/ exists")
        .map(|e| e.expect("docs/ entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    files
}

/// The text with fenced code blocks blanked (their lines kept empty, so
/// nothing in them is taken for a heading or a link).
fn without_fences(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut fence: Option<String> = None;
    for line in text.lines() {
        let trimmed = line.trim_start();
        let marker: String = trimmed
            .chars()
            .take_while(|&c| c == '`' || c == '~')
            .collect();
        let is_fence =
            marker.len() >= 3 && marker.chars().all(|c| c == marker.as_bytes()[0] as char);
        match &fence {
            Some(open) => {
                if is_fence
                    && marker.starts_with(open.as_str())
                    && trimmed[marker.len()..].trim().is_empty()
                {
                    fence = None;
                }
                out.push('\n');
            }
            None if is_fence => {
                fence = Some(marker);
                out.push('\n');
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

/// The text with inline code spans removed (a run of backticks up to the
/// next run of the same length, across lines as in CommonMark).
fn without_code_spans(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        if chars[i] != '`' {
            out.push(chars[i]);
            i += 1;
            continue;
        }
        let run = chars[i..].iter().take_while(|&&c| c == '`').count();
        // Find the closing run of exactly `run` backticks.
        let mut j = i + run;
        let mut close = None;
        while j < chars.len() {
            if chars[j] == '`' {
                let r = chars[j..].iter().take_while(|&&c| c == '`').count();
                if r == run {
                    close = Some(j + r);
                    break;
                }
                j += r;
            } else {
                j += 1;
            }
        }
        match close {
            Some(end) => i = end,
            None => {
                // No closing run: literal backticks.
                out.extend(std::iter::repeat_n('`', run));
                i += run;
            }
        }
    }
    out
}

/// GitHub's anchor for a heading: lowercase, punctuation dropped except `-`
/// and `_`, spaces to `-`. Inline links count by their text.
fn slug(heading: &str) -> String {
    let text = link_texts(&without_code_spans_keep_text(heading));
    text.trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// A heading's code spans count by their content (GitHub slugs the rendered text).
fn without_code_spans_keep_text(text: &str) -> String {
    text.replace('`', "")
}

/// `[text](target)` becomes `text`.
fn link_texts(text: &str) -> String {
    let mut out = text.to_string();
    while let Some((start, end, inner)) = first_link(&out) {
        out.replace_range(start..end, &inner);
    }
    out
}

/// The first `[text](target)` in `text`: its byte range and its text.
fn first_link(text: &str) -> Option<(usize, usize, String)> {
    let at = text.find("](")?;
    let open = text[..at].rfind('[')?;
    let close = text[at + 2..].find(')')? + at + 2;
    Some((open, close + 1, text[open + 1..at].to_string()))
}

/// Every anchor a link may name in this document: its headings' slugs
/// (repeats get `-1`, `-2`, ... as on GitHub) and explicit `id`/`name`
/// attributes of HTML elements.
fn anchors(text: &str) -> BTreeSet<String> {
    let text = without_fences(text);
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let trimmed = line.trim_start();
        let hashes = trimmed.chars().take_while(|&c| c == '#').count();
        if (1..=6).contains(&hashes) && trimmed[hashes..].starts_with(' ') {
            let heading = trimmed[hashes..].trim().trim_end_matches('#').trim();
            let base = slug(heading);
            let n = seen.entry(base.clone()).or_insert(0);
            out.insert(if *n == 0 {
                base.clone()
            } else {
                format!("{base}-{n}")
            });
            *n += 1;
        }
        for attr in ["id=\"", "name=\""] {
            let mut rest = line;
            while let Some(at) = rest.find(attr) {
                rest = &rest[at + attr.len()..];
                if let Some(end) = rest.find('"') {
                    out.insert(rest[..end].to_string());
                }
            }
        }
    }
    out
}

/// Every link target of the document (`[text](target)` and `![alt](target)`),
/// outside code, with the line it is on.
fn links(text: &str) -> Vec<(usize, String)> {
    let text = without_code_spans(&without_fences(text));
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(found) = text[from..].find("](") {
        let at = from + found;
        from = at + 2;
        // A link needs the `[` that opens its text, in the same paragraph.
        if !opens_link_text(&text[..at]) {
            continue;
        }
        // The target, up to the `)` that balances its own parentheses.
        let mut depth = 0usize;
        let mut end = None;
        for (i, c) in text[at + 2..].char_indices() {
            match c {
                '(' => depth += 1,
                ')' if depth == 0 => {
                    end = Some(at + 2 + i);
                    break;
                }
                ')' => depth -= 1,
                '\n' => break,
                _ => {}
            }
        }
        let Some(end) = end else { continue };
        let raw = text[at + 2..end].trim();
        // Drop an optional title: [text](target "title").
        let target = raw.split_whitespace().next().unwrap_or("");
        let target = target.trim_start_matches('<').trim_end_matches('>');
        let line = text[..at].matches('\n').count() + 1;
        out.push((line, target.to_string()));
    }
    out
}

/// Whether `before` ends inside a link text: an unmatched `[` since the
/// paragraph began.
fn opens_link_text(before: &str) -> bool {
    let paragraph = &before[before.rfind("\n\n").map_or(0, |p| p + 2)..];
    let mut depth = 0usize;
    for c in paragraph.chars().rev() {
        match c {
            ']' => depth += 1,
            '[' if depth == 0 => return true,
            '[' => depth -= 1,
            _ => {}
        }
    }
    false
}

fn is_external(target: &str) -> bool {
    target.contains("://") || target.starts_with("mailto:")
}

#[test]
fn every_relative_link_and_anchor_resolves() {
    let root = root();
    let mut anchor_cache: HashMap<PathBuf, BTreeSet<String>> = HashMap::new();
    let mut problems = Vec::new();
    let mut checked = 0;
    for doc in documents() {
        let text = read(&doc);
        let name = doc
            .strip_prefix(&root)
            .unwrap_or(&doc)
            .display()
            .to_string();
        let dir = doc.parent().expect("a file has a directory");
        for (line, target) in links(&text) {
            if target.is_empty() {
                problems.push(format!("{name}:{line}: empty link target"));
                continue;
            }
            if is_external(&target) {
                continue;
            }
            checked += 1;
            let (path, anchor) = match target.split_once('#') {
                Some((p, a)) => (p, Some(a)),
                None => (target.as_str(), None),
            };
            let file = if path.is_empty() {
                doc.clone()
            } else {
                dir.join(path)
            };
            if !file.exists() {
                problems.push(format!(
                    "{name}:{line}: {target}: {} does not exist",
                    file.display()
                ));
                continue;
            }
            let Some(anchor) = anchor else { continue };
            if file.extension().is_none_or(|x| x != "md") {
                problems.push(format!(
                    "{name}:{line}: {target}: an anchor into a file that is not Markdown"
                ));
                continue;
            }
            let canonical = file.canonicalize().expect("an existing file canonicalizes");
            let known = anchor_cache
                .entry(canonical.clone())
                .or_insert_with(|| anchors(&read(&canonical)));
            if !known.contains(anchor) {
                problems.push(format!(
                    "{name}:{line}: {target}: no heading with the anchor #{anchor} in {} (anchors: {})",
                    file.display(),
                    known.iter().cloned().collect::<Vec<_>>().join(", ")
                ));
            }
        }
    }
    assert!(
        checked > 20,
        "found only {checked} relative links: is the link parser broken?"
    );
    assert!(
        problems.is_empty(),
        "broken links:\n{}",
        problems.join("\n")
    );
}

#[test]
fn readme_is_short_and_keeps_its_two_commands() {
    let root = root();
    let readme = read(&root.join("README.md"));
    assert!(
        readme.len() < README_MAX_BYTES,
        "README.md is {} bytes, over {README_MAX_BYTES}: move details to docs/",
        readme.len()
    );
    // Both commands as lines of their own in the README's code blocks.
    let mut in_fence = false;
    let mut code_lines = BTreeSet::new();
    for line in readme.lines() {
        if line.trim_start().starts_with("```") {
            in_fence = !in_fence;
        } else if in_fence {
            code_lines.insert(line.trim());
        }
    }
    for command in [RUN_COMMAND, TEST_COMMAND] {
        assert!(
            code_lines.contains(command),
            "README.md must show `{command}` as a command line of its own in a code block"
        );
    }
    // CI runs the README's test command, exactly.
    let ci = read(&root.join(".ci/run"));
    assert!(
        ci.lines().any(|l| l.trim() == TEST_COMMAND),
        ".ci/run must run the README's test command `{TEST_COMMAND}`"
    );
    assert!(
        root.join("test.sh").exists(),
        "the test command's script is missing"
    );
}

#[test]
fn readme_links_every_document_in_docs() {
    let root = root();
    let readme = read(&root.join("README.md"));
    let linked: BTreeSet<String> = links(&readme)
        .into_iter()
        .map(|(_, t)| t.split('#').next().unwrap_or("").to_string())
        .collect();
    let mut missing = Vec::new();
    for doc in documents() {
        let rel = doc.strip_prefix(&root).expect("under the root");
        if rel.starts_with("docs") {
            let rel = rel.to_string_lossy().replace('\\', "/");
            if !linked.contains(&rel) {
                missing.push(rel);
            }
        }
    }
    assert!(
        missing.is_empty(),
        "README.md does not link: {}",
        missing.join(", ")
    );
}

#[test]
fn the_parsers_follow_github() {
    assert_eq!(
        slug("Add live counts to your site"),
        "add-live-counts-to-your-site"
    );
    assert_eq!(
        slug("WebSocket: `GET /parties/page/{page_id}`"),
        "websocket-get-partiespagepage_id"
    );
    assert_eq!(
        slug("Settings for 100,000+ connections on a larger machine"),
        "settings-for-100000-connections-on-a-larger-machine"
    );
    assert_eq!(
        slug("When the page's origin is refused"),
        "when-the-pages-origin-is-refused"
    );
    assert_eq!(slug("Crashes: the ghost bound"), "crashes-the-ghost-bound");
    assert_eq!(slug("See [the docs](x.md) now"), "see-the-docs-now");
    let doc = "# A\n\n## A\n\n```sh\n# not a heading\n```\n\n<a id=\"custom\"></a>\n";
    let got: Vec<String> = anchors(doc).into_iter().collect();
    assert_eq!(got, ["a", "a-1", "custom"]);
    let text = "See [one](a.md#x) and `[not](b.md)`, ![img](c.png \"t\"),\n\
                [two\nlines](d.md), [code `](`](g.md) and (parens) ](f).\n\n\
                ```md\n[fenced](e.md)\n```\n[last](h.md#y-z)\n";
    let got: Vec<String> = links(text).into_iter().map(|(_, t)| t).collect();
    assert_eq!(got, ["a.md#x", "c.png", "d.md", "g.md", "h.md#y-z"]);
}
