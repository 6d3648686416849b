//! The output formats of every command that prints (`-o table|json|yaml`), in one place: the
//! table is each command's own, JSON and YAML are the same data serialized.

use std::io::Write;

use serde::Serialize;

/// `-o`: how a command prints what it found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// For people: each command's own table or lines.
    #[default]
    Table,
    /// Pretty-printed JSON.
    Json,
    /// YAML.
    Yaml,
}

/// Prints `v` as `output` asks: JSON or YAML of `v`, or the command's `table` of it.
pub fn print<T: Serialize + ?Sized>(
    output: Output,
    v: &T,
    out: &mut dyn Write,
    table: impl FnOnce(&T, &mut dyn Write) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    match output {
        Output::Json => writeln!(out, "{}", serde_json::to_string_pretty(v)?)?,
        Output::Yaml => write!(out, "{}", serde_norway::to_string(v)?)?,
        Output::Table => table(v, out)?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_and_yaml_are_the_data_and_the_table_is_the_commands() {
        let v = serde_json::json!({"a": [1, 2]});
        let table = |v: &serde_json::Value, out: &mut dyn Write| -> anyhow::Result<()> {
            Ok(writeln!(out, "A {}", v["a"][1])?)
        };
        let mut out = Vec::new();
        print(Output::Json, &v, &mut out, table).expect("json");
        let back: serde_json::Value = serde_json::from_slice(&out).expect("parses");
        assert_eq!(back, v);
        let mut out = Vec::new();
        print(Output::Yaml, &v, &mut out, table).expect("yaml");
        let back: serde_json::Value = serde_norway::from_slice(&out).expect("parses");
        assert_eq!(back, v);
        let mut out = Vec::new();
        print(Output::Table, &v, &mut out, table).expect("table");
        assert_eq!(out, b"A 2\n");
    }
}
