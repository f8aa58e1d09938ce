// Reference greedy decoder written directly against libllama, used by the test suite to
// check that llama_cpp generates the same tokens as plain llama.cpp from the same build.
//
// usage: greedy MODEL PROMPT N_PREDICT N_CTX N_THREADS
// prints the generated token ids, one per line (stops early at an end-of-generation token).
#include <llama.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

static void quiet(ggml_log_level, const char *, void *) {}

int main(int argc, char **argv) {
    if (argc != 6) {
        std::fprintf(stderr, "usage: %s MODEL PROMPT N_PREDICT N_CTX N_THREADS\n", argv[0]);
        return 2;
    }
    const std::string prompt = argv[2];
    const int n_predict = std::atoi(argv[3]);
    llama_log_set(quiet, nullptr);
    llama_backend_init();

    llama_model *model = llama_model_load_from_file(argv[1], llama_model_default_params());
    if (model == nullptr) return 1;
    const llama_vocab *vocab = llama_model_get_vocab(model);

    std::vector<llama_token> tokens(prompt.size() + 8);
    const int n = llama_tokenize(vocab, prompt.data(), (int)prompt.size(), tokens.data(),
                                 (int)tokens.size(), /*add_special=*/true, /*parse_special=*/true);
    if (n < 0) return 1;
    tokens.resize(n);

    llama_context_params cparams = llama_context_default_params();
    cparams.n_ctx = std::atoi(argv[4]);
    cparams.n_batch = cparams.n_ctx;
    cparams.n_threads = cparams.n_threads_batch = std::atoi(argv[5]);
    cparams.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;  // llama_cpp's default, as llama-cpp-python's
    llama_context *ctx = llama_init_from_model(model, cparams);
    if (ctx == nullptr) return 1;

    llama_sampler *greedy = llama_sampler_init_greedy();
    llama_batch batch = llama_batch_get_one(tokens.data(), (int)tokens.size());
    llama_token token = 0;
    for (int i = 0; i < n_predict; ++i) {
        if (llama_decode(ctx, batch) != 0) return 1;
        token = llama_sampler_sample(greedy, ctx, -1);
        if (llama_vocab_is_eog(vocab, token)) break;
        std::printf("%d\n", token);
        batch = llama_batch_get_one(&token, 1);
    }
    llama_sampler_free(greedy);
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
