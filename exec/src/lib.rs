//! volley-exec
