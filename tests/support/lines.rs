//! The lines a child process prints, read on a thread of their own so that
//! a test can wait for them with a bound (`recv_timeout`).

use std::io::{BufRead, BufReader, Read};
use std::sync::mpsc;

/// Sends each line of `stdout` to the receiver returned, until the stream
/// ends or the receiver is dropped.
pub fn lines(stdout: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    lines
}
