/* llama.cpp's own numbers for a GGUF: the log-probability of each next token of a sequence of ids,
 * computed by libllama (CPU) in one batch and again one token at a time through its KV cache.
 * Prints JSON {"batch": [...], "incremental": [...]} where entry i is log p(ids[i+1] | ids[..=i]).
 *
 *   cc -O2 scripts/llamacpp_logprobs.c -I$LLAMA/include -I$LLAMA/ggml/include \
 *      -L$LLAMA/build/bin -lllama -lggml -lggml-base -lggml-cpu -lstdc++ -lm -fopenmp -o llamacpp_logprobs
 *   ./llamacpp_logprobs model.gguf 5 17 3 ...
 * (scripts/make_llamacpp_fixtures.sh builds llama.cpp and writes tests/fixtures/gguf/*.llamacpp.json.)
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "llama.h"

static void quiet(enum ggml_log_level level, const char *text, void *user) {
    (void)user;
    if (level >= GGML_LOG_LEVEL_ERROR) fputs(text, stderr);
}

static double logprob(const float *logits, int n_vocab, int token) {
    double max = logits[0], sum = 0.0;
    for (int v = 1; v < n_vocab; v++) max = logits[v] > max ? logits[v] : max;
    for (int v = 0; v < n_vocab; v++) sum += exp((double)logits[v] - max);
    return (double)logits[token] - max - log(sum);
}

static struct llama_context *context(struct llama_model *model, int n) {
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = cp.n_batch = cp.n_ubatch = (uint32_t)(n < 256 ? 256 : n);
    cp.n_threads = cp.n_threads_batch = 2;
    return llama_init_from_model(model, cp);
}

/* Runs ids[from..to) after what ctx holds, logits for each. */
static int run(struct llama_context *ctx, const int *ids, int from, int to) {
    struct llama_batch b = llama_batch_init(to - from, 0, 1);
    for (int i = from; i < to; i++) {
        int k = i - from;
        b.token[k] = ids[i];
        b.pos[k] = i;
        b.n_seq_id[k] = 1;
        b.seq_id[k][0] = 0;
        b.logits[k] = 1;
    }
    b.n_tokens = to - from;
    int rc = llama_decode(ctx, b);
    llama_batch_free(b);
    return rc;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s model.gguf id id [id ...]\n", argv[0]);
        return 2;
    }
    llama_log_set(quiet, NULL);
    llama_backend_init();
    int n = argc - 2;
    int *ids = malloc(sizeof(int) * n);
    for (int i = 0; i < n; i++) ids[i] = atoi(argv[i + 2]);
    struct llama_model_params mp = llama_model_default_params();
    struct llama_model *model = llama_model_load_from_file(argv[1], mp);
    if (!model) {
        fprintf(stderr, "cannot load %s\n", argv[1]);
        return 1;
    }
    int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    printf("{\"model\": \"%s\", \"ids\": [", argv[1]);
    for (int i = 0; i < n; i++) printf("%s%d", i ? ", " : "", ids[i]);
    printf("]");
    for (int mode = 0; mode < 2; mode++) {
        struct llama_context *ctx = context(model, n);
        printf(", \"%s\": [", mode == 0 ? "batch" : "incremental");
        if (mode == 0 && run(ctx, ids, 0, n - 1) != 0) return 1;
        for (int i = 0; i + 1 < n; i++) {
            if (mode == 1 && run(ctx, ids, i, i + 1) != 0) return 1;
            const float *lg = llama_get_logits_ith(ctx, mode == 0 ? i : 0);
            printf("%s%.7f", i ? ", " : "", logprob(lg, n_vocab, ids[i + 1]));
        }
        printf("]");
        llama_free(ctx);
    }
    printf("}\n");
    llama_model_free(model);
    return 0;
}
