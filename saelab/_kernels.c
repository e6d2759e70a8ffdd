/* saelab._kernels: the Python bindings of the CPU kernels of the fast training step and
 * of validation (saelab/host_step.py, saelab/validate.py; their math: _kernels_math.c;
 * built by pip where a C compiler is, else MLX ops do the same work). MLX's CPU backend runs a TopK
 * step's sparse work (top-k selection, row gathers, segment-sums, elementwise Adam) on
 * one thread each without SIMD; each kernel here works on a range of tokens or latents,
 * so two calls on two threads (the GIL is released) split the work without locks
 * (benchmarks/cpu_kernels.py, benchmarks/README.md).
 *
 * sparse_half: for tokens [t0, t0 + rows) of a batch with pre-activations pre: the top-k
 * latents and their codes, the reconstruction residual r = decode - (x - b_dec), the
 * residual gradient g_r = coef * r, the codes' gradients, and sums for the metrics.
 * encode_rows: the same tokens' top-k, codes and squared errors only (validation).
 *
 * grad_rows: latents [lo, hi) of the weight and encoder-bias gradients over the batch's
 * (token, latent) pairs, finished: enc[l] = sum g_pre[p] * xc[token(p)], dec[l] = sum
 * codes[p] * g_r[token(p)] (a counting sort, then one pass per latent), AuxK's rows added,
 * the decoder row's component along the unit decoder row taken off, the rows' squared
 * norms (for the global clip) and b_dec's encoder-bias term sum g_benc[l] * w_enc[l].
 *
 * adam_rows: bias-corrected Adam on rows [lo, hi) of one parameter, in place, the
 * gradient scaled by the clip factor first, the rows renormalized after (unit).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#include "_kernels.h"

static int need(Py_buffer *b, Py_ssize_t items, Py_ssize_t size, const char *name) {
    if (b->len != items * size) {
        PyErr_Format(PyExc_ValueError, "saelab._kernels: %s has %zd bytes, expected %zd", name,
                     b->len, items * size);
        return 0;
    }
    return 1;
}

/* Every binding ends here: its buffers released, then None, or NULL with the error set
 * (``bad`` when a check failed without setting one). */
static PyObject *finish(int ok, Py_buffer *b, int count, const char *bad) {
    if (!ok && !PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, bad);
    for (int i = 0; i < count; i++)
        if (b[i].obj) PyBuffer_Release(&b[i]);
    if (!ok) return NULL;
    Py_RETURN_NONE;
}

typedef struct {
    Py_ssize_t d, h, n, rows;
} TokenShapes;

/* b[0..5] = pre x w_dec b_dec idx codes (sparse_half, encode_rows): d_model from b_dec,
 * latents from w_dec, batch tokens from x, and pre's rows within them from t0. */
static int token_shapes(Py_buffer *b, Py_ssize_t t0, int k, TokenShapes *s) {
    s->d = b[3].len / 4;
    s->h = s->d ? b[2].len / 4 / s->d : 0;
    s->n = s->d ? b[1].len / 4 / s->d : 0;
    s->rows = s->h ? b[0].len / 4 / s->h : 0;
    return s->d > 0 && s->h >= k && k > 0 && t0 >= 0 && t0 + s->rows <= s->n
           && need(&b[0], s->rows, 4 * s->h, "pre") && need(&b[1], s->n, 4 * s->d, "x")
           && need(&b[2], s->h, 4 * s->d, "w_dec") && need(&b[4], s->n, 4 * k, "idx")
           && need(&b[5], s->n, 4 * k, "codes");
}

