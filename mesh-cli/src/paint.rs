//! Colors, only on a terminal and only without `NO_COLOR`.

use std::io::IsTerminal;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Paint {
    on: bool,
}

/// Which color a piece of text gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Style {
    #[default]
    Plain,
    Bold,
    Dim,
    Red,
    RedBold,
    Green,
    Yellow,
    Cyan,
}

impl Style {
    fn sgr(self) -> Option<&'static str> {
        match self {
            Style::Plain => None,
            Style::Bold => Some("1"),
            Style::Dim => Some("2"),
            Style::Red => Some("31"),
            Style::RedBold => Some("1;31"),
            Style::Green => Some("32"),
            Style::Yellow => Some("33"),
            Style::Cyan => Some("36"),
        }
    }
}

fn no_color() -> bool {
    std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty())
}

impl Paint {
    pub fn stdout() -> Self {
        Paint {
            on: std::io::stdout().is_terminal() && !no_color(),
        }
    }

    pub fn stderr() -> Self {
        Paint {
            on: std::io::stderr().is_terminal() && !no_color(),
        }
    }

    /// No colors (tests, JSON).
    pub fn off() -> Self {
        Paint { on: false }
    }

    pub fn is_on(&self) -> bool {
        self.on
    }

    pub fn style(&self, style: Style, text: &str) -> String {
        match (self.on, style.sgr()) {
            (true, Some(code)) => format!("\x1b[{code}m{text}\x1b[0m"),
            _ => text.to_owned(),
        }
    }

    pub fn bold(&self, t: &str) -> String {
        self.style(Style::Bold, t)
    }
    pub fn dim(&self, t: &str) -> String {
        self.style(Style::Dim, t)
    }
    pub fn red(&self, t: &str) -> String {
        self.style(Style::Red, t)
    }
    pub fn red_bold(&self, t: &str) -> String {
        self.style(Style::RedBold, t)
    }
    pub fn green(&self, t: &str) -> String {
        self.style(Style::Green, t)
    }
    pub fn yellow(&self, t: &str) -> String {
        self.style(Style::Yellow, t)
    }
    pub fn cyan(&self, t: &str) -> String {
        self.style(Style::Cyan, t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_means_plain_text() {
        assert_eq!(Paint::off().red("x"), "x");
        assert_eq!(Paint { on: true }.red("x"), "\x1b[31mx\x1b[0m");
        assert_eq!(Paint { on: true }.style(Style::Plain, "x"), "x");
    }
}
