//! [`Row`]: one figure of the table, with its target and the reference measured in the same
//! run; [`render_markdown`] and [`render_json`] print a list of them.

use std::fmt::Write as _;

use serde::Serialize;

/// What a figure must reach.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Target {
    /// The value must be at most this.
    AtMost(f64),
    /// The value must be at least this.
    AtLeast(f64),
    /// No target: the figure is a reference, or reported for what it shows.
    Reported,
}

impl Target {
    /// The threshold.
    pub fn threshold(self) -> f64 {
        match self {
            Self::AtMost(value) | Self::AtLeast(value) => value,
            Self::Reported => f64::NAN,
        }
    }

    /// Whether `value` meets this target.
    pub fn is_met_by(self, value: f64) -> bool {
        match self {
            Self::AtMost(limit) => value <= limit,
            Self::AtLeast(floor) => value >= floor,
            Self::Reported => true,
        }
    }
}

/// A figure measured in the same run for comparison (a ceiling or a floor of the machine).
#[derive(Debug, Clone, PartialEq)]
pub struct Reference {
    /// What was measured, e.g. "raw TCP ping-pong p50".
    pub label: String,
    /// Its value, in the row's unit.
    pub value: f64,
}

/// One line of the table.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// The figure, e.g. "direct latency p50 (peer runtime)".
    pub name: String,
    /// The measured value; `None` when it could not be measured (see `note`).
    pub value: Option<f64>,
    /// The unit of `value`, the target and the reference.
    pub unit: &'static str,
    /// What the project asks of the figure.
    pub target: Target,
    /// How the target reads in the table when it is not a plain number (e.g. "raw + 15 µs").
    pub target_text: Option<String>,
    /// The reference measured in the same run, if the row has one.
    pub reference: Option<Reference>,
    /// Anything a reader needs to interpret the value (what bounds it, what was skipped).
    pub note: Option<String>,
}

impl Row {
    /// A row with a value and target, no reference and no note.
    pub fn new(name: impl Into<String>, value: f64, unit: &'static str, target: Target) -> Self {
        Self {
            name: name.into(),
            value: Some(value),
            unit,
            target,
            target_text: None,
            reference: None,
            note: None,
        }
    }

    /// A row whose figure could not be measured, saying why.
    pub fn unmeasured(
        name: impl Into<String>,
        unit: &'static str,
        target: Target,
        why: impl Into<String>,
    ) -> Self {
        Self {
            value: None,
            note: Some(why.into()),
            ..Self::new(name, f64::NAN, unit, target)
        }
    }

    /// Adds the reference measured in the same run.
    pub fn with_reference(mut self, label: impl Into<String>, value: f64) -> Self {
        self.reference = Some(Reference {
            label: label.into(),
            value,
        });
        self
    }

    /// Sets how the target reads.
    pub fn with_target_text(mut self, text: impl Into<String>) -> Self {
        self.target_text = Some(text.into());
        self
    }

    /// Adds a note.
    pub fn with_note(mut self, note: impl Into<String>) -> Self {
        self.note = Some(note.into());
        self
    }

    /// `value / reference`, when both are known and the reference is not zero.
    pub fn ratio(&self) -> Option<f64> {
        let value = self.value?;
        let reference = self.reference.as_ref()?.value;
        (reference != 0.0 && value.is_finite() && reference.is_finite()).then(|| value / reference)
    }

    /// Whether the value meets the target (an unmeasured value does not).
    pub fn meets(&self) -> bool {
        self.value
            .is_some_and(|value| value.is_finite() && self.target.is_met_by(value))
    }
}

/// The JSON shape of a row (`--json`).
#[derive(Debug, Serialize)]
struct JsonRow<'a> {
    name: &'a str,
    value: Option<f64>,
    unit: &'a str,
    target: f64,
    reference: Option<f64>,
    ratio: Option<f64>,
    meets: bool,
    target_text: String,
    reference_label: Option<&'a str>,
    note: Option<&'a str>,
}

/// The rows as a JSON array of objects with `name`, `value`, `unit`, `target`, `reference`,
/// `ratio` and `meets` (plus `target_text`, `reference_label` and `note` for people).
pub fn render_json(rows: &[Row]) -> String {
    let json: Vec<JsonRow<'_>> = rows
        .iter()
        .map(|row| JsonRow {
            name: &row.name,
            value: row.value.filter(|value| value.is_finite()),
            unit: row.unit,
            target: row.target.threshold(),
            reference: row.reference.as_ref().map(|reference| reference.value),
            ratio: row.ratio(),
            meets: row.meets(),
            target_text: target_text(row),
            reference_label: row
                .reference
                .as_ref()
                .map(|reference| reference.label.as_str()),
            note: row.note.as_deref(),
        })
        .collect();
    // Serialising plain numbers, strings and options cannot fail.
    serde_json::to_string_pretty(&json).unwrap_or_else(|_| "[]".to_owned())
}

