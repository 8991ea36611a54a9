#!/usr/bin/env python3
"""lm-evaluation-harness against `dsv3 serve` (issue 18), run by scripts/test.sh.

Serves tests/fixtures/train_roundtrip (a dsv3-trained checkpoint whose reference.json holds
transformers' log-probs of a token sequence) and runs lm-eval 0.4.13's `local-completions` model
on a local loglikelihood task made from that sequence: contexts and continuations cut from it, so
that each continuation's log-likelihood under transformers is a sum of reference log-probs. lm-eval
tokenizes through the server (`/tokenizer_info`, `/tokenize`, `/detokenize`: its remote tokenizer)
and scores with `/v1/completions` (`echo`, `logprobs`, token-id prompts). Every sample's
log-likelihood must agree with transformers to 1e-3, and its is-greedy flag with the reference's
top-1.

Usage: python scripts/test_lm_eval.py DSV3_BINARY
"""
import json
import os
import shutil
import signal
import sys
import tempfile
import urllib.request

from dsv3_server import serve  # scripts/dsv3_server.py

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "train_roundtrip")


def post(port, path, body):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req, timeout=30))


def docs(port, ref):
    """(context, continuation, expected log-likelihood, expected is-greedy) cut from the reference
    sequence where the server's tokenizer gives back exactly the reference's tokens."""
    ids, lps, top = ref["ids"], ref["logprobs"], ref["top5"]
    out = []
    for k in range(4, len(ids) - 4, 5):
        for n in (1, 3, 6):
            m = min(k + n, len(ids))
            context = post(port, "/detokenize", {"tokens": ids[:k]})["prompt"]
            whole = post(port, "/detokenize", {"tokens": ids[:m]})["prompt"]
            if not whole.startswith(context) or context != context.rstrip():
                continue  # lm-eval moves a context's trailing space into the continuation
            enc = lambda t: post(port, "/tokenize", {"prompt": t, "add_special_tokens": False})["tokens"]
            if enc(context) != ids[:k] or enc(whole) != ids[:m]:
                continue
            ll = sum(lps[k - 1:m - 1])
            greedy = all(top[j - 1][0] == ids[j] for j in range(k, m))
            out.append({"context": context, "continuation": whole[len(context):], "ll": ll, "greedy": greedy})
    return out


def main():
    binary = sys.argv[1]
    import lm_eval
    from lm_eval.tasks import TaskManager

    ref = json.load(open(os.path.join(FIXTURE, "reference.json")))
    tmp = tempfile.mkdtemp(prefix="dsv3-lm-eval-")
    model = os.path.join(tmp, "model")
    os.makedirs(model)
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]:
        shutil.copy(os.path.join(FIXTURE, f), model)
    server, port = serve(binary, model)
    try:
        rows = docs(port, ref)
        assert len(rows) >= 8, f"only {len(rows)} usable splits"
        data = os.path.join(tmp, "docs.jsonl")
        with open(data, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        tasks = os.path.join(tmp, "tasks")
        os.makedirs(tasks)
        with open(os.path.join(tasks, "dsv3_fixture.yaml"), "w") as f:
            f.write(f"""task: dsv3_fixture
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{continuation}}}}"
target_delimiter: ""
metric_list:
  - metric: perplexity
  - metric: acc
""")
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        results = lm_eval.simple_evaluate(
            model="local-completions",
            model_args=f"base_url=http://127.0.0.1:{port}/v1/completions,model=fixture,tokenizer_backend=remote,"
                       "tokenized_requests=True,num_concurrent=1,max_retries=1",
            tasks=["dsv3_fixture"],
            task_manager=TaskManager(include_path=tasks),
            log_samples=True,
            batch_size=4,
        )
        samples = results["samples"]["dsv3_fixture"]
        assert len(samples) == len(rows), (len(samples), len(rows))
        worst = 0.0
        for s in samples:
            row = rows[s["doc_id"]]
            ll, greedy = s["resps"][0][0]
            worst = max(worst, abs(ll - row["ll"]))
            assert abs(ll - row["ll"]) < 1e-3, (row, ll)
            assert bool(greedy) == row["greedy"], (row, greedy)
    finally:
        server.send_signal(signal.SIGINT)
        code = server.wait(timeout=30)
        err = server.stderr.read()
        shutil.rmtree(tmp, ignore_errors=True)
    assert code == 0 and "panicked" not in err, err
    print(f"lm-eval: ok ({len(rows)} loglikelihood samples within {worst:.1e} of transformers; "
          f"lm-eval {lm_eval.__version__})")


if __name__ == "__main__":
    main()
