//! How results reach the terminal or a script: a plain table for people,
//! JSON (one document, or one per line) for machines, a broken pipe treated
//! as the reader having had enough.
//!
//! The tables are a few lines of column padding rather than a table crate:
//! the columns are short and fixed, and replay-tool stays lean.

use std::io::{self, IsTerminal, Write};

/// Whether stdout is a terminal (tables) or not (JSON lines).
pub fn stdout_is_terminal() -> bool {
    io::stdout().is_terminal()
}

/// Whether stderr is a terminal (progress bars) or not (plain lines).
pub fn stderr_is_terminal() -> bool {
    io::stderr().is_terminal()
}

/// Prints `rows` under `header`, each column as wide as its widest cell.
pub fn table(out: &mut impl Write, header: &[&str], rows: &[Vec<String>]) -> io::Result<()> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |out: &mut dyn Write, cells: &mut dyn Iterator<Item = &str>| -> io::Result<()> {
        let mut text = String::new();
        for (index, cell) in cells.enumerate() {
            if index > 0 {
                text.push_str("  ");
            }
            text.push_str(cell);
            let pad = widths[index].saturating_sub(cell.chars().count());
            if index + 1 < widths.len() {
                text.extend(std::iter::repeat_n(' ', pad));
            }
        }
        writeln!(out, "{}", text.trim_end())
    };
    line(out, &mut header.iter().copied())?;
    for row in rows {
        line(out, &mut row.iter().map(String::as_str))?;
    }
    Ok(())
}

/// Writes one JSON document and a newline.
pub fn json_line(out: &mut impl Write, value: &impl serde::Serialize) -> io::Result<()> {
    serde_json::to_writer(&mut *out, value)?;
    out.write_all(b"\n")
}

/// Writes one JSON document, indented.
pub fn json_pretty(out: &mut impl Write, value: &impl serde::Serialize) -> io::Result<()> {
    serde_json::to_writer_pretty(&mut *out, value)?;
    out.write_all(b"\n")
}

/// A buffered stdout (flush it with [`done`]).
pub fn stdout() -> io::BufWriter<io::Stdout> {
    io::BufWriter::with_capacity(1 << 16, io::stdout())
}

/// Whether writing may go on: `Ok(false)` when the reader closed the pipe
/// (`| head`), which is not an error.
pub fn written(result: io::Result<()>) -> anyhow::Result<bool> {
    match result {
        Ok(()) => Ok(true),
        Err(error) if error.kind() == io::ErrorKind::BrokenPipe => Ok(false),
        Err(error) => Err(anyhow::Error::new(error).context("writing to stdout")),
    }
}

/// Flushes `out`.
pub fn done(out: &mut impl Write) -> anyhow::Result<()> {
    written(out.flush()).map(drop)
}

/// Shortens `text` to `max` characters for a table cell.
pub fn cell(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_owned()
    } else {
        let mut short: String = text.chars().take(max.saturating_sub(1)).collect();
        short.push('…');
        short
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_pads_columns_to_their_widest_cell() {
        let mut out = Vec::new();
        table(
            &mut out,
            &["a", "bb"],
            &[
                vec!["long".into(), "x".into()],
                vec!["y".into(), "z".into()],
            ],
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "a     bb\nlong  x\ny     z\n"
        );
        assert_eq!(cell("abcdef", 4), "abc…");
    }
}
