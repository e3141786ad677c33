//! serde mirror of the YAML file.
