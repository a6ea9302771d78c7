//! The control socket's request decoder gets whatever a local caller sends.
//! Properties: it never panics; what it accepts survives a round trip
//! through the wire format unchanged (so the audit record of a request is
//! the request); an accepted `events` filter is either usable or refused
//! with a message, never a panic.
#![no_main]

use std::time::SystemTime;

use agentd::{
    audit::query::Matcher,
    control::{Request, decode},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|line: &[u8]| {
    let Ok(request) = decode(line) else {
        return;
    };
    let wire = serde_json::to_vec(&request).expect("a decoded request serializes");
    let again = decode(&wire).expect("a serialized request decodes");
    assert_eq!(request, again, "round trip changed the request");
    if let Request::Events { filter, .. } = &request
        && let Err(message) = Matcher::new(filter, SystemTime::now())
    {
        assert!(!message.is_empty());
    }
});
