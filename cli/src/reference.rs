//! The CLI reference in docs/cli.md, generated from the clap definitions: one section per
//! command with its `--help` text, between two markers. A test fails when the file differs
//! from what `--help` prints; `MESHGATE_UPDATE_CLI_DOCS=1 cargo test -p meshgate cli_reference`
//! rewrites it.

/// The line after which the generated part starts.
pub(crate) const BEGIN: &str =
    "<!-- BEGIN GENERATED: `meshgate … --help` for every command; edit cli/src, not this -->";
/// The line that ends it.
pub(crate) const END: &str = "<!-- END GENERATED -->";

/// Every command's help, depth first, as Markdown.
pub(crate) fn render(cmd: &mut clap::Command) -> String {
    let mut out = String::new();
    walk(cmd, "meshgate", &mut out);
    out
}

fn walk(cmd: &mut clap::Command, path: &str, out: &mut String) {
    if cmd.is_hide_set() || cmd.get_name() == "help" {
        return;
    }
    let help = trim_lines(&cmd.render_long_help().to_string());
    out.push_str(&format!("### `{path}`\n\n```text\n{help}\n```\n\n"));
    let names: Vec<String> = cmd
        .get_subcommands()
        .map(|s| s.get_name().to_owned())
        .collect();
    for name in names {
        if let Some(sub) = cmd.find_subcommand_mut(&name) {
            walk(sub, &format!("{path} {name}"), out);
        }
    }
}

/// `text` without trailing whitespace on any line, or trailing blank lines.
pub(crate) fn trim_lines(text: &str) -> String {
    let lines: Vec<&str> = text.lines().map(str::trim_end).collect();
    lines.join("\n").trim_end().to_owned()
}

/// `doc` with its generated part replaced by `generated`.
pub(crate) fn splice(doc: &str, generated: &str) -> Option<String> {
    splice_with(doc, BEGIN, END, generated)
}

/// `doc` with the part between the `begin` and `end` marker lines replaced by `generated`.
pub(crate) fn splice_with(doc: &str, begin: &str, end: &str, generated: &str) -> Option<String> {
    let start = doc.find(begin)? + begin.len();
    let stop = doc.find(end)?;
    (start <= stop).then(|| format!("{}\n\n{generated}{}", &doc[..start], &doc[stop..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_reference_matches_help() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/cli.md");
        let doc = std::fs::read_to_string(&path).expect("docs/cli.md");
        let mut cmd = crate::command();
        cmd.build();
        let want = splice(&doc, &render(&mut cmd)).expect("docs/cli.md has the generated markers");
        if std::env::var_os("MESHGATE_UPDATE_CLI_DOCS").is_some() {
            std::fs::write(&path, &want).expect("write docs/cli.md");
            return;
        }
        assert!(
            doc == want,
            "docs/cli.md does not match `meshgate --help`; run `MESHGATE_UPDATE_CLI_DOCS=1 cargo test -p meshgate cli_reference` and commit the result"
        );
    }

    #[test]
    fn splicing_keeps_the_prose() {
        let doc = format!("intro\n{BEGIN}\nold\n{END}\noutro\n");
        assert_eq!(
            splice(&doc, "new\n").as_deref(),
            Some(format!("intro\n{BEGIN}\n\nnew\n{END}\noutro\n").as_str())
        );
    }
}
