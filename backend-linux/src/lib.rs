//! Linux backend (being written).
