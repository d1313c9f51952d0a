//! A child process's output, kept line by line as it comes, for a rig or a bench to search.

use std::io::{BufRead, BufReader, Read};
use std::sync::{Arc, Mutex};

/// Reads `from` on a thread of its own until it ends; every line is pushed to the returned list.
pub fn collect(from: impl Read + Send + 'static) -> Arc<Mutex<Vec<String>>> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let keep = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines().map_while(Result::ok) {
            keep.lock().unwrap_or_else(|e| e.into_inner()).push(line);
        }
    });
    lines
}
