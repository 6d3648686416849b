//! Every command line the README and `docs/` show in a code block parses with the argument
//! parser of the binary it runs (meshctl, mesh-proxy and its `init` and `agent`,
//! mesh-controller, mesh-ca), so an example cannot drift from the flags the binaries take.

use std::path::{Path, PathBuf};

use clap::Parser as _;
use mesh_e2e::workspace_root;

/// The Markdown files whose examples users copy.
fn markdown(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("a directory") {
        let path = entry.expect("an entry").path();
        if path.is_dir() {
            markdown(&path, out);
        } else if path.extension().is_some_and(|e| e == "md") {
            out.push(path);
        }
    }
}

/// The command lines of a Markdown text's fenced code blocks that run one of our binaries:
/// continuation lines joined, a leading `$ ` and what a shell would not pass (a comment, `&`,
/// a redirection or a pipe and what follows) taken off.
fn command_lines(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_block = false;
    let mut pending = String::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_block = !in_block;
            pending.clear();
            continue;
        }
        if !in_block {
            continue;
        }
        let line = line.trim();
        if let Some(head) = line.strip_suffix('\\') {
            pending.push_str(head);
            pending.push(' ');
            continue;
        }
        let whole = std::mem::take(&mut pending) + line;
        let whole = whole.strip_prefix("$ ").unwrap_or(&whole);
        let runs_ours = ["meshctl ", "mesh-proxy ", "mesh-controller ", "mesh-ca "]
            .iter()
            .any(|b| whole.starts_with(b));
        if runs_ours {
            out.push(whole.to_owned());
        }
    }
    out
}

/// The words a shell would pass to the program.
fn argv(line: &str) -> Result<Vec<String>, String> {
    let words = shlex::split(line).ok_or("unbalanced quotes")?;
    let end = words
        .iter()
        .position(|w| {
            w.starts_with('#') || ["&", "|", ">", ">>", "2>&1", "<"].contains(&w.as_str())
        })
        .unwrap_or(words.len());
    Ok(words[..end].to_vec())
}

/// Parses `args` as the binary `args[0]` would, or says why it refuses them.
fn parse(args: &[String]) -> Result<(), String> {
    let e = |e: clap::Error| e.render().to_string();
    match (args[0].as_str(), args.get(1).map(String::as_str)) {
        ("meshctl", _) => meshctl::cmd::Cli::try_parse_from(args).map(drop).map_err(e),
        ("mesh-proxy", Some("init")) => mesh_proxy::init::InitArgs::try_parse_from(&args[1..])
            .map(drop)
            .map_err(e),
        ("mesh-proxy", Some("agent")) => mesh_proxy::agent::AgentArgs::try_parse_from(&args[1..])
            .map(drop)
            .map_err(e),
        ("mesh-proxy", _) => mesh_proxy::Config::try_parse_from(args)
            .map(drop)
            .map_err(e),
        ("mesh-controller", _) => mesh_controller::config::Config::try_parse_from(args)
            .map(drop)
            .map_err(e),
        ("mesh-ca", _) => mesh_ca::cli::Cli::try_parse_from(args).map(drop).map_err(e),
        (other, _) => Err(format!("{other}: not one of our binaries")),
    }
}

#[test]
fn every_command_line_in_the_docs_parses_with_its_binary() {
    let root = workspace_root();
    let mut files = vec![root.join("README.md"), root.join("e2e/kind/README.md")];
    markdown(&root.join("docs"), &mut files);
    let mut checked = 0;
    let mut refused = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).expect("a Markdown file");
        for line in command_lines(&text) {
            let result = argv(&line).and_then(|args| parse(&args));
            if let Err(why) = result {
                refused.push(format!("{}: `{line}`:\n{why}", file.display()));
            }
            checked += 1;
        }
    }
    assert!(checked >= 25, "{checked} command lines");
    assert!(refused.is_empty(), "{}", refused.join("\n"));
}

#[test]
fn a_refused_example_is_found() {
    let text = "```sh\nmesh-proxy --node default/a \\\n  --transparent  # bare\nmeshctl stat reviews -n shop > out.txt\n```\n`mesh-proxy --bogus` outside a block\n";
    let lines = command_lines(text);
    assert_eq!(
        lines,
        [
            "mesh-proxy --node default/a  --transparent  # bare",
            "meshctl stat reviews -n shop > out.txt"
        ]
    );
    let first = argv(&lines[0]).expect("words");
    assert!(
        parse(&first)
            .expect_err("a bare --transparent")
            .contains("--transparent")
    );
    let second = argv(&lines[1]).expect("words");
    assert_eq!(second, ["meshctl", "stat", "reviews", "-n", "shop"]);
    assert_eq!(parse(&second), Ok(()));
}
