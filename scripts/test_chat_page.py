#!/usr/bin/env python3
"""The chat page of `dsv3 serve` in a real headless browser (issue 18), run by scripts/test.sh.

Serves a random model of the tiny preset's shape (4,096-token context) with the tokenizer of
tests/fixtures/train_roundtrip and a small chat template, with an API key; opens `/` in Debian's Chromium driven by Playwright, and checks: the page loads and, once the
key is typed, names the model; a message sent streams a reply into the page that equals the chat
endpoint's greedy answer for the same conversation (temperature 0 and the token limit set in the
page's fields); Stop aborts a long answer; the page fetched nothing from any other host. A
screenshot is saved to target/chat-page.png.

Usage: python scripts/test_chat_page.py DSV3_BINARY [CHROMIUM]
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.request

from playwright.sync_api import sync_playwright

from dsv3_server import serve  # scripts/dsv3_server.py

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")


def chat(port, messages, max_tokens):
    body = json.dumps({"messages": messages, "max_tokens": max_tokens, "temperature": 0}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json", "Authorization": "Bearer secret"})
    return json.load(urllib.request.urlopen(req, timeout=30))["choices"][0]["message"]["content"]


def main():
    binary = sys.argv[1]
    chromium = sys.argv[2] if len(sys.argv) > 2 else shutil.which("chromium") or "/usr/bin/chromium"
    tmp = tempfile.mkdtemp(prefix="dsv3-page-")
    src = os.path.join(ROOT, "tests", "fixtures", "train_roundtrip")
    # The preset's config with the fixture tokenizer's 300-id vocabulary.
    subprocess.run([binary, "random-model", "--preset", "tiny", "--out", tmp], check=True, capture_output=True)
    cfg = json.load(open(os.path.join(tmp, "config.json")))
    cfg["vocab_size"] = 300
    json.dump(cfg, open(os.path.join(tmp, "preset.json"), "w"))
    subprocess.run([binary, "random-model", "--preset", os.path.join(tmp, "preset.json"), "--out", tmp], check=True,
                   capture_output=True)
    shutil.copy(os.path.join(src, "tokenizer.json"), tmp)
    tc = json.load(open(os.path.join(src, "tokenizer_config.json")))
    tc["chat_template"] = TEMPLATE
    json.dump(tc, open(os.path.join(tmp, "tokenizer_config.json"), "w"))
    server, port = serve(binary, tmp, "--api-key", "secret")
    shot = os.path.join(ROOT, "target", "chat-page.png")
    try:
        base = f"http://127.0.0.1:{port}"
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True,
                                        args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page()
            hosts = set()
            page.on("request", lambda r: hosts.add(r.url.split("/")[2]))
            page.goto(base + "/")
            assert page.title() == "dsv3", page.title()
            page.wait_for_selector("#model:has-text('not connected')")  # the key is required
            page.fill("#key", "secret")
            page.dispatch_event("#key", "change")
            page.wait_for_selector(f"#model:has-text('{os.path.basename(tmp)}')")

            page.fill("#temperature", "0")
            page.fill("#max_tokens", "12")
            page.fill("#input", "fn main")
            page.press("#input", "Enter")
            page.wait_for_selector(".assistant[data-done='true']", timeout=30000)
            shown = page.inner_text(".assistant .answer")
            want = chat(port, [{"role": "user", "content": "fn main"}], 12)
            assert shown == want, (shown, want)
            assert page.inner_text(".user") == "fn main"
            assert "tokens" in page.inner_text(".assistant .stats")

            # A long answer (3,000 tokens, seconds on this model) stopped by the button at once.
            page.fill("#max_tokens", "3000")
            page.fill("#input", "impl Mla {")
            # Send and Stop in one tick of the page (send enables Stop before its first await), so
            # that the answer cannot end between two round trips of the driver.
            page.evaluate("() => { document.getElementById('send').click(); document.getElementById('stop').click(); }")
            page.wait_for_selector(".assistant:nth-of-type(4)[data-done='true']", timeout=30000)
            assert "stopped" in page.inner_text(".assistant:nth-of-type(4) .error")
            page.screenshot(path=shot, full_page=True)
            browser.close()
        assert hosts == {f"127.0.0.1:{port}"}, hosts
    finally:
        server.send_signal(signal.SIGINT)
        code = server.wait(timeout=30)
        err = server.stderr.read()
        shutil.rmtree(tmp, ignore_errors=True)
    assert code == 0 and "panicked" not in err, err
    print(f"chat page: ok (Chromium through Playwright; screenshot {os.path.relpath(shot, ROOT)})")


if __name__ == "__main__":
    main()
