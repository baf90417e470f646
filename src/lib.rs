//! volley