static PyObject *sparse_half(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer b[13];  /* pre x w_dec b_dec | idx codes g_pre vg xc r g_r sums gbdec */
    Py_ssize_t t0;
    int k;
    float coef, l1n;
    memset(b, 0, sizeof(b));
    if (!PyArg_ParseTuple(args, "y*y*y*y*niffw*w*w*w*w*w*w*w*w*", &b[0], &b[1], &b[2], &b[3],
                          &t0, &k, &coef, &l1n, &b[4], &b[5], &b[6], &b[7], &b[8], &b[9],
                          &b[10], &b[11], &b[12]))
        return NULL;
    TokenShapes s;
    int ok = token_shapes(b, t0, k, &s);
    Py_ssize_t d = s.d, h = s.h, n = s.n, rows = s.rows;
    ok = ok && need(&b[6], n, 4 * k, "g_pre") && need(&b[7], n, 4 * k, "vg")
         && need(&b[8], n, 4 * d, "xc") && need(&b[9], n, 4 * d, "r")
         && need(&b[10], n, 4 * d, "g_r") && need(&b[11], 3, 8, "sums")
         && need(&b[12], d, 8, "gbdec");
    if (ok) {
        HalfArgs a = {b[0].buf, b[1].buf, b[2].buf, b[3].buf, t0, rows, (int)h, (int)d, k,
                      coef, l1n, b[4].buf, b[5].buf, b[6].buf, b[7].buf, b[8].buf, b[9].buf,
                      b[10].buf, b[11].buf, b[12].buf};
        Py_BEGIN_ALLOW_THREADS
        ok = sparse_half_run(&a);
        Py_END_ALLOW_THREADS
        if (!ok) PyErr_NoMemory();
    }
    return finish(ok, b, 13, "sparse_half: bad shapes or token range");
}

static PyObject *encode_rows(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer b[7];  /* pre x w_dec b_dec | idx codes err */
    Py_ssize_t t0;
    int k;
    memset(b, 0, sizeof(b));
    if (!PyArg_ParseTuple(args, "y*y*y*y*niw*w*w*", &b[0], &b[1], &b[2], &b[3], &t0, &k, &b[4],
                          &b[5], &b[6]))
        return NULL;
    TokenShapes s;
    int ok = token_shapes(b, t0, k, &s) && need(&b[6], s.n, 4, "err");
    Py_ssize_t d = s.d, h = s.h, rows = s.rows;
    float *scratch = ok ? malloc((size_t)(k + h / BLOCK + k + d) * sizeof(float)) : NULL;
    if (ok && scratch) {
        const float *pre = b[0].buf, *x = b[1].buf;
        uint32_t *idx = b[4].buf;
        float *codes = b[5].buf, *err = b[6].buf;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < rows; i++) {
            Py_ssize_t t = t0 + i;
            err[t] = encode_token(pre + (size_t)i * h, x + (size_t)t * d, b[2].buf, b[3].buf,
                                  (int)h, (int)d, k, idx + (size_t)t * k, scratch,
                                  codes + (size_t)t * k, NULL, scratch + k + h / BLOCK + k,
                                  scratch + k);
        }
        Py_END_ALLOW_THREADS
    } else if (ok) {
        ok = 0;
        PyErr_NoMemory();
    }
    free(scratch);
    return finish(ok, b, 7, "encode_rows: bad shapes or token range");
}

static PyObject *grad_rows(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer b[19];  /* idx g_pre codes vg xc g_r w_enc w_dec aux_of aux_enc aux_dec
                         aux_benc aux_proj | enc dec g_benc fired sq bdec */
    int lo, hi;
    memset(b, 0, sizeof(b));
    if (!PyArg_ParseTuple(args, "y*y*y*y*y*y*y*y*y*y*y*y*y*iiw*w*w*w*w*w*", &b[0], &b[1],
                          &b[2], &b[3], &b[4], &b[5], &b[6], &b[7], &b[8], &b[9], &b[10],
                          &b[11], &b[12], &lo, &hi, &b[13], &b[14], &b[15], &b[16], &b[17],
                          &b[18]))
        return NULL;
    Py_ssize_t h = b[8].len / 4, d = h ? b[6].len / 4 / h : 0, n = d ? b[4].len / 4 / d : 0;
    Py_ssize_t pairs = b[0].len / 4, k = n ? pairs / n : 0;
    Py_ssize_t aux_rows = d ? b[9].len / 4 / d : 0;
    int ok = d > 0 && k > 0 && pairs == n * k && 0 <= lo && lo <= hi && hi <= h
             && need(&b[1], pairs, 4, "g_pre") && need(&b[2], pairs, 4, "codes")
             && need(&b[3], pairs, 4, "vg") && need(&b[5], n, 4 * d, "g_r")
             && need(&b[6], h, 4 * d, "w_enc") && need(&b[7], h, 4 * d, "w_dec")
             && need(&b[9], aux_rows, 4 * d, "aux_enc") && need(&b[10], aux_rows, 4 * d, "aux_dec")
             && need(&b[11], aux_rows, 4, "aux_benc") && need(&b[12], aux_rows, 4, "aux_proj")
             && need(&b[13], h, 4 * d, "enc") && need(&b[14], h, 4 * d, "dec")
             && need(&b[15], h, 4, "g_benc") && need(&b[16], h, 4, "fired")
             && need(&b[17], 2, 8, "sq") && need(&b[18], d, 8, "bdec");
    const int32_t *aux_of = b[8].buf;
    const uint32_t *idx = b[0].buf;
    for (Py_ssize_t l = 0; ok && l < h; l++) ok = aux_of[l] < aux_rows;
    for (Py_ssize_t p = 0; ok && p < pairs; p++) ok = idx[p] < (uint32_t)h;
    if (ok) {
        GradArgs a = {idx, b[1].buf, b[2].buf, b[3].buf, b[4].buf, b[5].buf, b[6].buf, b[7].buf,
                      aux_of, b[9].buf, b[10].buf, b[11].buf, b[12].buf, pairs, (int)k,
                      (int)d, lo, hi, b[13].buf, b[14].buf, b[15].buf, b[16].buf, b[17].buf,
                      b[18].buf};
        Py_BEGIN_ALLOW_THREADS
        ok = grad_rows_run(&a);
        Py_END_ALLOW_THREADS
        if (!ok) PyErr_NoMemory();
    }
    return finish(ok, b, 19, "grad_rows: bad shapes, latent range or indices");
}

