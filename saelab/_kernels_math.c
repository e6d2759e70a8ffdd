/* The math of saelab's C kernels; _kernels.c says what each computes and binds them to
 * Python. Compiled with -O3 -fno-math-errno, no -march (runs on any x86-64). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "_kernels.h"

static inline float dot(const float *a, const float *b, ptrdiff_t d) {
    /* 16 partial sums: a single running sum is a dependency chain the compiler may not
     * reorder (no -ffast-math), 3.3x slower for the codes' gradients */
    float acc[16] = {0}, s = 0;
    ptrdiff_t c = 0;
    for (; c + 16 <= d; c += 16)
        for (int u = 0; u < 16; u++) acc[u] += a[c + u] * b[c + u];
    for (; c < d; c++) s += a[c] * b[c];
    for (int u = 0; u < 16; u++) s += acc[u];
    return s;
}

static void sift(float *v, uint32_t *ix, int k, int i) {  /* min-heap of the k largest */
    for (;;) {
        int l = 2 * i + 1, r = l + 1, m = i;
        if (l < k && v[l] < v[m]) m = l;
        if (r < k && v[r] < v[m]) m = r;
        if (m == i) return;
        float tv = v[i]; v[i] = v[m]; v[m] = tv;
        uint32_t ti = ix[i]; ix[i] = ix[m]; ix[m] = ti;
        i = m;
    }
}

static void heap_topk(const float *row, int h, int k, uint32_t *ix, float *sel) {
    for (int j = 0; j < k; j++) { sel[j] = row[j]; ix[j] = (uint32_t)j; }
    for (int j = k / 2 - 1; j >= 0; j--) sift(sel, ix, k, j);
    for (int j = k; j < h; j++)  /* NaN enters (and reaches the loss) */
        if (!(row[j] <= sel[0])) { sel[0] = row[j]; ix[0] = (uint32_t)j; sift(sel, ix, k, 0); }
}

/* The k largest of row[0, h) into (ix, sel), unordered. Block b holds the elements
 * u * nb + b (u < BLOCK; vertical maxima vectorize): the k-th largest block maximum tau
 * bounds the k-th largest value from below, so only elements >= tau are candidates
 * (6.4 against 10.0 ms for a plain heap over 1024 x 4608). scratch: nb + k floats. */
static void topk_row(const float *row, int h, int k, uint32_t *ix, float *sel, float *scratch) {
    int nb = h / BLOCK, nan = 0;
    for (int j = 0; j < h; j++) nan |= row[j] != row[j];
    if (nan || nb < k) { heap_topk(row, h, k, ix, sel); return; }
    float *bmax = scratch, *hv = scratch + nb;
    memcpy(bmax, row, (size_t)nb * sizeof(float));
    for (int u = 1; u < BLOCK; u++) {
        const float *r = row + (size_t)u * nb;
        for (int b = 0; b < nb; b++) bmax[b] = r[b] > bmax[b] ? r[b] : bmax[b];
    }
    heap_topk(bmax, nb, k, ix, hv);  /* ix is scratch here */
    float tau = hv[0];
    int c = 0;
    for (int b = 0; b <= nb; b++) {  /* b == nb: the h - BLOCK * nb tail, in no block */
        if (b < nb && bmax[b] < tau) continue;
        int count = b < nb ? BLOCK : h - BLOCK * nb;
        for (int u = 0; u < count; u++) {
            int j = b < nb ? u * nb + b : BLOCK * nb + u;
            float v = row[j];
            if (v < tau) continue;
            if (c < k) {
                sel[c] = v;
                ix[c] = (uint32_t)j;
                if (++c == k)
                    for (int q = k / 2 - 1; q >= 0; q--) sift(sel, ix, k, q);
            } else if (v > sel[0]) {
                sel[0] = v;
                ix[0] = (uint32_t)j;
                sift(sel, ix, k, 0);
            }
        }
    }
}


/* Token t's top-k (ix, sel: the pre-activations), codes v and residual r = decode(v) -
 * (x - b_dec) (xc = x - b_dec too, if given); returns |r|^2. scratch: h / BLOCK + k. */
float encode_token(const float *pre, const float *x, const float *w_dec,
                          const float *b_dec, int h, int d, int k, uint32_t *ix, float *sel,
                          float *v, float *xc, float *r, float *scratch) {
    topk_row(pre, h, k, ix, sel, scratch);
    for (int j = 0; j < d; j++) r[j] = b_dec[j] - x[j];
    if (xc)
        for (int j = 0; j < d; j++) xc[j] = -r[j];
    for (int j = 0; j < k; j++) {
        v[j] = sel[j] > 0 || isnan(sel[j]) ? sel[j] : 0.0f;
        const float *w = w_dec + (size_t)ix[j] * d;
        for (int c = 0; c < d; c++) r[c] += v[j] * w[c];
    }
    return dot(r, r, d);
}