/// The rows as one markdown table: figure, value, target, reference, ratio, meets; notes
/// follow the table as a numbered list.
pub fn render_markdown(rows: &[Row]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| figure | value | target | reference (same run) | ratio | meets |"
    );
    let _ = writeln!(out, "| --- | ---: | --- | --- | ---: | :---: |");
    let mut notes = Vec::new();
    for row in rows {
        let mut name = row.name.clone();
        if let Some(note) = &row.note {
            notes.push(note.clone());
            let _ = write!(name, " [{}]", notes.len());
        }
        let value = match row.value {
            Some(value) if value.is_finite() => format!("{} {}", number(value), row.unit),
            _ => "not measured".to_owned(),
        };
        let reference = match &row.reference {
            Some(reference) => format!(
                "{}: {} {}",
                reference.label,
                number(reference.value),
                row.unit
            ),
            None => "—".to_owned(),
        };
        let ratio = row
            .ratio()
            .map_or_else(|| "—".to_owned(), |ratio| format!("{ratio:.2}×"));
        let meets = if row.meets() { "yes" } else { "**no**" };
        let _ = writeln!(
            out,
            "| {name} | {value} | {} | {reference} | {ratio} | {meets} |",
            target_text(row)
        );
    }
    if !notes.is_empty() {
        out.push('\n');
        for (index, note) in notes.iter().enumerate() {
            let _ = writeln!(out, "{}. {note}", index + 1);
        }
    }
    out
}

fn target_text(row: &Row) -> String {
    let (sign, value) = match row.target {
        Target::AtMost(value) => ("≤", value),
        Target::AtLeast(value) => ("≥", value),
        Target::Reported => {
            return row
                .target_text
                .clone()
                .unwrap_or_else(|| "reported".to_owned());
        }
    };
    let plain = format!("{sign} {} {}", number(value), row.unit);
    match &row.target_text {
        Some(text) => format!("{plain} ({text})"),
        None => plain,
    }
}

/// A number for people: thousands separated, sensible decimals.
pub fn number(value: f64) -> String {
    if !value.is_finite() {
        return value.to_string();
    }
    let magnitude = value.abs();
    if magnitude >= 1000.0 {
        let rounded = value.round() as i64;
        let digits = rounded.unsigned_abs().to_string();
        let mut grouped = String::new();
        for (index, digit) in digits.chars().enumerate() {
            if index > 0 && (digits.len() - index).is_multiple_of(3) {
                grouped.push(',');
            }
            grouped.push(digit);
        }
        if rounded < 0 {
            grouped.insert(0, '-');
        }
        grouped
    } else if magnitude >= 100.0 {
        format!("{value:.0}")
    } else if magnitude >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_well() {
        assert_eq!(number(1_234_567.4), "1,234,567");
        assert_eq!(number(150_000.0), "150,000");
        assert_eq!(number(999.0), "999");
        assert_eq!(number(42.25), "42.2");
        assert_eq!(number(4.256), "4.26");
    }

    #[test]
    fn ratio_and_meets_follow_the_target() {
        let row = Row::new("x", 30.0, "µs", Target::AtMost(40.0)).with_reference("raw", 20.0);
        assert_eq!(row.ratio(), Some(1.5));
        assert!(row.meets());
        let row = Row::new("y", 100.0, "msg/s", Target::AtLeast(150.0));
        assert!(!row.meets());
        assert_eq!(row.ratio(), None);
        let row = Row::unmeasured("z", "MiB", Target::AtMost(15.0), "binary not built");
        assert!(!row.meets());
    }

    #[test]
    fn json_has_the_required_fields() {
        let rows = [Row::new("x", 30.0, "µs", Target::AtMost(40.0)).with_reference("raw", 20.0)];
        let parsed: serde_json::Value = serde_json::from_str(&render_json(&rows)).unwrap();
        let object = &parsed[0];
        for field in [
            "name",
            "value",
            "unit",
            "target",
            "reference",
            "ratio",
            "meets",
        ] {
            assert!(object.get(field).is_some(), "missing {field}");
        }
        assert_eq!(object["meets"], serde_json::Value::Bool(true));
    }
}
