/*
 * Exact top-K of user @ table^T in one pass over the item table (m4r::ScoreTopK, README-ScoreTopK.md).
 *
 * For each row b: scores s[j] = dot(user[b], table[j]) (fp32 accumulation; with fp16 I/O each score is
 * rounded to fp16 before it is compared, as the function body's fp16 TopK sees it), item 0 and the row's
 * exclude ids in [1, n_items) are -inf, and the result is the first K items in the order (score descending,
 * item id ascending): ONNX TopK's order on the masked score row, the -inf tail included. The table is read
 * in its own precision (fp16 converted in registers), in cache-sized blocks; threads split the catalogue
 * (and rows at large batch) and the partial lists are merged.
 */
#ifndef M4R_SCORE_TOPK_CPU_H
#define M4R_SCORE_TOPK_CPU_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum
{
    M4R_TOPK_F32 = 0,
    M4R_TOPK_F16 = 1
};

typedef struct M4RScoreTopKArgs
{
    void const* user;  /* (batch, dim), dtype */
    void const* table; /* (n_items, dim), dtype */
    int32_t dtype;     /* M4R_TOPK_F32 or M4R_TOPK_F16 (IEEE binary16 bits) */
    int64_t batch, n_items, dim;
    int64_t const* exclude; /* (batch, exclude_width) or NULL; 0 and ids outside [1, n_items) ignored */
    int64_t exclude_width;
    int64_t k; /* 1 <= k <= n_items */
} M4RScoreTopKArgs;

/* Runs fn(arg, i) for i in [0, count), possibly in parallel (e.g. ONNX Runtime's KernelContext_ParallelFor). */
typedef void (*M4RParallelFor)(void* ctx, void (*fn)(void* arg, size_t i), size_t count, void* arg);

/*
 * out_scores (batch, k) fp32 (fp16-exact values when dtype is fp16), out_items (batch, k).
 * Parallelism: pfor when not NULL, else num_threads std::threads (<= 1: the caller's thread).
 * Returns 0 (OK), 1 (bad argument), 2 (out of memory).
 */
int m4r_score_topk(M4RScoreTopKArgs const* args, float* out_scores, int64_t* out_items, int32_t num_threads,
    M4RParallelFor pfor, void* pfor_ctx);

/* "avx512" or "generic": the path m4r_score_topk takes on this CPU (M4R_TOPK_GENERIC=1 forces generic). */
char const* m4r_score_topk_isa(void);

#ifdef __cplusplus
}
#endif

#endif /* M4R_SCORE_TOPK_CPU_H */
