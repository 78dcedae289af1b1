//! caps (being written)
