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

/// A table for people, as kubectl prints one: a header row in capitals, columns two spaces
/// apart, no borders, numbers aligned right; every line indented by [`Table::indent`].
#[derive(Debug)]
pub struct Table {
    inner: comfy_table::Table,
    right: Vec<usize>,
    indent: &'static str,
}

impl Table {
    pub fn new<I, S>(header: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<comfy_table::Cell>,
    {
        let mut inner = comfy_table::Table::new();
        inner
            .load_preset(comfy_table::presets::NOTHING)
            .set_content_arrangement(comfy_table::ContentArrangement::Disabled)
            .set_header(header.into_iter().map(Into::into).collect::<Vec<_>>());
        Self {
            inner,
            right: Vec::new(),
            indent: "",
        }
    }

    /// Aligns the columns at `columns` (0-based) right.
    pub fn right(mut self, columns: &[usize]) -> Self {
        self.right.extend_from_slice(columns);
        self
    }

    /// Indents every line by `indent`.
    pub fn indent(mut self, indent: &'static str) -> Self {
        self.indent = indent;
        self
    }

    pub fn row<I, S>(&mut self, cells: I) -> &mut Self
    where
        I: IntoIterator<Item = S>,
        S: std::fmt::Display,
    {
        self.inner
            .add_row(cells.into_iter().map(|c| c.to_string()).collect::<Vec<_>>());
        self
    }

    pub fn write(mut self, out: &mut dyn Write) -> std::io::Result<()> {
        let last = self.inner.column_count().saturating_sub(1);
        for (i, c) in self.inner.column_iter_mut().enumerate() {
            c.set_padding((0, if i == last { 0 } else { 2 }));
            if self.right.contains(&i) {
                c.set_cell_alignment(comfy_table::CellAlignment::Right);
            }
        }
        for line in self.inner.lines() {
            writeln!(out, "{}{}", self.indent, line.trim_end())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_is_aligned_columns_two_spaces_apart() {
        let mut t = Table::new(["NAME", "RPS", "NOTE"]).right(&[1]).indent("  ");
        t.row(["reviews-v1", "12.5", "ok"])
            .row(["v2", "1,200.0", ""]);
        let mut out = Vec::new();
        t.write(&mut out).expect("write");
        assert_eq!(
            String::from_utf8_lossy(&out),
            "  NAME            RPS  NOTE\n  reviews-v1     12.5  ok\n  v2          1,200.0\n"
        );
    }

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
