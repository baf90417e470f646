//! volley-dataset
