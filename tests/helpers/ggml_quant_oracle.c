/* Test oracle: quantize float32 rows read from stdin with ggml's own ggml_quantize_chunk
 * (no importance matrix, so the quantize_row_*_ref path llama-quantize takes), linked
 * against the libggml-base.a that shared/tools/llama-cpp.sh builds.
 * usage: ggml_quant_oracle TYPE NROWS N_PER_ROW < f32 > blocks */
#include <stdio.h>
#include <stdlib.h>
#include "ggml.h"

int main(int argc, char **argv) {
    if (argc != 4) return 2;
    enum ggml_type type = (enum ggml_type) atoi(argv[1]);
    int64_t nrows = atoll(argv[2]), n_per_row = atoll(argv[3]);
    size_t n = (size_t) (nrows * n_per_row);
    float *src = malloc(n * sizeof(float) + 1);
    if (fread(src, sizeof(float), n, stdin) != n) return 3;
    size_t size = ggml_row_size(type, n_per_row) * (size_t) nrows;
    void *dst = malloc(size + 1);
    size_t got = ggml_quantize_chunk(type, src, dst, 0, nrows, n_per_row, NULL);
    if (got != size) return 4;
    fwrite(dst, 1, size, stdout);
    return 0;
}
