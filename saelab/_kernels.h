/* The math of saelab's C kernels (_kernels_math.c), called by their Python bindings
 * (_kernels.c): plain C on float32 arrays, no Python. What each computes: _kernels.c. */
#ifndef SAELAB_KERNELS_H
#define SAELAB_KERNELS_H
#include <stddef.h>
#include <stdint.h>

#define BLOCK 16 /* top-k block size (_kernels_math.c, topk_row) */

typedef struct {
    const float *pre, *x, *w_dec, *b_dec;
    ptrdiff_t t0, rows;
    int h, d, k;
    float coef, l1n;
    uint32_t *idx;
    float *codes, *g_pre, *vg, *xc, *r, *g_r;
    double *sums, *gbdec;  /* [squared residual, codes, nonzero codes], [d] */
} HalfArgs;

typedef struct {
    const uint32_t *idx;
    const float *g_pre, *codes, *vg, *xc, *g_r, *w_enc, *w_dec;
    const int32_t *aux_of;
    const float *aux_enc, *aux_dec, *aux_benc, *aux_proj;
    ptrdiff_t pairs;
    int k, d, lo, hi;
    float *enc, *dec, *g_benc;
    int32_t *fired;
    double *sq, *bdec;
} GradArgs;

/* Token t's top-k, codes, residual (and xc if given); returns |r|^2. scratch: h / BLOCK + k. */
float encode_token(const float *pre, const float *x, const float *w_dec, const float *b_dec,
                   int h, int d, int k, uint32_t *ix, float *sel, float *v, float *xc, float *r,
                   float *scratch);
int sparse_half_run(const HalfArgs *a);  /* 0: out of memory */
int grad_rows_run(const GradArgs *a);    /* 0: out of memory */
void adam_run(float *p, float *m, float *v, const float *g, ptrdiff_t lo, ptrdiff_t hi,
              ptrdiff_t d, const float *c, int unit);
#endif
