//! Discovery server library (filled in by the discovery issue).
