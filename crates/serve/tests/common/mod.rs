//! A served copy of the dsv3-trained fixture and small client helpers, shared by the server tests.
#![allow(dead_code)] // each test file uses its own share of the helpers

use dsv3_model::{DeepseekV3, Tokenizer};
use dsv3_serve::{build, serve_on, ServeOptions};
use serde_json::{json, Value};
use std::path::PathBuf;

pub fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/train_roundtrip")
}

/// The small chat template of [`start`].
pub const TEMPLATE: &str = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}";

/// A copy of the dsv3-trained fixture with a small chat template, served on a free port.
pub fn start(o: ServeOptions) -> String {
    start_with_template(o, TEMPLATE)
}

/// The same with the chat template `template`.
pub fn start_with_template(o: ServeOptions, template: &str) -> String {
    start_prepared(o, template, |_| {})
}

/// A copy of the fixture (`template` as its chat template), changed by `prepare` before it is
/// served (adapters added, say).
pub fn start_prepared(o: ServeOptions, template: &str, prepare: impl FnOnce(&mut DeepseekV3)) -> String {
    static SERVERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = SERVERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("dsv3-serve-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(fixture().join(f), dir.join(f)).unwrap();
    }
    let mut tc: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("tokenizer_config.json")).unwrap()).unwrap();
    tc["chat_template"] = json!(template);
    std::fs::write(dir.join("tokenizer_config.json"), tc.to_string()).unwrap();
    let mut model = DeepseekV3::load(&dir).unwrap();
    prepare(&mut model);
    let tok = Tokenizer::from_dir(&dir).unwrap();
    let (state, _engine) = build("fixture", model, Some(tok), vec![1], &o);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            serve_on(state, listener, std::future::pending()).await.unwrap();
        });
    });
    format!("http://{}", rx.recv().unwrap())
}

pub fn post(url: &str, body: Value) -> (u16, Value) {
    match ureq::post(url).send_json(body) {
        Ok(r) => (r.status(), r.into_json().unwrap()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_json().unwrap_or(Value::Null)),
        Err(e) => panic!("{e}"),
    }
}

/// `/metrics` value of a counter or gauge.
pub fn metric(base: &str, name: &str) -> f64 {
    let m = ureq::get(&format!("{base}/metrics")).call().unwrap().into_string().unwrap();
    m.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("{name} missing"))
        .parse()
        .unwrap()
}

/// The metric once it reads `want` (the engine updates it just after answering), or after 2 s.
pub fn settled(base: &str, name: &str, want: f64) -> f64 {
    for _ in 0..40 {
        let v = metric(base, name);
        if v == want {
            return v;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    metric(base, name)
}
