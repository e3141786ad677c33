//! Humane durations and sizes.
