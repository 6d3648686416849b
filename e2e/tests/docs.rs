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

/// Our binaries, as a command line names them.
const BINARIES: [&str; 4] = ["meshctl", "mesh-proxy", "mesh-controller", "mesh-ca"];

/// One shell command as the binary it runs would see it: `cargo run [-p] NAME [..] --`, a
/// `./target/<profile>/` path and leading `VAR=value` words taken off; `None` when it runs
/// none of ours.
fn ours(words: &[String]) -> Option<Vec<String>> {
    let mut w: Vec<String> = words
        .iter()
        .skip_while(|w| w.contains('=') && !w.starts_with('-'))
        .cloned()
        .collect();
    if w.first().is_some_and(|c| c == "sudo") {
        w.remove(0);
    }
    if w.len() > 1 && w[0] == "cargo" && w[1] == "run" {
        // `-p NAME` of cargo's own words, before `--`.
        let cargo_words = w.iter().position(|a| a == "--").unwrap_or(w.len());
        let name = w[..cargo_words]
            .iter()
            .position(|a| a == "-p" || a == "--package")
            .and_then(|i| w[..cargo_words].get(i + 1))?
            .clone();
        let rest = match w.iter().position(|a| a == "--") {
            Some(i) => w[i + 1..].to_vec(),
            None => Vec::new(),
        };
        w = std::iter::once(name).chain(rest).collect();
    }
    let program = w.first()?.rsplit('/').next()?.to_owned();
    BINARIES.contains(&program.as_str()).then(|| {
        w[0] = program;
        w
    })
}

/// The command lines of a Markdown text's fenced code blocks (``` or ~~~, indented in a
/// list or not), continuation lines joined and a leading `$ ` taken off, each split into the
/// shell commands it runs (at `|`, `&&`, `||`, `;` and `&`).
fn command_lines(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_block = false;
    let mut pending = String::new();
    for line in text.lines() {
        let fence = line.trim_start();
        if fence.starts_with("```") || fence.starts_with("~~~") {
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
        if BINARIES.iter().any(|b| whole.contains(b)) {
            out.push(whole.to_owned());
        }
    }
    out
}

/// The commands of a line that run one of our binaries, each as the words the binary gets:
/// a comment dropped, the line split at `|`, `&&`, `||`, `;` and `&`, a redirection and what
/// it names taken off.
fn commands(line: &str) -> Result<Vec<Vec<String>>, String> {
    let words = shlex::split(line).ok_or("unbalanced quotes")?;
    let mut out = Vec::new();
    let mut current: Vec<String> = Vec::new();
    let mut skip_next = false;
    // shlex drops comments already; a `#` left is in quotes, an argument.
    for w in words {
        if skip_next {
            skip_next = false;
            continue;
        }
        if ["|", "&&", "||", ";", "&"].contains(&w.as_str()) {
            out.extend(ours(&std::mem::take(&mut current)));
            continue;
        }
        if [">", ">>", "<", "2>"].contains(&w.as_str()) {
            skip_next = true;
            continue;
        }
        if w.starts_with('>') || w.starts_with("2>") || w.starts_with('<') {
            continue;
        }
        current.push(w);
    }
    out.extend(ours(&current));
    Ok(out)
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
    let mut files = vec![
        root.join("README.md"),
        root.join("e2e/kind/README.md"),
        root.join("deploy/README.md"),
    ];
    markdown(&root.join("docs"), &mut files);
    let mut checked = std::collections::BTreeMap::new();
    let mut refused = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).expect("a Markdown file");
        let name = file
            .strip_prefix(&root)
            .unwrap_or(file)
            .display()
            .to_string();
        for line in command_lines(&text) {
            // A line that names a binary in prose or output, not a command, may not split.
            let command_like = ["cargo ", "./", "sudo ", "$ "]
                .iter()
                .chain(BINARIES.iter())
                .any(|p| line.starts_with(p));
            match commands(&line) {
                Err(_) if !command_like => {}
                Ok(cmds) => {
                    for args in cmds {
                        if let Err(why) = parse(&args) {
                            refused.push(format!("{name}: `{line}`:\n{why}"));
                        }
                        *checked.entry(name.clone()).or_insert(0) += 1;
                    }
                }
                Err(why) => refused.push(format!("{name}: `{line}`: {why}")),
            }
        }
    }
    assert!(refused.is_empty(), "{}", refused.join("\n"));
    // The files whose examples users copy first each had their command lines read.
    for must in [
        "README.md",
        "docs/local-mesh.md",
        "docs/gateway.md",
        "docs/kubernetes.md",
    ] {
        assert!(
            checked.get(must).copied().unwrap_or(0) >= 2,
            "{must}: {checked:?}"
        );
    }
    assert!(checked.values().sum::<usize>() >= 35, "{checked:?}");
}

#[test]
fn a_refused_example_is_found() {
    let text = "```sh\nmesh-proxy --node default/a \\\n  --transparent  # bare\nmeshctl stat reviews -n shop > out.txt\n```\n`mesh-proxy --bogus` outside a block\n";
    let lines = command_lines(text);
    let wrapped = "MESH_LOG=debug cargo run -q -p mesh-ca -- token --dir d --service-account a > t && ./target/release/meshctl version --client | head -1 &";
    assert_eq!(
        commands(wrapped).expect("words"),
        [
            vec!["mesh-ca", "token", "--dir", "d", "--service-account", "a"],
            vec!["meshctl", "version", "--client"]
        ]
    );
    assert_eq!(
        lines,
        [
            "mesh-proxy --node default/a  --transparent  # bare",
            "meshctl stat reviews -n shop > out.txt"
        ]
    );
    let first = commands(&lines[0]).expect("words").remove(0);
    assert!(
        parse(&first)
            .expect_err("a bare --transparent")
            .contains("--transparent")
    );
    let second = commands(&lines[1]).expect("words").remove(0);
    assert_eq!(second, ["meshctl", "stat", "reviews", "-n", "shop"]);
    assert_eq!(parse(&second), Ok(()));
}
