//! What provisioning did, or would do: one line per object.

use std::fmt;

/// What happens to one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Create,
    Update,
    Unchanged,
    /// Exists but the description no longer names it (reported, never removed silently).
    Stale,
    /// Differs in a way the server cannot change in place.
    CannotChange,
}

/// One object and what happens to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// `stream WNODES_EVENTS`, `consumer launcher-hv01_x`, `creds launcher-hv01_x`, ...
    pub object: String,
    pub action: Action,
    /// The differences, for an update (`max_age is 1h (expected 7days)`).
    pub detail: String,
}

impl Change {
    pub fn new(object: impl Into<String>, action: Action, detail: impl Into<String>) -> Self {
        Self {
            object: object.into(),
            action,
            detail: detail.into(),
        }
    }
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verb = match self.action {
            Action::Create => "create",
            Action::Update => "update",
            Action::Unchanged => "unchanged",
            Action::Stale => "stale",
            Action::CannotChange => "cannot change",
        };
        write!(f, "{verb:>13}  {}", self.object)?;
        if !self.detail.is_empty() {
            write!(f, ": {}", self.detail)?;
        }
        Ok(())
    }
}

/// The changes of one run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub changes: Vec<Change>,
}

impl Report {
    pub fn push(&mut self, c: Change) {
        self.changes.push(c);
    }

    pub fn count(&self, action: &Action) -> usize {
        self.changes.iter().filter(|c| &c.action == action).count()
    }

    /// Nothing was (or would be) created or changed, and nothing is refused.
    pub fn is_noop(&self) -> bool {
        self.changes
            .iter()
            .all(|c| matches!(c.action, Action::Unchanged | Action::Stale))
    }

    /// The lines that say something (everything but `unchanged`).
    pub fn notable(&self) -> impl Iterator<Item = &Change> {
        self.changes
            .iter()
            .filter(|c| c.action != Action::Unchanged)
    }

    /// `3 to create, 1 to update, 40 unchanged, 0 stale, 0 cannot change`.
    pub fn summary(&self) -> String {
        format!(
            "{} to create, {} to update, {} unchanged, {} stale, {} cannot change",
            self.count(&Action::Create),
            self.count(&Action::Update),
            self.count(&Action::Unchanged),
            self.count(&Action::Stale),
            self.count(&Action::CannotChange),
        )
    }
}
