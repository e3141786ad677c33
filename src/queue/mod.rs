//! The durable job queue behind one trait.
