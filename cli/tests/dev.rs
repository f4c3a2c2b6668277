//! `meshgate dev` as a user runs it: start it, read what it printed, run every printed curl
//! line, check the documented status codes, stop it with Ctrl-C (SIGINT).

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    sync::mpsc,
    time::Duration,
};

#[test]
fn dev_prints_working_curl_lines_and_stops_on_ctrl_c() {
    if Command::new("curl").arg("--version").output().is_err() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run the dev test, but curl is missing"
        );
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), "SKIPPED dev test: curl is not installed");
        return;
    }
    // a port block unlikely to collide with anything else running
    let base = 20_000 + u16::try_from(std::process::id() % 40).unwrap_or(0) * 1_000;
    let mut child = Command::new(env!("CARGO_BIN_EXE_meshgate"))
        .args(["dev", "--port-base", &base.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn meshgate dev");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut printed = Vec::new();
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("meshgate dev printed 'ready' within 60s");
        if line == "ready" {
            break;
        }
        printed.push(line);
    }
    let curls: Vec<(String, String)> = printed
        .iter()
        .filter_map(|l| {
            let l = l.trim();
            let (cmd, expect) = l.split_once("# expect ")?;
            (cmd.starts_with("curl ") || cmd.starts_with("for "))
                .then(|| (cmd.trim().to_owned(), expect.trim().to_owned()))
        })
        .collect();
    assert!(curls.len() >= 9, "dev printed curl lines: {printed:#?}");
    for (cmd, expect) in &curls {
        let out = Command::new("sh")
            .args(["-c", cmd])
            .output()
            .expect("run curl");
        let text = String::from_utf8_lossy(&out.stdout);
        let status = text.lines().last().unwrap_or_default().trim().to_owned();
        assert_eq!(&status, expect, "{cmd}\n{text}");
    }
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            assert!(status.success(), "{status}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "meshgate dev did not stop on Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let rest: Vec<String> = rx.try_iter().collect();
    assert!(rest.iter().any(|l| l == "stopped"), "{rest:?}");
}
