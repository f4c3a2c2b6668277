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
    // a port block below the kernel's ephemeral range (32768+), where port-0 listeners and
    // outgoing connections of other tests live; retried on another block if it is taken
    let mut attempt = 0u16;
    let (mut child, rx, printed) = loop {
        let base = 20_000
            + u16::try_from((std::process::id() + u32::from(attempt) * 7) % 12).unwrap_or(0)
                * 1_000;
        let log = std::env::temp_dir().join(format!(
            "meshgate-dev-test-{}-{attempt}.log",
            std::process::id()
        ));
        let mut child = Command::new(env!("CARGO_BIN_EXE_meshgate"))
            .args(["dev", "--port-base", &base.to_string()])
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log file"))
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
        let ready = loop {
            match rx.recv_timeout(Duration::from_secs(60)) {
                Ok(line) if line == "ready" => break true,
                Ok(line) => printed.push(line),
                Err(_) => break false,
            }
        };
        if ready {
            break (child, rx, printed);
        }
        let _ = child.kill();
        let _ = child.wait();
        let err = std::fs::read_to_string(&log).unwrap_or_default();
        attempt += 1;
        assert!(
            attempt < 3 && err.contains("in use"),
            "meshgate dev did not print 'ready' (base {base}):\n{err}"
        );
    };
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