static PyObject *adam_rows(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer b[4];  /* p m v g */
    Py_ssize_t lo, hi, d;
    int unit;
    float c[8];
    memset(b, 0, sizeof(b));
    if (!PyArg_ParseTuple(args, "w*w*w*y*nnn(ffffffff)p", &b[0], &b[1], &b[2], &b[3], &lo, &hi,
                          &d, &c[0], &c[1], &c[2], &c[3], &c[4], &c[5], &c[6], &c[7], &unit))
        return NULL;
    Py_ssize_t rows = d > 0 ? b[0].len / 4 / d : 0;
    int ok = d > 0 && 0 <= lo && lo <= hi && hi <= rows && need(&b[0], rows, 4 * d, "p")
             && need(&b[1], rows, 4 * d, "m") && need(&b[2], rows, 4 * d, "v")
             && need(&b[3], rows, 4 * d, "g");
    if (ok) {
        Py_BEGIN_ALLOW_THREADS
        adam_run(b[0].buf, b[1].buf, b[2].buf, b[3].buf, lo, hi, d, c, unit);
        Py_END_ALLOW_THREADS
    }
    return finish(ok, b, 4, "adam_rows: bad shapes or row range");
}

static PyMethodDef methods[] = {
    {"sparse_half", sparse_half, METH_VARARGS,
     "sparse_half(pre, x, w_dec, b_dec, t0, k, coef, l1n, idx, codes, g_pre, vg, xc, r, g_r, "
     "sums, gbdec): tokens [t0, t0 + len(pre)) of the batch x: top-k, codes, residual and "
     "gradients into the batch-wide outputs; adds to sums and gbdec (float64)."},
    {"encode_rows", encode_rows, METH_VARARGS,
     "encode_rows(pre, x, w_dec, b_dec, t0, k, idx, codes, err): tokens [t0, t0 + len(pre)) "
     "of x: top-k, codes and squared reconstruction error into the batch-wide outputs."},
    {"grad_rows", grad_rows, METH_VARARGS,
     "grad_rows(idx, g_pre, codes, vg, xc, g_r, w_enc, w_dec, aux_of, aux_enc, aux_dec, "
     "aux_benc, aux_proj, lo, hi, enc, dec, g_benc, fired, sq, bdec): latents [lo, hi) of "
     "the finished gradients; adds to sq and bdec (float64)."},
    {"adam_rows", adam_rows, METH_VARARGS,
     "adam_rows(p, m, v, g, lo, hi, d, (clip, b1, 1 - b1, b2, 1 - b2, lr / (1 - b1^t), "
     "1 / sqrt(1 - b2^t), eps), unit): Adam on rows [lo, hi) of width d, in place."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "saelab._kernels",
                                    "CPU kernels of the fast training step.", -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
