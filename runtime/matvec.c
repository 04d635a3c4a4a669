/* cblas_sgemm for MLX's CPU backend that sends matrix-vector products (M == 1) to cblas_sgemv.
 *
 * A batch-1 decode step is all M == 1 products, and OpenBLAS's sgemm streams the weights 2.5-4.5x
 * slower there than its sgemv (measured on Debian's 0.3.21: ~6 vs 13-28 GB/s). runtime/matvec.py
 * builds this file, hands it OpenBLAS's two entry points, and runtime/blas.py points MLX's
 * cblas_sgemm import here. Every other shape goes to sgemm unchanged.
 */
typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *, int,
                         float, float *, int);
typedef void (*sgemv_fn)(int, int, int, int, float, const float *, int, const float *, int, float,
                         float *, int);

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };

static sgemm_fn real_sgemm;
static sgemv_fn real_sgemv;

void vllm_metal_matvec_init(sgemm_fn gemm, sgemv_fn gemv) {
    real_sgemm = gemm;
    real_sgemv = gemv;
}

void vllm_metal_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha,
                      const float *a, int lda, const float *b, int ldb, float beta, float *c, int ldc) {
    if (order == ROW_MAJOR && m == 1 && real_sgemv) {
        /* c[1, n] = alpha * a[1, k] @ op(b)[k, n] + beta * c, i.e. c = alpha * op(b)^T a + beta * c.
         * op(b) = b: b is [k, n] row-major, so op(b)^T is b read transposed.
         * op(b) = b^T: b is [n, k] row-major, read as it is.  a is one row: a stride of 1, or lda
         * when a is itself transposed ([k, 1] stored with leading dimension lda). */
        int incx = trans_a == NO_TRANS ? 1 : lda;
        if (trans_b == NO_TRANS)
            real_sgemv(ROW_MAJOR, TRANS, k, n, alpha, b, ldb, a, incx, beta, c, 1);
        else
            real_sgemv(ROW_MAJOR, NO_TRANS, n, k, alpha, b, ldb, a, incx, beta, c, 1);
        return;
    }
    real_sgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
