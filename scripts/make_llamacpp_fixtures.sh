#!/usr/bin/env bash
# llama.cpp's own numbers for dsv3's GGUF tests: builds libllama (CPU) from the llama.cpp that the
# llama-cpp-python 0.3.36 sdist vendors, and writes the next-token logprobs it computes (in one
# batch and one token at a time, scripts/llamacpp_logprobs.c) for
#   tests/fixtures/gguf/v3-f32-00001-of-00002.gguf, v3-q8_0.gguf (gguf-py made; not v2-bf16-legacy:
#                                         llama.cpp takes a deepseek2 without q_lora_rank for V2-Lite
#                                         only at its 27 layers)
#   tests/fixtures/gguf/v32-d64-f32.gguf  a random V3.2 model (index_head_dim 64: llama.cpp rotates
#                                         the index keys in 64-wide Hadamard blocks) written by
#                                         `dsv3 convert --to *.gguf` as llama.cpp's deepseek32
# to tests/fixtures/gguf/<name>.llamacpp.json. Needs cmake (pip install cmake), a C/C++ compiler
# and the dsv3 release binary.
#
#   cargo build --release -p dsv3-cli && bash scripts/make_llamacpp_fixtures.sh
set -euo pipefail
cd "$(dirname "$0")/.."
work=target/llamacpp
mkdir -p "$work"
if [ ! -d "$work/llama_cpp_python-0.3.36" ]; then
  python3 -m pip download --quiet --no-deps --no-binary :all: --no-build-isolation llama-cpp-python==0.3.36 -d "$work"
  tar xzf "$work/llama_cpp_python-0.3.36.tar.gz" -C "$work"
fi
L="$work/llama_cpp_python-0.3.36/vendor/llama.cpp"
if [ ! -f "$L/build/src/libllama.a" ]; then
  cmake -S "$L" -B "$L/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=OFF > /dev/null
  cmake --build "$L/build" -j2 --target llama > /dev/null
fi
B="$L/build"
gcc -O2 scripts/llamacpp_logprobs.c -I"$L/include" -I"$L/ggml/include" "$B/src/libllama.a" \
  "$B/ggml/src/libggml.a" "$B/ggml/src/libggml-cpu.a" "$B/ggml/src/libggml-base.a" \
  -lstdc++ -lm -fopenmp -lpthread -o "$work/llamacpp_logprobs"

G=tests/fixtures/gguf
# The V3.2 model: v32_f32's shape with 64-wide index keys, choosing 8 positions of 40.
python3 - "$work/v32-d64.json" <<'PY'
import json, sys
c = json.load(open("tests/fixtures/v32_f32/config.json"))
c.update(index_head_dim=64, index_topk=8)
json.dump(c, open(sys.argv[1], "w"), indent=1)
PY
rm -rf "$work/v32-d64" "$G/v32-d64-f32.gguf"
target/release/dsv3 random-model --preset "$work/v32-d64.json" --dtype f32 --seed 5 --out "$work/v32-d64" > /dev/null
target/release/dsv3 convert --from "$work/v32-d64" --to "$G/v32-d64-f32.gguf" --format f32 > /dev/null

ids() { python3 -c "import json; print(' '.join(map(str, json.load(open('tests/fixtures/$1/reference.json'))['ids'])))"; }
v32_ids=$(python3 -c "import random; r = random.Random(7); print(' '.join(str(r.randrange(2, 384)) for _ in range(40)))")
for pair in "v3-f32-00001-of-00002:$(ids v3_f32_sharded)" "v3-q8_0:$(ids v3_f32_sharded)" "v32-d64-f32:$v32_ids"; do
  name=${pair%%:*}
  # shellcheck disable=SC2086
  "$work/llamacpp_logprobs" "$G/$name.gguf" ${pair#*:} > "$G/$name.llamacpp.json" 2> /dev/null
  echo "$G/$name.llamacpp.json"
done