int sparse_half_run(const HalfArgs *a) {
    int h = a->h, d = a->d, k = a->k;
    float *sel = malloc((size_t)(k + h / BLOCK + k) * sizeof(float));
    if (!sel) return 0;
    double sq = 0, sum_v = 0, nonzero = 0;
    for (ptrdiff_t i = 0; i < a->rows; i++) {
        ptrdiff_t t = a->t0 + i;
        uint32_t *ix = a->idx + (size_t)t * k;
        float *v = a->codes + (size_t)t * k, *gp = a->g_pre + (size_t)t * k;
        float *vg = a->vg + (size_t)t * k, *r = a->r + (size_t)t * d, *g = a->g_r + (size_t)t * d;
        sq += encode_token(a->pre + (size_t)i * h, a->x + (size_t)t * d, a->w_dec, a->b_dec, h,
                           d, k, ix, sel, v, a->xc + (size_t)t * d, r, sel + k);
        for (int c = 0; c < d; c++) {
            g[c] = a->coef * r[c];
            a->gbdec[c] += g[c];
        }
        for (int j = 0; j < k; j++) {
            float gv = dot(a->w_dec + (size_t)ix[j] * d, g, d);
            gp[j] = sel[j] > 0 ? gv + a->l1n : 0.0f;
            vg[j] = v[j] * gv;
            sum_v += v[j];
            nonzero += v[j] > 0;
        }
    }
    a->sums[0] += sq;
    a->sums[1] += sum_v;
    a->sums[2] += nonzero;
    free(sel);
    return 1;
}

int grad_rows_run(const GradArgs *a) {
    int lo = a->lo, m = a->hi - lo, d = a->d;
    ptrdiff_t *start = calloc((size_t)m + 1, sizeof(ptrdiff_t));
    ptrdiff_t *fill = malloc(((size_t)m + 1) * sizeof(ptrdiff_t));
    ptrdiff_t *order = NULL;
    if (!start || !fill) goto fail;
    for (ptrdiff_t p = 0; p < a->pairs; p++)
        if (a->idx[p] >= (uint32_t)lo && a->idx[p] < (uint32_t)a->hi) start[a->idx[p] - lo + 1]++;
    for (int l = 0; l < m; l++) start[l + 1] += start[l];
    order = malloc(((size_t)start[m] + 1) * sizeof(ptrdiff_t));
    if (!order) goto fail;
    memcpy(fill, start, ((size_t)m + 1) * sizeof(ptrdiff_t));
    for (ptrdiff_t p = 0; p < a->pairs; p++)  /* pairs in batch order within each latent */
        if (a->idx[p] >= (uint32_t)lo && a->idx[p] < (uint32_t)a->hi)
            order[fill[a->idx[p] - lo]++] = p;
    double sq_enc = 0, sq_dec = 0;
    for (int l = lo; l < a->hi; l++) {
        float *e = a->enc + (size_t)l * d, *o = a->dec + (size_t)l * d;
        memset(e, 0, (size_t)d * sizeof(float));
        memset(o, 0, (size_t)d * sizeof(float));
        float gb = 0, pr = 0;
        int32_t fired = 0;
        for (ptrdiff_t q = start[l - lo]; q < start[l - lo + 1]; q++) {
            ptrdiff_t p = order[q], t = p / a->k;
            const float *x = a->xc + (size_t)t * d, *g = a->g_r + (size_t)t * d;
            float ge = a->g_pre[p], c = a->codes[p];
            gb += ge;
            pr += a->vg[p];
            fired += c > 0;
            for (int j = 0; j < d; j++) {
                e[j] += ge * x[j];
                o[j] += c * g[j];
            }
        }
        int32_t aux = a->aux_of[l];
        if (aux >= 0) {
            const float *ae = a->aux_enc + (size_t)aux * d, *ad = a->aux_dec + (size_t)aux * d;
            for (int j = 0; j < d; j++) {
                e[j] += ae[j];
                o[j] += ad[j];
            }
            gb += a->aux_benc[aux];
            pr += a->aux_proj[aux];
        }
        const float *w = a->w_dec + (size_t)l * d, *we = a->w_enc + (size_t)l * d;
        for (int j = 0; j < d; j++) o[j] -= pr * w[j];
        sq_enc += dot(e, e, d);
        sq_dec += dot(o, o, d);
        a->g_benc[l] = gb;
        a->fired[l] = fired;
        if (gb != 0)
            for (int j = 0; j < d; j++) a->bdec[j] += (double)gb * we[j];
    }
    a->sq[0] += sq_enc;
    a->sq[1] += sq_dec;
    free(start); free(fill); free(order);
    return 1;
fail:
    free(start); free(fill); free(order);
    return 0;
}

void adam_run(float *p, float *m, float *v, const float *g, ptrdiff_t lo,
                     ptrdiff_t hi, ptrdiff_t d, const float *c, int unit) {
    /* c: clip, b1, 1 - b1, b2, 1 - b2, lr / (1 - b1^t), 1 / sqrt(1 - b2^t), eps; the
     * arithmetic of steps._adam and steps._unit_rows, in float32 */
    for (ptrdiff_t r = lo; r < hi; r++) {
        float *pr = p + (size_t)r * d, *mr = m + (size_t)r * d, *vr = v + (size_t)r * d;
        const float *gr = g + (size_t)r * d;
        for (ptrdiff_t j = 0; j < d; j++) {
            float gg = gr[j] * c[0];
            float mm = c[1] * mr[j] + c[2] * gg, vv = c[3] * vr[j] + c[4] * (gg * gg);
            mr[j] = mm;
            vr[j] = vv;
            pr[j] = pr[j] - c[5] * mm / (sqrtf(vv) * c[6] + c[7]);
        }
        if (unit) {
            float norm = sqrtf(dot(pr, pr, d)) + 1.1920929e-07f;
            for (ptrdiff_t j = 0; j < d; j++) pr[j] = pr[j] / norm;
        }
    }
}
