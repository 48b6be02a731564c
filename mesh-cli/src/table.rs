//! Plain-text tables: columns sized to their widest cell, numbers aligned
//! right, colors that do not disturb the alignment.

use crate::paint::{Paint, Style};

#[derive(Debug, Clone, Default)]
pub struct Table {
    head: Vec<(String, bool)>,
    rows: Vec<Vec<(String, Style)>>,
}

impl Table {
    /// Columns; a name ending in `>` is aligned right (the `>` is dropped).
    pub fn new(columns: &[&str]) -> Self {
        Table {
            head: columns
                .iter()
                .map(|c| match c.strip_suffix('>') {
                    Some(c) => (c.to_owned(), true),
                    None => ((*c).to_owned(), false),
                })
                .collect(),
            rows: Vec::new(),
        }
    }

    /// A row of plain cells.
    pub fn row<S: Into<String>>(&mut self, cells: impl IntoIterator<Item = S>) {
        self.styled(cells.into_iter().map(|c| (c.into(), Style::Plain)));
    }

    /// A row of cells with their styles.
    pub fn styled(&mut self, cells: impl IntoIterator<Item = (String, Style)>) {
        let mut row: Vec<(String, Style)> = cells.into_iter().collect();
        row.resize(self.head.len(), (String::new(), Style::Plain));
        self.rows.push(row);
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn render(&self, paint: &Paint) -> String {
        let widths: Vec<usize> = (0..self.head.len())
            .map(|i| {
                self.rows
                    .iter()
                    .map(|r| r[i].0.chars().count())
                    .chain(std::iter::once(self.head[i].0.chars().count()))
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |cells: Vec<(String, Style)>| -> String {
            let last = cells.len().saturating_sub(1);
            let mut out = String::new();
            for (i, (text, style)) in cells.into_iter().enumerate() {
                let pad = widths[i].saturating_sub(text.chars().count());
                let right = self.head[i].1;
                if right {
                    out.push_str(&" ".repeat(pad));
                }
                out.push_str(&paint.style(style, &text));
                if !right && i != last {
                    out.push_str(&" ".repeat(pad));
                }
                if i != last {
                    out.push_str("  ");
                }
            }
            out.truncate(out.trim_end().len());
            out.push('\n');
            out
        };
        let mut out = line(
            self.head
                .iter()
                .map(|(h, _)| (h.clone(), Style::Bold))
                .collect(),
        );
        for r in &self.rows {
            out.push_str(&line(r.clone()));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align() {
        let mut t = Table::new(&["NAME", "BYTES>", "NOTE"]);
        t.row(["a", "1 B", "x"]);
        t.row(["longer", "12.00 KiB", ""]);
        assert_eq!(
            t.render(&Paint::off()),
            "NAME        BYTES  NOTE\n\
             a             1 B  x\n\
             longer  12.00 KiB\n"
        );
    }
}
