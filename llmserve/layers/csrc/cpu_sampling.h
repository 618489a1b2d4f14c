/* Random sampling of logits rows, shared by cpu_sampling.c and the multi-step loop of cpu_decode_layers.c. */
#ifndef LLMSERVE_CPU_SAMPLING_H
#define LLMSERVE_CPU_SAMPLING_H

#include <stdint.h>

/* A row's sampling parameters: temperature <= 0 means greedy (the row is left as it is); top_k 0 or >= vocab: off;
 * top_p 1: off; min_p 0: off. */
typedef struct {
    float temperature, top_p, min_p;
    long top_k;
} sample_params;

void llmserve_sample_rows(const float *logits, long rows, long vocab, const sample_params *params, uint64_t seed,
                          long *out, float *scratch, int num_threads);
void llmserve_argmax_rows(const float *x, long x_stride, long *out, long rows, long n, int num_threads);

#endif
