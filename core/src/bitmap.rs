//! bitmap (being written)
